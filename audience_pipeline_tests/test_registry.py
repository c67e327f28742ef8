"""The users registry: values normalized as the files' identifiers are, every identifier of a line tried,
eligibility per feed, one lookup per registry version, and ``registry check``."""

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from audience_pipeline.config import ConfigError, load_workspace
from audience_pipeline.duck import work_connection
from audience_pipeline.users import UsersRegistry
from audience_pipeline.validate import validate_file
from audience_pipeline_tests.conftest import base_config

CLI = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "audience-pipeline"
ATTENTIVE_FILE = "acme_subscriber_segment_20261201.csv"


def registry_env(make_env, tmp_path, users_csv: str, name: str = "ws", feed_name: str = "repro", **feed):
    registry = tmp_path / f"users_{name}.csv"
    registry.write_text(users_csv)
    config = base_config()
    config["users"] = {"path": str(registry)}
    config["feeds"] = {feed_name: {"format": "repro", "source": f"drop/{feed_name}", "max_reject_ratio": 0.5, **feed}}
    env = make_env(config, name=name)
    (env.root / "drop" / feed_name).mkdir(parents=True, exist_ok=True)
    env.registry = registry
    return env


def resolved_by(record) -> dict:
    """The import's rows per identifier type that resolved them (the catalog keeps it as JSON)."""
    value = record.resolved_by
    return json.loads(value) if isinstance(value, str) else value


def lookups(env) -> list[Path]:
    return sorted((env.root / "lake" / "staging").glob("registry_lookup_*.parquet"))


def test_registry_phones_written_three_ways_match_the_files_e164(make_env, tmp_path):
    # one spelling per user (one number can be one user's only): each normalizes to the E.164 of the file's
    env = registry_env(make_env, tmp_path,
                       "user_id,phone\nu1,123-456-7890\nu2,+1 223 456 7890\nu3,(323) 456 7890\nu4,+1 212 555 0100\n",
                       feed_name="att", format="attentive", customer_domain="acme", identifier="phone")
    record = env.import_file(ATTENTIVE_FILE, "1234567890, vip\n+12234567890, vip\n13234567890, vip\n"
                                             "3105550100, vip\n", feed="att")
    assert record.status == "succeeded", record.error
    assert env.members("vip") == {"u1", "u2", "u3"}
    assert env.query("SELECT line_number, reason FROM rejected_rows") == [(4, "unmatched")]
    assert resolved_by(record) == {"phone": 3}


def test_emails_with_case_and_spaces(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, "user_id,email\nu1, Ann@Example.COM \nu2,bob@example.com\nu3,not-an-email\n",
                       identifier="email", identifier_kind="email")
    record = env.import_file("mail.csv", "ann@example.com\n  BOB@Example.com\nANN@EXAMPLE.COM\nnot-an-email\n")
    assert record.status == "succeeded", record.error
    assert env.members("mail") == {"u1", "u2"}
    # the registry's non-e-mail is in no lookup, so the file's is no match: invalid, and counted
    assert env.query("SELECT line_number, reason FROM rejected_rows") == [(4, "invalid_email")]


def test_identifier_kind_phone_on_a_repro_feed(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, 'user_id,mobile\nu1,+1 (212) 555-0100\nu2,"+33 6 12 34 56 78"\nu3,call me\n',
                       identifier="mobile", identifier_kind="phone", default_region="FR")
    record = env.import_file("sms.csv", "+1 212 555 0100\n06 12 34 56 78\nhello\n")
    assert record.status == "succeeded", record.error
    assert env.members("sms") == {"u1", "u2"}
    assert env.query("SELECT line_number, reason FROM rejected_rows") == [(3, "invalid_phone")]


ELIGIBLE_USERS = ("user_id,status,sms_opted_in\n"
                  "u1,Active ,TRUE\n"
                  "u2,inactive,true\n"
                  "u3,active,no\n"
                  "u4,active,1\n")


