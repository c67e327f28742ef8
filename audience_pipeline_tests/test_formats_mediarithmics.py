"""mediarithmics segment commands (seed 002): NDJSON and CSV, applied in line order, with expiry and data bags."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from audience_pipeline_tests.conftest import base_config


@pytest.fixture
def mics(make_env, tmp_path):
    registry = tmp_path / "users.csv"
    registry.write_text(
        "user_id,account,email,device\n"
        "U1,acc-1,Ann@Example.com ,dev-1\n"
        "U2,acc-2,bob@example.com,dev-2\n"
        "U3,c9:acc-3,carl@example.com,dev-3\n"
    )
    config = base_config()
    config["users"] = {"path": str(registry)}
    config["feeds"] = {"mics": {
        "format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.9,
        "identifiers": {"user_account_id": "account", "email_hash": {"column": "email", "hash": "sha256"},
                        "user_agent_id": "device"},
    }}
    env = make_env(config)
    (env.root / "drop" / "mics").mkdir(parents=True, exist_ok=True)
    return env


def ndjson(*commands) -> str:
    return "".join(json.dumps(c) + "\n" for c in commands)


def sha(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def test_commands_apply_in_line_order_across_segments(mics):
    text = ndjson(
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "100"},
        {"operation": "UPDATE", "expiration_duration": 0, "email_hash": sha("bob@example.com").upper(),
         "segment_technical_name": "vip"},
        {"operation": "UPDATE", "expiration_duration": 0, "user_agent_id": "dev-3", "segment_id": "100"},
        # UPDATE then DELETE then UPDATE of one user in one file: a member at the end
        {"operation": "DELETE", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "100"},
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "100",
         "data_bag": json.dumps({"score": 7})},
        # DELETE of a user never added: a counted no-op
        {"operation": "DELETE", "expiration_duration": 0, "user_agent_id": "dev-2", "segment_id": "100"},
    )
    record = mics.import_file("batch.ndjson", text, feed="mics")
    assert record.status == "succeeded"
    assert (record.qualified, record.disqualified, record.noops) == (3, 0, 1)
    assert mics.members("segment_id:100") == {"U1", "U3"}
    assert mics.members("vip") == {"U2"}  # the hashed e-mail resolved through the registry's e-mail
    [(bag,)] = mics.query("SELECT data_bag FROM members WHERE audience_name = 'segment_id:100' AND user_id = 'U1'")
    assert json.loads(bag) == {"score": 7}

    # a later file removes and refreshes; segments it does not name are untouched (incremental)
    later = ndjson({"operation": "DELETE", "expiration_duration": 0, "user_agent_id": "dev-3", "segment_id": "100"})
    record = mics.import_file("later.ndjson", later, feed="mics")
    assert (record.qualified, record.disqualified) == (0, 1)
    assert mics.members("segment_id:100") == {"U1"} and mics.members("vip") == {"U2"}


def test_compartment_qualifies_the_account(mics):
    text = ndjson({"operation": "UPDATE", "expiration_duration": 0, "compartment_id": "c9",
                   "user_account_id": "acc-3", "segment_id": "7"})
    mics.import_file("c.ndjson", text, feed="mics")
    assert mics.members("segment_id:7") == {"U3"}


def test_a_line_with_several_identifiers_is_the_first_that_resolves(mics):
    """Every identifier of a line is tried in order; two that resolve to different users reject the line."""
    text = ndjson(
        # the account is unknown, the e-mail hash is Ann's: Ann, not unmatched
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-9",
         "email_hash": sha("ann@example.com"), "segment_technical_name": "both"},
        # Bob's account, Ann's e-mail and device: which user is meant cannot be told
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-2",
         "email_hash": sha("ann@example.com"), "user_agent_id": "dev-1", "segment_technical_name": "both"},
        # Bob's account and device agree
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-2", "user_agent_id": "dev-2",
         "segment_technical_name": "both"},
    )
    record = mics.import_file("both.ndjson", text, feed="mics")
    assert mics.members("both") == {"U1", "U2"}
    assert mics.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ?", [record.import_id]) == [
        (2, "identifier_conflict")]


def test_expiry_duration_ts_and_precedence(mics):
    now = datetime.now(UTC)
    future_ms = int((now + timedelta(days=2)).timestamp() * 1000)
    past_ms = int((now - timedelta(days=1)).timestamp() * 1000)
    text = ndjson(
        {"operation": "UPDATE", "expiration_duration": 60, "user_account_id": "acc-1", "segment_id": "exp"},
        {"operation": "UPDATE", "expiration_duration": 60, "expiration_ts": future_ms, "user_account_id": "acc-2",
         "segment_id": "exp"},
        {"operation": "UPDATE", "expiration_duration": 0, "expiration_ts": past_ms, "user_agent_id": "dev-3",
         "segment_id": "exp"},
        {"operation": "UPDATE", "expiration_duration": 0, "expiration_ts": int(now.timestamp()),
         "user_agent_id": "dev-1", "segment_id": "exp"},
    )
    record = mics.import_file("exp.ndjson", text, feed="mics")
    expiries = dict(mics.query("SELECT user_id, expires_at FROM members WHERE audience_name = 'segment_id:exp'"))
    assert set(expiries) == {"U1", "U2"}  # an expiry already past is not a membership
    # a duration counts from the import's instant: when its events happen and its version starts
    assert expiries["U1"] == record.applied_at + timedelta(minutes=60)
    assert mics.query("SELECT DISTINCT event_at FROM membership_events WHERE import_id = ?", [record.import_id]) == [
        (record.applied_at,)]
    assert mics.query("SELECT valid_from FROM audience_versions WHERE import_id = ?", [record.import_id]) == [
        (record.applied_at,)]
    assert int(expiries["U2"].timestamp() * 1000) == future_ms  # expiration_ts wins over the duration
    assert mics.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ?", [record.import_id]) == [
        (4, "expiration_ts_unit")]


def test_the_last_update_replaces_expiry_and_data_bag_even_with_none(mics):
    """An UPDATE without expiry or data bag after one with them clears both: the last command decides."""
    text = ndjson(
        {"operation": "UPDATE", "expiration_duration": 60, "user_account_id": "acc-1", "segment_id": "last",
         "data_bag": json.dumps({"tier": "gold"})},
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "last"},
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-2", "segment_id": "last"},
        {"operation": "UPDATE", "expiration_duration": 30, "user_account_id": "acc-2", "segment_id": "last",
         "data_bag": json.dumps({"tier": "new"})},
    )
    record = mics.import_file("last.ndjson", text, feed="mics")
    rows = {u: (e, b) for u, e, b in mics.query(
        "SELECT user_id, expires_at, data_bag FROM members WHERE audience_name = 'segment_id:last'")}
    assert rows["U1"] == (None, None)
    assert rows["U2"] == (record.applied_at + timedelta(minutes=30), json.dumps({"tier": "new"}))


def test_bad_lines_are_rejected_with_reasons(mics):
    lines = [
        json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "b"}),
        "{not json",
        json.dumps({"operation": "UPSERT", "expiration_duration": 0, "user_account_id": "acc-1", "segment_id": "b"}),
        json.dumps({"operation": "UPDATE", "user_account_id": "acc-1", "segment_id": "b"}),
        json.dumps({"operation": "UPDATE", "expiration_duration": 0, "segment_id": "b"}),
        json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1"}),
        json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-2", "segment_id": "b",
                    "data_bag": "{broken"}),
        json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "nobody", "segment_id": "b"}),
    ]
    record = mics.import_file("bad.ndjson", "\n".join(lines) + "\n", feed="mics")
    assert record.status == "succeeded" and mics.members("segment_id:b") == {"U1"}
    assert mics.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                      [record.import_id]) == [
        (2, "invalid_json"), (3, "invalid_operation"), (4, "missing_expiration_duration"),
        (5, "missing_identifier"), (6, "missing_segment"), (7, "invalid_data_bag"), (8, "unmatched")]


def test_a_json_array_is_refused_as_not_ndjson(mics):
    text = json.dumps([{"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-1",
                        "segment_id": "arr"}], indent=2)
    record = mics.import_file("array.ndjson", text, feed="mics")
    assert record.status == "failed" and "a JSON array, not NDJSON" in record.error


def test_csv_form(mics):
    text = (
        "segment_technical_name,operation,user_account_id,expiration_duration,data_bag\n"
        "csvseg,UPDATE,acc-1,0,\"{\"\"a\"\": 1}\"\n"
        "csvseg,UPDATE,acc-2,0,\n"
        "csvseg,DELETE,acc-2,0,\n"
    )
    record = mics.import_file("cmds.csv", text, feed="mics")
    assert record.status == "succeeded" and mics.members("csvseg") == {"U1"}
    assert mics.query("SELECT data_bag FROM members WHERE audience_name = 'csvseg'") == [('{"a": 1}',)]


def test_expiry_sweep_writes_disqualify_events_at_the_expiry(mics):
    soon = datetime.now(UTC) + timedelta(minutes=5)
    text = ndjson(
        {"operation": "UPDATE", "expiration_duration": 0, "expiration_ts": int(soon.timestamp() * 1000),
         "user_account_id": "acc-1", "segment_id": "sweep"},
        {"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "acc-2", "segment_id": "sweep"},
    )
    mics.import_file("sweep.ndjson", text, feed="mics")
    service = mics.runner.service
    assert service.sweep_expired(datetime.now(UTC)) == []  # nothing due yet
    [sweep] = service.sweep_expired(soon + timedelta(seconds=1))
    assert (sweep.status, sweep.disqualified, sweep.file_name) == ("succeeded", 1, "(expiry sweep)")
    events = mics.query("SELECT user_id, action, event_at FROM membership_events WHERE import_id = ?",
                        [sweep.import_id])
    assert [(u, a) for u, a, _ in events] == [("U1", "disqualify")]
    assert abs((events[0][2] - soon).total_seconds()) < 0.001  # event_at is the membership's expires_at
    assert mics.query("SELECT count(*) FROM imports WHERE file_name = '(expiry sweep)'")[0][0] == 1
    assert service.sweep_expired(soon + timedelta(seconds=2)) == []  # swept once


def test_the_sensor_picks_up_ndjson_and_csv(mics):
    drop = mics.root / "drop" / "mics"
    (drop / "a.ndjson").write_text(ndjson({"operation": "UPDATE", "expiration_duration": 0,
                                           "user_account_id": "acc-1", "segment_id": "s"}))
    (drop / "b.csv").write_text("operation,expiration_duration,user_account_id,segment_id\nUPDATE,0,acc-2,s\n")
    (drop / "c.json").write_text("[]")
    records = mics.runner.poll("mics")
    assert sorted(r.file_name for r in records) == ["a.ndjson", "b.csv"]
    assert mics.members("segment_id:s") == {"U1", "U2"}
