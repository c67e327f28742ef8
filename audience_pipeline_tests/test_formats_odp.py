"""Optimizely ODP files (seed 001) through the real pipeline, asserted on the analyst views."""

import gzip
from datetime import UTC, datetime

import pytest

from audience_pipeline_tests.conftest import base_config

SEED = """type,action,a_high_confidence_identifier,audience_id,ts
passthrough,qualify,user_1,external_audience_1,1748851070
passthrough,qualify,user_2,external_audience_1,1748851070
"""


@pytest.fixture
def odp(make_env):
    config = base_config()
    config["feeds"] = {"odp": {"format": "odp", "source": "drop/odp", "id_field": "a_high_confidence_identifier",
                               "max_reject_ratio": 0.5, "max_decompressed_bytes": 5_000_000}}
    env = make_env(config)
    (env.root / "drop" / "odp").mkdir(parents=True, exist_ok=True)
    return env


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


def test_seed_example_imports_as_is(odp):
    record = odp.import_file("external_audience_1.csv.gz", gz(SEED), feed="odp")
    assert (record.status, record.members, record.rows_rejected) == ("succeeded", 2, 0)
    assert odp.members("external_audience_1") == {"user_1", "user_2"}


def test_full_list_disqualifies_the_absent_and_header_order_is_free(odp):
    odp.import_file("aud.csv.gz", gz(SEED.replace("external_audience_1", "aud")), feed="odp")
    reordered = (
        "ts,audience_id,a_high_confidence_identifier,action,type\n"
        "1748851170,aud,user_2,qualify,passthrough\n"
        "1748851170,aud,user_3,qualify,passthrough\n"
        "1748851170,aud,user_9,disqualify,passthrough\n"
    )
    record = odp.import_file("aud.csv.gz", gz(reordered), feed="odp")
    assert (record.qualified, record.disqualified, record.noops) == (1, 1, 1)
    assert odp.members("aud") == {"user_2", "user_3"}
    assert odp.query("SELECT action, user_id FROM membership_events WHERE import_id = ? ORDER BY ALL",
                     [record.import_id]) == [("disqualify", "user_1"), ("qualify", "user_3")]


def test_rows_for_other_audiences_and_types_are_rejected(odp):
    content = (
        "type,action,a_high_confidence_identifier,audience_id,ts\n"
        "passthrough,qualify,ok_1,mine,1748851070\n"
        "passthrough,qualify,x_1,someone_else,1748851070\n"
        "other,qualify,x_2,mine,1748851070\n"
        "passthrough,maybe,x_3,mine,1748851070\n"
        "passthrough,qualify,x_4,mine,yesterday\n"
        "passthrough,qualify,ok_2,mine,1748851070\n"
        "passthrough,qualify,ok_3,mine,1748851070\n"
        "passthrough,qualify,ok_4,mine,1748851070\n"
        "passthrough,qualify,ok_5,mine,1748851070\n"
    )
    record = odp.import_file("mine.csv.gz", gz(content), feed="odp")
    assert record.status == "succeeded"
    assert odp.members("mine") == {f"ok_{i}" for i in range(1, 6)}
    assert odp.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id]) == [(3, "other_audience"), (4, "unsupported_type"),
                                             (5, "unsupported_action"), (6, "invalid_ts")]


def test_missing_column_fails_naming_it(odp):
    record = odp.import_file("m.csv.gz", gz("type,action,a_high_confidence_identifier,ts\npassthrough,qualify,u,1\n"),
                             feed="odp")
    assert record.status == "failed" and "lacks the column(s) audience_id" in record.error


def test_lists_apply_in_arrival_order_whatever_their_ts(odp):
    """ts is each row's event time, not a clock of the list: a later list whose rows carry older ts values
    still replaces the applied one (it used to be skipped as stale, and user_2 stayed a member for ever)."""
    first = ("type,action,a_high_confidence_identifier,audience_id,ts\n"
             "passthrough,qualify,user_1,seg,1748851070\npassthrough,qualify,user_2,seg,1748851999\n")
    later = "type,action,a_high_confidence_identifier,audience_id,ts\npassthrough,qualify,user_1,seg,1748851070\n"
    odp.import_file("seg.csv.gz", gz(first), feed="odp")
    record = odp.import_file("seg.csv.gz", gz(later), feed="odp")
    assert record.status == "succeeded" and record.disqualified == 1
    assert odp.members("seg") == {"user_1"}
    assert odp.query("SELECT action, user_id FROM membership_events WHERE import_id = ?", [record.import_id]) == [
        ("disqualify", "user_2")]
    # ts stays queryable: the newest per version, and each qualify event's own
    assert odp.query("SELECT list_time FROM audience_versions WHERE audience_name = 'seg' ORDER BY version") == [
        (datetime.fromtimestamp(1748851999, UTC),), (datetime.fromtimestamp(1748851070, UTC),)]
    assert odp.query("SELECT user_id, observed_at FROM membership_events WHERE action = 'qualify' ORDER BY 1") == [
        ("user_1", datetime.fromtimestamp(1748851070, UTC)), ("user_2", datetime.fromtimestamp(1748851999, UTC))]


def test_skip_older_ts_is_an_opt_in(make_env):
    """For a producer that stamps every row with the list's compute time, skip_older_ts keeps the old rule."""
    config = base_config()
    config["feeds"] = {"odp": {"format": "odp", "source": "drop/odp", "id_field": "a_high_confidence_identifier",
                               "skip_older_ts": True}}
    env = make_env(config)
    newer = SEED.replace("external_audience_1", "st").replace("1748851070", "1748900000")
    older = "type,action,a_high_confidence_identifier,audience_id,ts\npassthrough,qualify,old,st,1748851070\n"
    env.import_file("st.csv.gz", gz(newer), feed="odp")
    record = env.import_file("st.csv.gz", gz(older), feed="odp")
    assert record.status == "skipped" and "stale" in record.error
    assert env.members("st") == {"user_1", "user_2"}


def test_gzip_bomb_and_truncated_gzip_fail_cleanly(odp):
    bomb = gzip.compress(b"type,action,a_high_confidence_identifier,audience_id,ts\n" + b"0" * 50_000_000)
    assert len(bomb) < 100_000
    record = odp.import_file("bomb.csv.gz", bomb, feed="odp")
    assert record.status == "failed" and "decompresses to more than 5000000 bytes" in record.error
    rows = "".join(f"passthrough,qualify,user_{i},trunc,1748851070\n" for i in range(5000))
    whole = gz("type,action,a_high_confidence_identifier,audience_id,ts\n" + rows)
    truncated = whole[: len(whole) // 2]
    record = odp.import_file("trunc.csv.gz", truncated, feed="odp")
    assert record.status == "failed" and "truncated gzip" in record.error
    record = odp.import_file("plain.csv.gz", SEED.encode(), feed="odp")
    assert record.status == "failed" and "not a valid gzip file" in record.error
    assert odp.query("SELECT count(*) FROM members")[0][0] == 0


def test_the_sensor_picks_up_odp_files_only(odp):
    drop = odp.root / "drop" / "odp"
    (drop / "external_audience_1.csv.gz").write_bytes(gz(SEED))
    (drop / "external_audience_1.csv").write_text(SEED)  # not gzip-compressed: not an ODP import file
    [record] = odp.runner.poll("odp")
    assert record.file_name == "external_audience_1.csv.gz" and record.status == "succeeded"
    assert odp.runner.poll("odp") == []