def test_ineligible_users_are_rejected_uncounted_until_the_registry_makes_them_eligible(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, ELIGIBLE_USERS, max_reject_ratio=0.0,
                       eligible={"status": "active", "sms_opted_in": [True, "1", "yes"]})
    text = "u1\nu2\nu3\nu4\nu5\n"
    record = env.import_file("sms.csv", text)
    # 2 ineligible and 1 unmatched of 5, with max_reject_ratio 0: none of them counts
    assert record.status == "succeeded", record.error
    assert env.members("sms") == {"u1", "u4"}
    assert (record.ineligible, record.unmatched, record.rows_rejected) == (2, 1, 3)
    assert env.query("SELECT line_number, reason FROM rejected_rows ORDER BY 1") == [
        (2, "ineligible"), (3, "ineligible"), (5, "unmatched")]

    env.registry.write_text(ELIGIBLE_USERS.replace("u2,inactive,true", "u2,active,yes"))
    again = env.import_file("sms.csv", text)
    assert again.status == "succeeded", again.error
    assert again.ineligible == 1 and again.qualified == 1
    assert env.members("sms") == {"u1", "u2", "u4"}


def test_a_missing_eligibility_column_names_the_column_and_the_registry(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, "user_id,status\nu1,active\n", eligible={"sms_opted_in": "yes"})
    record = env.import_file("sms.csv", "u1\n")
    assert record.status == "failed"
    assert "'sms_opted_in'" in record.error and str(env.registry) in record.error
    assert env.members("sms") == set()


def test_eligible_users_sql_applies_the_feeds_rule(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, ELIGIBLE_USERS, eligible={"status": "active", "sms_opted_in": [True]})
    users = UsersRegistry(env.registry, "user_id")
    con = work_connection(tmp_path / "work", "1GB")
    try:
        sql, params = users.eligible_users_sql(con, env.workspace.feed("repro"))
        assert sorted(r[0] for r in con.execute(sql, params).fetchall()) == ["u1"]
        no_rule = env.workspace.feed("repro").model_copy(update={"eligible": {}})
        everyone, params = users.eligible_users_sql(con, no_rule)
        assert sorted(r[0] for r in con.execute(everyone, params).fetchall()) == ["u1", "u2", "u3", "u4"]
    finally:
        con.close()


MICS_USERS = ("user_id,account,email,device\n"
              "U1,acc-1,ann@example.com,dev-1\n"
              "U2,acc-2,Bob@Example.com ,dev-2\n")


def sha(email: str) -> str:
    return hashlib.sha256(email.encode()).hexdigest()


def mics_line(**fields) -> str:
    return json.dumps({"operation": "UPDATE", "expiration_duration": 0, "segment_technical_name": "vip", **fields})


@pytest.fixture
def mics(make_env, tmp_path):
    return registry_env(make_env, tmp_path, MICS_USERS, feed_name="mics", format="mediarithmics",
                        max_reject_ratio=0.9,
                        identifiers={"user_account_id": "account",
                                     "email_hash": {"column": "email", "hash": "sha256"},
                                     "user_agent_id": "device"})


def test_every_identifier_of_a_mediarithmics_line_is_tried(mics):
    text = "\n".join([
        mics_line(user_account_id="acc-unknown", email_hash=sha("bob@example.com")),  # resolves by e-mail
        mics_line(user_account_id="acc-1", email_hash=sha("bob@example.com")),  # U1 and U2: conflict
        mics_line(user_account_id="acc-1", user_agent_id="dev-1"),  # both U1: no conflict
        mics_line(user_account_id="acc-unknown", user_agent_id="dev-unknown"),  # nothing resolves
    ]) + "\n"
    record = mics.import_file("batch.ndjson", text, feed="mics")
    assert record.status == "succeeded", record.error
    assert mics.members("vip") == {"U1", "U2"}
    assert mics.query("SELECT line_number, reason FROM rejected_rows ORDER BY 1") == [
        (2, "identifier_conflict"), (4, "unmatched")]
    assert resolved_by(record) == {"email_hash": 1, "user_account_id": 1}


