"""``audience-pipeline migrate`` on a workspace made by 0.1.0: mediarithmics audiences named by segment id are
renamed ``segment_id:<id>`` (keeping their id and history) and user ids of non-primary identifier types take
their type, through imports with events; what cannot be determined is reported and left alone.

0.1.0 is written the way it stored its imports: the raw file in the archive and the validated rows it made
(audience ``coalesce(segment_technical_name, segment_id)``, user id = first identifier, type dropped), then
applied by the real diff and commit, so members, versions and events are 0.1.0's."""

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from audience_pipeline.importer import Summary
from audience_pipeline_tests.conftest import base_config, over_both_catalogs

FAR = datetime(2031, 1, 1, tzinfo=UTC)
ROWS = """
SELECT audience_key, identifier_type, identifier, identifier AS user_id, action, expires_at::TIMESTAMPTZ AS expires_at,
       NULL::BIGINT AS expires_in, data_bag, NULL::TIMESTAMPTZ AS observed_at, NULL::VARCHAR AS warning,
       source_line::BIGINT AS source_line
FROM (VALUES {values}) t(audience_key, identifier_type, identifier, action, expires_at, data_bag, source_line)
"""


@pytest.fixture
def catalog_location(request):
    """The DuckDB catalog, and PostgreSQL for the tests parametrized over both."""
    return over_both_catalogs(request) if hasattr(request, "param") else None


@pytest.fixture
def mics(make_env):
    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.9}}
    env = make_env(config)
    (env.root / "drop" / "mics").mkdir(parents=True, exist_ok=True)
    return env


def command(op: str, segment: dict, **ids) -> dict:
    return {"operation": op, "expiration_duration": 0, **segment, **ids}


def old_import(env, name: str, commands: list[dict] | str, rows: list[tuple]) -> int:
    """One file (NDJSON commands, or the text of a CSV) as 0.1.0 imported it: ``rows`` are its validated rows
    (audience_key, identifier_type, identifier, action, expires_at, data_bag, source_line), the user id being
    the identifier."""
    service = env.runner.service
    text = (commands if isinstance(commands, str) else "".join(json.dumps(c) + "\n" for c in commands)).encode()
    sha = hashlib.sha256(text).hexdigest()
    raw = service.lake.raw_path(sha)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(text)
    record = service.catalog.begin_import(
        partition_key=f"mics:{name}:{sha[:8]}", delivery=f"old:{sha}", feed="mics", source_uri=f"file:///old/{name}",
        file_name=name, sha256=sha, size_bytes=len(text), semantics="incremental", run_id=None,
        received_at=datetime.now(UTC))
    path = service.lake.validated_rows(record.import_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    values = ", ".join("(" + ", ".join("NULL" if v is None else "'" + str(v).replace("'", "''") + "'" for v in row)
                       + ")" for row in rows)
    con.execute(f"COPY ({ROWS.format(values=values)}) TO '{path}' (FORMAT parquet)")
    con.close()
    audiences = tuple(sorted({r[0] for r in rows}))
    path.with_name("summary.json").write_text(json.dumps(asdict(Summary(
        rows_total=len(rows), rows_valid=len(rows), rows_rejected=0, unmatched=0, audiences=audiences,
        users_sha256=None))))
    applied = service.apply(record)
    assert applied.status == "succeeded", applied.error
    return record.import_id


def migrate(env, *args) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("audience-pipeline")
    return subprocess.run([str(tool), "migrate", *args, "--config", str(env.workspace.path)], cwd=env.root,
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(env.root), "COLUMNS": "300"})


def audience_ids(env) -> dict[str, int]:
    return dict(env.query("SELECT name, audience_id FROM audiences WHERE feed = 'mics' AND status = 'active'"))


def members(env, name: str) -> dict[str, tuple]:
    return {u: (e, b) for u, e, b in env.query(
        "SELECT user_id, expires_at, data_bag FROM members WHERE audience_name = ?", [name])}


