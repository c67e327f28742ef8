"""Chunks (storage.chunks): the per-import events and rejected-rows files merged a range of imports at a time.
The views show every row once before, during and after a merge and after the per-import files are gone; a
pending import stops the merge; an erasure scrubs the merged files; a changes outbox of an import rewritten
after its merge reads the chunk."""

import hashlib
import os

import duckdb
import pytest

from audience_pipeline.storage import chunks
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def _views(env) -> tuple[list, list]:
    return (env.query("SELECT import_id, audience_name, action, user_id, source_line, source_file "
                      "FROM membership_events ORDER BY ALL"),
            env.query("SELECT import_id, line_number, reason, raw FROM rejected_rows ORDER BY ALL"))


def test_merged_files_show_every_row_once_and_a_pending_import_stops_the_merge(make_env, tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 2)
    monkeypatch.setattr(chunks, "SETTLE_SECONDS", -60)  # imports count as settled as soon as they finish
    config = base_config(gate={"max_removed": 1, "max_removed_share": 0.4})
    config["outboxes"] = [{"location": str(tmp_path / "outbox"), "mode": "changes"}]
    env = make_env(config)
    lake = env.runner.service.lake
    merged = chunks.chunks
    env.import_file("a.csv", "u1\nu2\nu3\nu4\nbad,1\n")           # 1
    assert merged(lake, "events") == [(0, 0)]
    before = _views(env)
    env.import_file("b.csv", "u1\nbad,2\n")                        # 2: its export merges 1-2, both finished
    assert merged(lake, "events") == merged(lake, "rejected") == [(0, 0), (1, 2)]
    assert _views(env)[0][:len(before[0])] == before[0]
    before = _views(env)
    env.import_file("a.csv", "u1\nu2\nu3\nu4\nu5\n")               # 3
    held = env.import_file("a.csv", "u5\n")                        # 4: held by the gate, pending
    assert held.status == "held"
    env.import_file("b.csv", "u1\nu9\n")                           # 5
    env.import_file("c.csv", "u7\n")                               # 6
    assert merged(lake, "events") == [(0, 0), (1, 2)], "a range with a pending import was merged"
    env.runner.service.reject(held.import_id)                      # settles 4: merges 3-4
    assert merged(lake, "events") == [(0, 0), (1, 2), (3, 4)]
    env.import_file("c.csv", "u7\nu8\n")                           # 7: merges 5-6 (one range per export)
    assert merged(lake, "events") == [(0, 0), (1, 2), (3, 4), (5, 6)]
    after = _views(env)
    assert after[0][:len(before[0])] == before[0] and after[1][:len(before[1])] == before[1]
    assert [r for r in after[0] if r[0] == 1][0][2:5] == ("qualify", "u1", 1)
    assert {r[0] for r in after[1]} == {1, 2} and len(after[0]) == len(set(after[0]))

    # per-import files go once their chunk has been in place for the grace period; the views do not change
    env.runner.service.catalog.publisher.prune()
    assert lake.events(1).exists()
    for lo, hi in [(1, 2), (3, 4)]:
        for kind in chunks.KINDS:
            os.utime(chunks.chunk_dir(lake, kind, lo, hi), (0, 0))
    env.runner.service.catalog.publisher.prune()
    assert not any(lake.events(n).exists() or lake.rejected(n).exists() for n in (1, 2, 3, 4))
    assert lake.events(5).exists() and lake.events(7).exists()
    assert _views(env) == after

    # the changes outbox of an import whose own file is gone reads its rows from the chunk
    first = tmp_path / "outbox" / "000000000001_a.changes.csv.gz"
    expected = first.read_bytes()
    first.unlink()
    assert env.runner.service.publish_outboxes(env.runner.service.catalog.get_import(1))
    assert first.read_bytes() == expected

    # an erasure scrubs the merged files too
    env.runner.service.forget_user("u1")
    pseudonym = "erased:" + hashlib.sha256(b"u1").hexdigest()[:16]
    files = sorted((lake.root / "events").glob("chunk=*/events.parquet"))
    assert len(files) >= 4
    for path in files:
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}') WHERE user_id = 'u1'").fetchall() == [(0,)]
    users = {r[3] for r in _views(env)[0]}
    assert "u1" not in users and pseudonym in users
