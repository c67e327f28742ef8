"""The spine end to end: real Dagster instance, real DuckDB files, results read through the analyst views."""

import os

import dagster as dg
import pytest

from audience_pipeline.defs.assets import audience_files
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


# Every test here runs over the DuckDB catalog file and over a real PostgreSQL catalog.
@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def ids(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(start, start + n)]


def lines(values) -> str:
    return "\n".join(values) + "\n"


def test_first_import_then_diff(env, catalog_location):
    first = env.import_file("summer.csv", lines(ids("u", 10)))
    assert first.status == "succeeded"
    # the catalog is where the workspace says: the DuckDB file, or PostgreSQL with no such file
    assert (env.root / "catalog.duckdb").exists() == (catalog_location is None)
    if catalog_location is not None:
        import psycopg

        with psycopg.connect(catalog_location) as con:
            assert con.execute("SELECT status, members FROM imports").fetchall() == [("succeeded", 10)]
    assert (first.qualified, first.disqualified, first.members) == (10, 0, 10)
    assert env.members("summer") == set(ids("u", 10))

    second = env.import_file("summer.csv", lines(ids("u", 10, start=5)))  # u5..u14
    assert (second.qualified, second.disqualified, second.members) == (5, 5, 10)
    assert env.members("summer") == set(ids("u", 10, start=5))
    events = env.events("summer")
    assert {(a, u) for i, a, u in events if i == second.import_id} == (
        {("qualify", u) for u in ids("u", 5, start=10)} | {("disqualify", u) for u in ids("u", 5)}
    )
    [(name, feed, status, count)] = env.query("SELECT name, feed, status, member_count FROM audiences")
    assert (name, feed, status, count) == ("summer", "repro", "active", 10)
    statuses = env.query("SELECT import_id, status, qualified, disqualified FROM imports ORDER BY import_id")
    assert statuses == [(first.import_id, "succeeded", 10, 0), (second.import_id, "succeeded", 5, 5)]


def test_identical_content_is_skipped_and_revert_applies(env):
    a, b = lines(ids("a", 4)), lines(ids("b", 3))
    first = env.import_file("aud.csv", a)
    again = env.import_file("aud.csv", a)
    assert again.status == "skipped"
    assert (again.qualified, again.disqualified, again.members) == (0, 0, 4)  # the UI plots no drop
    assert env.members("aud") == set(ids("a", 4))
    env.import_file("aud.csv", b)
    assert env.members("aud") == set(ids("b", 3))
    revert = env.import_file("aud.csv", a)  # list A, then B, then A again: applies
    assert revert.status == "succeeded"
    assert revert.partition_key == first.partition_key
    assert (revert.qualified, revert.disqualified) == (4, 3)
    assert env.members("aud") == set(ids("a", 4))
    # a new audience name with the same content is a new audience, not a skip
    other = env.import_file("aud_copy.csv", a)
    assert other.status == "succeeded" and env.members("aud_copy") == set(ids("a", 4))


def test_rematerializing_a_committed_partition_is_a_noop(env):
    record = env.import_file("loyal.csv", lines(ids("x", 6)))
    events_before = env.query("SELECT count(*) FROM membership_events")[0][0]
    # A re-materialization from the UI or `dagster asset materialize` carries no delivery tags.
    job = env.runner.defs.resolve_job_def("audience_import_job")
    result = job.execute_in_process(partition_key=record.partition_key, instance=env.instance)
    assert result.success
    mats = result.asset_materializations_for_node("membership_diff")
    assert mats[-1].metadata["import_id"].value == record.import_id
    assert mats[-1].metadata["qualified"].value == 6
    assert env.query("SELECT count(*) FROM membership_events")[0][0] == events_before
    assert env.query("SELECT count(*) FROM imports")[0][0] == 1
    assert env.members("loyal") == set(ids("x", 6))


def test_bad_rows_are_counted_and_explained(env):
    content = (
        "\ufeffgood000001\r\n"  # BOM and CRLF
        "good000002\r\n"
        "\r\n"  # blank line
        "  good000003 \r\n"  # surrounding spaces are trimmed
        "good000002\r\n"  # duplicate: counted, not rejected
        "with,comma\r\n"
        + "x" * 257 + "\r\n"
        "ctl\x07char\r\n"
        "good000004\r\n"
    )
    record = env.import_file("rules.csv", content)
    assert record.status == "succeeded"
    assert env.members("rules") == {"good000001", "good000002", "good000003", "good000004"}
    assert (record.rows_total, record.rows_valid, record.duplicates) == (9, 5, 1)
    rejects = env.query(
        "SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY line_number",
        [record.import_id],
    )
    assert rejects == [(3, "blank_line"), (6, "separator"), (7, "too_long"), (8, "control_character")]


def test_invalid_utf8_lines_are_rejected_with_their_line(env):
    content = b"okid000001\nbad\xff\xfeid\nokid000002\n"
    record = env.import_file("enc.csv", content)
    assert record.status == "succeeded"
    assert env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ?", [record.import_id]) == [
        (2, "invalid_utf8")
    ]


