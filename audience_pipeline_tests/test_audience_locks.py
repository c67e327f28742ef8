"""Per-audience commit locks in the catalog, over the DuckDB file and over PostgreSQL: an audience another
import is committing waits (then fails with the holder's name), other audiences go on, a dead holder's
lock expires with its lease, and no lock outlives the import that took it."""

from datetime import UTC, datetime, timedelta

import pytest

from audience_pipeline.storage.backends import CatalogBusy
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


@pytest.fixture
def quick(make_env):
    config = base_config()
    config["storage"].update(lock_timeout_seconds=1, lock_lease_seconds=5)
    return make_env(config)


def locks(env) -> list[tuple]:
    with env.runner.service.catalog.session() as con:
        return con.execute("SELECT audience_id, import_id FROM audience_locks ORDER BY 1").fetchall()


def test_a_held_audience_waits_while_others_commit(quick):
    first = quick.import_file("a.csv", "u1\n")
    catalog = quick.runner.service.catalog
    audience = catalog.find_audience("repro", "a")
    with catalog.audience_locks(first, {"a": audience}):
        assert locks(quick) == [(audience, first.import_id)]
        blocked = quick.import_file("a.csv", "u2\n")
        # the run failed on the lock: nothing applied, the import still open for a retry
        assert blocked.status == "received"
        assert quick.members("a") == {"u1"}
        other = quick.import_file("b.csv", "u3\n")
        assert other.status == "succeeded" and quick.members("b") == {"u3"}
        with pytest.raises(CatalogBusy, match=f"audience {audience} has been held by import {first.import_id}"):
            with catalog.audience_locks(blocked, {"a": audience}):
                pass
    assert locks(quick) == []
    # released: the waiting import goes through when its run is retried
    retried = quick.runner.run(blocked.partition_key, blocked.delivery, blocked.source_uri)
    assert retried.status == "succeeded" and quick.members("a") == {"u2"}


def test_a_later_import_waits_for_an_earlier_one_of_the_same_audience(quick):
    quick.import_file("a.csv", "u1\n")
    catalog = quick.runner.service.catalog
    earlier = catalog.begin_import(partition_key="repro:a.csv:00000000", delivery="x", feed="repro",
                                   source_uri="file:///nowhere/a.csv", file_name="a.csv", sha256=None,
                                   size_bytes=None, semantics="replace", run_id=None,
                                   received_at=datetime.now(UTC))
    # received, audiences not named yet: a later import of the feed cannot know it is not its audience
    later = quick.import_file("a.csv", "u9\n")
    assert later.status == "received" and quick.members("a") == {"u1"}
    catalog.set_audiences(earlier.import_id, ["z"])  # named: another audience, so "a" need not wait
    again = quick.runner.run(later.partition_key, later.delivery, later.source_uri)
    assert again.status == "succeeded" and quick.members("a") == {"u9"}
    assert locks(quick) == []


def test_a_dead_holders_lock_expires_with_its_lease(quick):
    quick.import_file("a.csv", "u1\n")
    catalog = quick.runner.service.catalog
    audience = catalog.find_audience("repro", "a")
    now = datetime.now(UTC)
    with catalog.session() as con:
        con.execute("INSERT INTO audience_locks VALUES (?, ?, ?, ?)",
                    [audience, 999_999, now - timedelta(seconds=10), now - timedelta(seconds=5)])
    record = quick.import_file("a.csv", "u2\n")
    assert record.status == "succeeded" and quick.members("a") == {"u2"}
    assert locks(quick) == []


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
