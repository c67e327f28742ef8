"""Per-audience commit locks and the order of arrival, over the DuckDB file and over PostgreSQL. A holder is
a real process: while it lives, nobody overtakes it, however long it takes (so no test here can depend on
the machine's speed); killed, it stops blocking at once, and its import shows as abandoned."""

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from audience_pipeline.storage.backends import CatalogBusy
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


@pytest.fixture
def quick(make_env):
    config = base_config()
    config["storage"].update(lock_timeout_seconds=1)
    return make_env(config)


def locks(env) -> list[tuple]:
    with env.runner.service.catalog.session() as con:
        return con.execute("SELECT audience_id, import_id FROM audience_locks ORDER BY 1").fetchall()


class Holder:
    """Another process holding ``audience`` mid-commit."""

    def __init__(self, env, audience: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "audience_pipeline_tests.holder", str(env.workspace.path), "repro", audience],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.strip().isdigit(), f"the holder did not start: {line!r}"
        self.import_id = int(line)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()  # dead and reaped: the kernel has dropped everything it held

    def finish(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def test_a_live_holder_is_never_overtaken_and_a_killed_one_stops_blocking(quick):
    quick.import_file("a.csv", "u1\n")
    holder = Holder(quick, "a")
    try:
        blocked = quick.import_file("a.csv", "u2\n")
        # the run gave up waiting: nothing applied, the import still open, the reason names the holder
        assert blocked.status == "received"
        reason = quick.runner.reasons[blocked.import_id]
        assert f"import {holder.import_id}" in reason and f"pid {holder.process.pid}" in reason
        assert quick.members("a") == {"u1"}
        other = quick.import_file("b.csv", "u3\n")
        assert other.status == "succeeded" and quick.members("b") == {"u3"}
        # still alive: a second try is refused the same way, whatever time has passed
        catalog = quick.runner.service.catalog
        audience = catalog.find_audience("repro", "a")
        with pytest.raises(CatalogBusy, match=f"pid {holder.process.pid}"):
            with catalog.audience_locks(blocked, {"a": audience}):
                pass
        assert locks(quick) == [(audience, holder.import_id)]
    finally:
        holder.kill()
    retried = quick.runner.run(blocked.partition_key, blocked.delivery, blocked.source_uri)
    assert retried.status == "succeeded" and quick.members("a") == {"u2"}
    assert locks(quick) == []
    dead = catalog.get_import(holder.import_id)
    assert dead.status == "abandoned"
    assert f"pid {holder.process.pid}" in dead.error and "died" in dead.error
    assert f"import {blocked.import_id}" in dead.error  # who found it dead
    assert quick.query("SELECT status FROM imports WHERE import_id = ?", [holder.import_id]) == [("abandoned",)]


def test_a_holder_that_finishes_lets_the_next_import_through(quick):
    quick.import_file("a.csv", "u1\n")
    holder = Holder(quick, "a")
    holder.finish()  # it ended without finishing its import: as dead as a killed one
    record = quick.import_file("a.csv", "u2\n")
    assert record.status == "succeeded" and quick.members("a") == {"u2"}
    assert quick.runner.service.catalog.get_import(holder.import_id).status == "abandoned"


def test_a_later_import_waits_for_an_earlier_one_of_the_same_audience(quick):
    quick.import_file("a.csv", "u1\n")
    catalog = quick.runner.service.catalog
    # an import this (live) process opened, its audiences not named yet: a later import of the feed
    # cannot know it is not its audience
    earlier = catalog.begin_import(partition_key="repro:a.csv:00000000", delivery="x", feed="repro",
                                   source_uri="file:///nowhere/a.csv", file_name="a.csv", sha256=None,
                                   size_bytes=None, semantics="replace", run_id=None,
                                   received_at=datetime.now(UTC))
    later = quick.import_file("a.csv", "u9\n")
    assert later.status == "received" and quick.members("a") == {"u1"}
    assert f"waits for earlier import {earlier.import_id}" in quick.runner.reasons[later.import_id]
    catalog.set_audiences(earlier.import_id, ["z"])  # named: another audience, so "a" need not wait
    again = quick.runner.run(later.partition_key, later.delivery, later.source_uri)
    assert again.status == "succeeded" and quick.members("a") == {"u9"}
    assert locks(quick) == []
    catalog.let_go(earlier.partition_key, earlier.delivery)
    assert catalog.abandon_dead("repro", "the test")[0].import_id == earlier.import_id


def test_a_diff_that_fails_is_recorded_and_blocks_nobody(quick):
    quick.import_file("a.csv", "u1\n")
    members = list((quick.root / "lake" / "members").rglob("*.parquet"))
    saved = {p: p.read_bytes() for p in members}
    for path in members:
        path.write_bytes(b"not parquet")  # the previous list cannot be read
    failed = quick.import_file("a.csv", "u2\n")
    assert failed.status == "failed" and "the diff failed" in failed.error and "a.csv" in failed.error
    assert locks(quick) == []
    for path, content in saved.items():
        path.write_bytes(content)
    # the next delivery of the audience neither waits for the failed one nor sees anything of it
    record = quick.import_file("a.csv", "u3\n")
    assert record.status == "succeeded" and quick.members("a") == {"u3"}