def test_resolution_sql_on_the_validated_rows(mics, tmp_path):
    """The validated rows name the identifier that resolved each line, the first of the line that does."""
    raw = tmp_path / "batch.ndjson"
    raw.write_text("\n".join([
        mics_line(user_account_id="nobody", email_hash=sha("ann@example.com").upper(), user_agent_id="dev-1"),
        mics_line(email_hash=sha("nobody@example.com"), user_agent_id="dev-2"),
    ]) + "\n")
    work = mics.root / "lake" / "staging" / "work_test"
    con = work_connection(work, "1GB")
    try:
        result = validate_file(con, raw, raw.name, mics.workspace.feed("mics"), UsersRegistry(mics.registry, "user_id"),
                               tmp_path / "rows.parquet", tmp_path / "rejected.parquet", work, datetime.now(UTC))
        rows = con.execute("SELECT source_line, identifier_type, identifier, user_id FROM read_parquet(?) ORDER BY 1",
                           [str(tmp_path / "rows.parquet")]).fetchall()
    finally:
        con.close()
    assert rows == [(1, "email_hash", sha("ann@example.com"), "U1"), (2, "user_agent_id", "dev-2", "U2")]
    assert result.resolved_by == {"email_hash": 1, "user_agent_id": 1}
    assert (result.unmatched, result.ineligible, result.registry_invalid) == (0, 0, 0)


def test_the_lookup_is_built_once_per_registry_version(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, "user_id,email\nu1,a@x.io\nu2,b@x.io\n", identifier="email")
    assert env.import_file("a.csv", "a@x.io\n").status == "succeeded"
    [built] = lookups(env)
    identity = (built.stat().st_ino, built.read_bytes())
    assert env.import_file("b.csv", "b@x.io\n").status == "succeeded"
    assert lookups(env) == [built] and (built.stat().st_ino, built.read_bytes()) == identity
    assert env.members("b") == {"u2"}

    env.registry.write_text("user_id,email\nu1,a@x.io\nu2,b@x.io\nu3,c@x.io\n")
    assert env.import_file("c.csv", "c@x.io\n").status == "succeeded"
    assert len(lookups(env)) == 2 and env.members("c") == {"u3"}
    assert built.stat().st_ino == identity[0]


def test_registry_check_reports_values_that_do_not_normalize(make_env, tmp_path):
    env = registry_env(make_env, tmp_path, "user_id,phone\nu1,212-555-0100\nu2,call me\nu3,12\nu4,\n",
                       identifier="phone", identifier_kind="phone")

    def check():
        return subprocess.run([str(CLI), "registry", "check", "--config", str(env.workspace.path)],
                              cwd=env.root, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(env.root), "COLUMNS": "200"})

    bad = check()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "feed repro: column 'phone' (phone): 2 value(s)" in bad.stdout
    assert "line 3: 'call me' (not_a_number)" in bad.stdout and "line 4: '12' (too_short)" in bad.stdout
    assert "2 registry value(s) fail to normalize" in bad.stderr

    # imports use the lookup the check built: the good value resolves, the bad ones match nothing
    lookup_files = lookups(env)
    record = env.import_file("p.csv", "2125550100\n")
    assert record.status == "succeeded" and env.members("p") == {"u1"}
    assert lookups(env) == lookup_files
    # and the import says that some registry values match nothing
    assert env.query("SELECT error FROM imports WHERE import_id = ?", [record.import_id]) == [
        ("warning: 2 users-registry value(s) fail to normalize and match nothing (audience-pipeline registry check)",)]

    env.registry.write_text("user_id,phone\nu1,212-555-0100\n")
    good = check()
    assert good.returncode == 0, good.stdout + good.stderr
    assert "every value normalizes" in good.stdout


def test_eligible_without_a_registry_is_refused(tmp_path):
    config = base_config(eligible={"status": "active"})
    (tmp_path / "feeds.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="feed 'repro' has eligible: but the workspace has no users registry"):
        load_workspace(tmp_path / "feeds.yaml")
