"""Processes sharing the DuckDB catalog file take turns on it, and no turn sees another's half-written file.

DuckDB's own file lock let a process, now and then, open the file while the previous holder was still
closing it (``IO Error: Could not read enough bytes``; a CI run lost an import to it). Sessions now take an
flock on ``catalog.duckdb.turn`` from before they attach the file until after they have detached it.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.backends import CatalogBusy, DuckDBBackend

SCHEMA = sql.SCHEMA


def _sessions(path: str, worker: int, count: int, errors) -> None:
    """``count`` sessions, each a transaction that appends one row and rewrites a block of others."""
    backend = DuckDBBackend(Path(path), lock_timeout=600)
    for i in range(count):
        try:
            with backend.session("CREATE TABLE IF NOT EXISTS turns (worker INTEGER, i INTEGER, pad VARCHAR)") as con:
                con.execute("BEGIN TRANSACTION")
                con.execute("INSERT INTO turns VALUES (?, ?, repeat('x', 30))", [worker, i])
                # churn enough pages that a checkpoint on close rewrites and truncates the file
                con.execute("CREATE OR REPLACE TABLE scratch AS SELECT range AS k, repeat('y', 30) AS v "
                            "FROM range(?)", [(i * 7919 + worker * 104729) % 20000 + 1])
                con.execute("COMMIT")
        except Exception as exc:  # reported: the test names every failed session
            errors.put(f"worker {worker} session {i}: {exc!r}")
    errors.put(None)


def test_processes_take_turns_and_every_session_commits(tmp_path):
    path = tmp_path / "catalog.duckdb"
    workers, count = 3, 60
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    processes = [ctx.Process(target=_sessions, args=(str(path), w, count, errors)) for w in range(workers)]
    for p in processes:
        p.start()
    failures, finished = [], 0
    while finished < workers:
        item = errors.get()
        if item is None:
            finished += 1
        else:
            failures.append(item)
    for p in processes:
        p.join()
    assert failures == []
    with DuckDBBackend(path, lock_timeout=5).session("SELECT 1") as con:
        rows = con.execute("SELECT worker, count(*), count(DISTINCT i) FROM turns GROUP BY worker ORDER BY worker")
        assert rows.fetchall() == [(w, count, count) for w in range(workers)]


HOLD_TURN = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_session_waits_while_another_process_has_the_turn(tmp_path):
    path = tmp_path / "catalog.duckdb"
    with DuckDBBackend(path, lock_timeout=5).session(SCHEMA):
        pass
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TURN, str(path) + ".turn"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogBusy, match="stayed locked by another process"):
            with DuckDBBackend(path, lock_timeout=0.3).session(SCHEMA):
                pass
    finally:
        holder.stdin.close()
        holder.wait()
    with DuckDBBackend(path, lock_timeout=5).session(SCHEMA) as con:
        assert con.execute("SELECT count(*) FROM imports").fetchone() == (0,)


def test_sessions_of_one_process_share_its_turn(tmp_path):
    """A session opened inside another on the same thread does not wait for itself (one flock per process),
    and the turn is free for another thread once the sessions have closed."""
    backend = DuckDBBackend(tmp_path / "catalog.duckdb", lock_timeout=5)
    with backend.session(SCHEMA) as outer:
        outer.execute("CREATE TABLE IF NOT EXISTS probe (v INTEGER)")
        with backend.session(SCHEMA) as inner:
            inner.execute("INSERT INTO probe VALUES (1)")
        outer.execute("INSERT INTO probe VALUES (2)")
    seen = []

    def other_thread():
        with backend.session(SCHEMA) as con:
            seen.append(con.execute("SELECT list(v ORDER BY v) FROM probe").fetchone()[0])

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [[1, 2]]
