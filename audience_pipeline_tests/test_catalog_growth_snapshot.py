"""The export of the committed state, on the PostgreSQL catalog, while other nodes commit."""

import threading
import time

import pytest

from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.catalog import Catalog
from audience_pipeline.storage.lake import Lake


@pytest.fixture
def catalog_location(postgres):
    return postgres()


def _wait_for_lock_wait(con, thread: threading.Thread) -> None:
    """Until another session of this database waits on a table lock (the export, inside its reads)."""
    deadline = time.monotonic() + 120
    while True:
        con.execute("SELECT pg_stat_clear_snapshot()")  # else the activity is the transaction's first look
        if con.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]:
            return
        assert thread.is_alive(), "the export ended without reaching its reads"
        assert time.monotonic() < deadline, "the export never waited on the lock"
        time.sleep(0.05)


def test_an_import_committed_between_the_exports_reads_is_wholly_in_or_out(env):
    """Another node commits an import while an export is between its reads of the catalog's tables: the
    snapshot holds the whole import (record and versions) or none of it, never its versions without it."""
    env.import_file("a.csv", "u1\nu2\n")
    workspace = env.workspace
    committer = Catalog(workspace.catalog, Lake(workspace.lake))
    exporter = Catalog(workspace.catalog, Lake(workspace.lake))
    exporter.now()  # its session is set up before the other node's transaction locks anything
    audience = committer.find_audience("repro", "a")
    record = committer.begin_import(
        partition_key="repro|a.csv|other-node", delivery="other-node", feed="repro", source_uri="file:///x/a.csv",
        file_name="a.csv", sha256="f" * 64, size_bytes=6, semantics="replace", run_id=None,
        received_at=committer.now())
    failures: list[BaseException] = []

    def export() -> None:
        try:
            exporter.publish()
        except BaseException as exc:  # noqa: BLE001 -- reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=export)
    with committer.transaction() as con:
        # the other node's commit holds the versions table, so the export stops in front of it, after
        # having read the imports table: the commit lands between the export's reads
        con.execute("LOCK TABLE audience_versions IN ACCESS EXCLUSIVE MODE")
        con.execute(sql.CLOSE_VERSION, [committer.now(), audience])
        con.execute("INSERT INTO audience_versions (audience_id, version, import_id, sha256, member_count, "
                    "qualified, disqualified, valid_from) VALUES (?, ?, ?, ?, 1, 0, 1, now())",
                    [audience, record.import_id, record.import_id, record.sha256])
        con.execute("UPDATE imports SET status = 'succeeded', finished_at = now(), dirty = true "
                    "WHERE import_id = ?",
                    [record.import_id])
        thread.start()
        _wait_for_lock_wait(con, thread)
    thread.join(120)
    assert not thread.is_alive() and not failures, failures

    def seen() -> tuple:
        return (env.query("SELECT count(*) FROM imports WHERE import_id = ?", [record.import_id])[0][0],
                env.query("SELECT count(*) FROM audience_versions WHERE import_id = ?", [record.import_id])[0][0],
                env.query("SELECT count(*) FROM audiences WHERE name = 'a' AND version = ?", [record.import_id])[0][0])

    assert seen() in ((0, 0, 0), (1, 1, 1))
    committer.publish()
    assert seen() == (1, 1, 1)