@pytest.mark.parametrize("catalog_location", ["duckdb", "postgresql"], indirect=True)
def test_a_0_1_0_workspace_is_migrated_with_events(mics):
    by_id, vip = {"segment_id": "123"}, {"segment_technical_name": "vip"}
    old_import(mics, "a.ndjson", [
        command("UPDATE", by_id, user_agent_id="u9", expiration_ts=int(FAR.timestamp() * 1000),
                data_bag=json.dumps({"score": 7})),
        command("UPDATE", by_id, user_account_id="acc1"),
        command("UPDATE", vip, email_hash="h1"),
        command("UPDATE", vip, compartment_id="c7", user_account_id="acc2"),
    ], [
        ("123", "user_agent_id", "u9", "add", FAR.isoformat(), '{"score": 7}', 1),
        ("123", "user_account_id", "acc1", "add", None, None, 2),
        ("vip", "email_hash", "h1", "add", None, None, 3),
        ("vip", "user_account_id", "c7:acc2", "add", None, None, 4),
    ])
    old_import(mics, "b.ndjson", [command("UPDATE", vip, user_agent_id="u7")],
               [("vip", "user_agent_id", "u7", "add", None, None, 1)])
    before = audience_ids(mics)
    assert set(before) == {"123", "vip"} and set(members(mics, "123")) == {"u9", "acc1"}
    imports_before = mics.query("SELECT count(*) FROM imports")

    dry = migrate(mics, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "'123' -> 'segment_id:123'" in dry.stdout
    assert "change 1 user id(s) in 'segment_id:123'" in dry.stdout and "'u9' -> 'user_agent_id:u9'" in dry.stdout
    assert "change 2 user id(s) in 'vip'" in dry.stdout
    assert audience_ids(mics) == before and mics.query("SELECT count(*) FROM imports") == imports_before

    done = migrate(mics)
    assert done.returncode == 0, done.stdout + done.stderr
    after = audience_ids(mics)
    # renamed in place: same audience, same history
    assert after == {"segment_id:123": before["123"], "vip": before["vip"]}
    assert mics.query("SELECT count(*) FROM audience_versions WHERE audience_name = 'segment_id:123'") == [(2,)]
    assert members(mics, "segment_id:123") == {
        "user_agent_id:u9": (FAR, '{"score": 7}'), "acc1": (None, None)}
    # the primary type stays bare, a compartment account id included
    assert set(members(mics, "vip")) == {"email_hash:h1", "c7:acc2", "user_agent_id:u7"}
    [(migration,)] = mics.query("SELECT import_id FROM imports WHERE file_name = '(migrate user ids)'")
    assert sorted(mics.query("SELECT audience_name, action, user_id FROM membership_events WHERE import_id = ?",
                             [migration])) == [
        ("segment_id:123", "disqualify", "u9"), ("segment_id:123", "qualify", "user_agent_id:u9"),
        ("vip", "disqualify", "h1"), ("vip", "disqualify", "u7"),
        ("vip", "qualify", "email_hash:h1"), ("vip", "qualify", "user_agent_id:u7"),
    ]
    assert mics.query("SELECT status, qualified, disqualified FROM imports WHERE import_id = ?", [migration]) == [
        ("succeeded", 3, 3)]
    assert mics.query("SELECT status FROM imports WHERE file_name LIKE '(migrate: rename%'") == [("succeeded",)]

    again = migrate(mics)
    assert again.returncode == 0 and "nothing to migrate" in again.stdout, again.stdout + again.stderr
    assert "left unchanged" not in again.stdout  # the migrated ids and names read as determined, not lost
    assert mics.query("SELECT count(*) FROM imports") == [(imports_before[0][0] + 2,)]

    # the current release files a command by segment id into the migrated audience, under the new user ids
    record = mics.import_file("c.ndjson", "".join(json.dumps(c) + "\n" for c in [
        command("DELETE", by_id, user_agent_id="u9"), command("UPDATE", by_id, user_agent_id="u5")]), feed="mics")
    assert record.status == "succeeded", record.error
    assert audience_ids(mics)["segment_id:123"] == before["123"]
    assert set(members(mics, "segment_id:123")) == {"acc1", "user_agent_id:u5"}
    assert "nothing to migrate" in migrate(mics).stdout


def test_a_rename_onto_a_live_audience_is_refused_and_changes_nothing(mics):
    old_import(mics, "a.ndjson", [command("UPDATE", {"segment_id": "123"}, user_account_id="acc1")],
               [("123", "user_account_id", "acc1", "add", None, None, 1)])
    # after the upgrade, before migrating: the new release already made 'segment_id:123'
    assert mics.import_file("b.ndjson", json.dumps(command("UPDATE", {"segment_id": "123"}, user_account_id="acc2"))
                            + "\n", feed="mics").status == "succeeded"
    before = audience_ids(mics), mics.query("SELECT count(*) FROM imports")
    refused = migrate(mics)
    assert refused.returncode == 1
    assert "'123' would be renamed to 'segment_id:123', which a live audience already has" in refused.stderr
    assert "nothing changed" in refused.stderr
    assert (audience_ids(mics), mics.query("SELECT count(*) FROM imports")) == before
    assert set(members(mics, "123")) == {"acc1"}


def test_what_cannot_be_determined_is_reported_and_left_alone(mics):
    by_id = {"segment_id": "123"}
    # 0.1.0 merged the technical name '123' with segment id 123, and user_account_id u1 with user_agent_id u1
    old_import(mics, "a.ndjson", [
        command("UPDATE", {"segment_technical_name": "123"}, user_account_id="u1"),
        command("UPDATE", by_id, user_agent_id="u1"),
        command("UPDATE", {"segment_technical_name": "club"}, user_account_id="u1"),
        command("UPDATE", {"segment_technical_name": "club"}, user_agent_id="u1"),
        command("UPDATE", {"segment_technical_name": "club"}, user_agent_id="u2"),
    ], [
        ("123", "user_account_id", "u1", "add", None, None, 1),
        ("123", "user_agent_id", "u1", "add", None, None, 2),
        ("club", "user_account_id", "u1", "add", None, None, 3),
        ("club", "user_agent_id", "u1", "add", None, None, 4),
        ("club", "user_agent_id", "u2", "add", None, None, 5),
    ])
    # an audience whose raw file retention removed
    pruned = old_import(mics, "p.ndjson", [command("UPDATE", {"segment_id": "456"}, user_agent_id="u3")],
                        [("456", "user_agent_id", "u3", "add", None, None, 1)])
    service = mics.runner.service
    service.lake.raw_path(service.catalog.get_import(pruned).sha256).unlink()

    done = migrate(mics)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "left unchanged, ambiguous: its lines now name 2 audiences: the name of '123'" in out
    assert "left unchanged, its lines are gone (1 import(s) pruned by retention): the name of '456'" in out
    assert "1 member(s) of 'club' (mics): 'u1'" in out and "1 member(s) of '456' (mics): 'u3'" in out
    assert set(audience_ids(mics)) == {"123", "club", "456"}
    assert set(members(mics, "club")) == {"u1", "user_agent_id:u2"}
    assert set(members(mics, "456")) == {"u3"}


def test_a_member_already_under_its_new_id_keeps_that_membership(mics):
    vip = {"segment_technical_name": "vip"}
    old_import(mics, "a.ndjson",
               [command("UPDATE", vip, user_agent_id="u9"), command("UPDATE", vip, email_hash="h1")],
               [("vip", "user_agent_id", "u9", "add", None, None, 1),
                ("vip", "email_hash", "h1", "add", None, None, 2)])
    # after the upgrade, before migrating: the new release added u9 again, under its new id, with a data bag
    record = mics.import_file("b.ndjson", json.dumps(command("UPDATE", vip, user_agent_id="u9",
                                                             data_bag=json.dumps({"new": True}))) + "\n", feed="mics")
    assert record.status == "succeeded" and set(members(mics, "vip")) == {"u9", "h1", "user_agent_id:u9"}
    [(qualified_at,)] = mics.query("SELECT qualified_at FROM members WHERE user_id = 'user_agent_id:u9'")

    done = migrate(mics)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 changed member(s) already present under the new id keep that membership" in done.stdout
    assert members(mics, "vip") == {"user_agent_id:u9": (None, '{"new": true}'), "email_hash:h1": (None, None)}
    assert mics.query("SELECT qualified_at FROM members WHERE user_id = 'user_agent_id:u9'") == [(qualified_at,)]
    [(migration,)] = mics.query("SELECT import_id FROM imports WHERE file_name = '(migrate user ids)'")
    assert sorted(mics.query("SELECT action, user_id FROM membership_events WHERE import_id = ?", [migration])) == [
        ("disqualify", "h1"), ("disqualify", "u9"), ("qualify", "email_hash:h1")]


def test_a_segment_id_the_map_names_takes_its_technical_name(mics, tmp_path):
    # the CSV form: the header is line 1
    old_import(mics, "a.csv", "operation,expiration_duration,user_account_id,segment_id\n"
                              "UPDATE,0,acc1,123\nUPDATE,0,acc2,77\n",
               [("123", "user_account_id", "acc1", "add", None, None, 2),
                ("77", "user_account_id", "acc2", "add", None, None, 3)])
    before = audience_ids(mics)
    segments = tmp_path / "segments.csv"
    segments.write_text("segment_id,technical_name\n123,gold\n")
    config = json.loads(json.dumps(base_config()))
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.9,
                                "segments": str(segments)}}
    (mics.root / "feeds.yaml").write_text(json.dumps(config))

    done = migrate(mics)
    assert done.returncode == 0, done.stdout + done.stderr
    assert audience_ids(mics) == {"gold": before["123"], "segment_id:77": before["77"]}
    assert set(members(mics, "gold")) == {"acc1"}
    assert "nothing to migrate" in migrate(mics).stdout


def test_an_import_in_progress_of_the_feed_refuses_the_migration(mics):
    old_import(mics, "a.ndjson", [command("UPDATE", {"segment_id": "123"}, user_agent_id="u9")],
               [("123", "user_agent_id", "u9", "add", None, None, 1)])
    # an import in progress when the release changed (read the old way, it would re-create '123')
    pending = mics.runner.service.catalog.begin_import(
        partition_key="mics:b.ndjson:00000000", delivery="old:b", feed="mics", source_uri="file:///old/b.ndjson",
        file_name="b.ndjson", sha256=None, size_bytes=None, semantics="incremental", run_id=None,
        received_at=datetime.now(UTC))
    refused = migrate(mics, "--dry-run")
    assert refused.returncode == 1
    assert f"import {pending.import_id} (b.ndjson) of feed 'mics' is received" in refused.stdout
    assert set(audience_ids(mics)) == {"123"} and set(members(mics, "123")) == {"u9"}