def test_failed_imports_change_nothing(env):
    env.import_file("keep.csv", lines(ids("k", 5)))
    cases = {
        b"": "empty file",
        b"\x00\x01\x02binary\x00stuff\n": "binary content (NUL byte at line 1)",
        b"\n\n\n": "no identifiers",
        lines(["bad,one", "bad,two", "bad,three", "k000000"]).encode(): "over the feed's max_reject_ratio",
    }
    for content, reason in cases.items():
        record = env.import_file("keep.csv", content)
        assert record.status == "failed", reason
        assert reason in record.error
        assert "keep.csv" in record.error
        assert env.members("keep") == set(ids("k", 5))
    failed = env.query("SELECT count(*), count(error) FROM imports WHERE status = 'failed'")
    assert failed == [(4, 4)]
    # the ratio failure keeps its rejected rows for the analyst
    assert env.query("SELECT count(*) FROM rejected_rows WHERE reason = 'separator'")[0][0] == 3
    assert {r[0] for r in env.query("SELECT action FROM membership_events")} == {"qualify"}


def test_over_size_limit_fails(make_env):
    env = make_env(base_config(max_file_bytes=50))
    env.import_file("big.csv", lines(ids("s", 3)))
    record = env.import_file("big.csv", lines(ids("s", 20)))
    assert record.status == "failed" and "over the feed's limit of 50 bytes" in record.error
    assert env.members("big") == set(ids("s", 3))


def test_users_registry_resolves_and_counts_unmatched(make_env, tmp_path):
    registry = tmp_path / "users.csv"
    registry.write_text("user_id,email\n1,a@x.io\n2,b@x.io\n3,c@x.io\n")
    config = base_config(identifier="email")
    config["users"] = {"path": str(registry)}
    env = make_env(config)
    record = env.import_file("mail.csv", lines(["a@x.io", "b@x.io", "nobody@x.io", " c@x.io "]))
    assert record.status == "succeeded"
    assert (record.unmatched, record.members) == (1, 3)
    assert env.members("mail") == {"1", "2", "3"}
    assert env.query("SELECT line_number, reason, raw FROM rejected_rows") == [(3, "unmatched", "nobody@x.io")]
    # the registry changed: the same file resolves differently, so it is applied, not skipped
    registry.write_text("user_id,email\n1,a@x.io\n2,b@x.io\n3,c@x.io\n4,nobody@x.io\n")
    again = env.import_file("mail.csv", lines(["a@x.io", "b@x.io", "nobody@x.io", " c@x.io "]))
    assert again.status == "succeeded" and again.qualified == 1
    assert env.members("mail") == {"1", "2", "3", "4"}
    shas = env.query("SELECT DISTINCT users_sha256 FROM imports")
    assert len(shas) == 2


def test_members_as_of(env):
    first = env.import_file("hist.csv", lines(ids("h", 3)))
    second = env.import_file("hist.csv", lines(ids("h", 2, start=10)))
    (t1,) = env.query("SELECT valid_from FROM audience_versions WHERE version = ?", [first.import_id])[0]
    (t2,) = env.query("SELECT valid_from FROM audience_versions WHERE version = ?", [second.import_id])[0]
    as_of = lambda ts: {r[0] for r in env.query("SELECT user_id FROM members_as_of('hist', ?)", [ts])}  # noqa: E731
    assert as_of(t1) == set(ids("h", 3))
    assert as_of(t2) == set(ids("h", 2, start=10))
    import datetime

    assert as_of(t1 - datetime.timedelta(seconds=1)) == set()


def test_partition_key_is_sanitized_and_registered(env):
    record = env.import_file("a b (copy).csv", lines(ids("p", 2)))
    assert record.partition_key == f"repro:a_b_copy_.csv:{record.sha256[:8]}"
    assert record.partition_key in env.instance.get_dynamic_partitions(audience_files.name)
    assert env.members("a b (copy)") == set(ids("p", 2))


def test_views_work_from_another_directory(env, tmp_path):
    env.import_file("cwd.csv", lines(ids("c", 2)))
    os.chdir(tmp_path)
    assert env.members("cwd") == set(ids("c", 2))


def test_definitions_expose_assets_job_and_sensor(env):
    defs = env.runner.defs
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {"raw_audience_file", "validated_audience_file", "membership_diff", "audience",
                    "feed_deliveries/repro"}
    sensor = defs.resolve_sensor_def("repro_audience_sensor")
    assert sensor.minimum_interval_seconds == 600
    assert defs.resolve_job_def("audience_import_job").partitions_def == audience_files
    assert defs.resolve_schedule_def("audience_retention_schedule").cron_schedule == "17 3 * * *"
    assert isinstance(defs.resolve_job_def("audience_import_job"), dg.JobDefinition)


def test_asset_checks_report_rejects_and_drops(env):
    from audience_pipeline.keys import partition_key as make_key

    env.import_file("chk.csv", lines(ids("c", 10)))
    path = env.drop_file("chk.csv", lines(ids("c", 3) + ["bad,row"]))
    key = make_key("repro", "chk.csv", __import__("hashlib").sha256(path.read_bytes()).hexdigest())
    env.instance.add_dynamic_partitions("audience_files", [key])
    job = env.runner.defs.resolve_job_def("audience_import_job")
    result = job.execute_in_process(partition_key=key, instance=env.instance, tags={
        "audience_pipeline/delivery": "cli:checks", "audience_pipeline/source_uri": path.resolve().as_uri()})
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["rejected_rows_share"].passed  # 1 of 4 rows rejected: 25% > 1%
    assert evaluations["rejected_rows_share"].severity == dg.AssetCheckSeverity.WARN
    assert evaluations["unmatched_share"].passed
    assert not evaluations["no_sudden_list_drop"].passed  # 10 -> 3 members
    assert evaluations["no_sudden_list_drop"].metadata["members_before"].value == 10
