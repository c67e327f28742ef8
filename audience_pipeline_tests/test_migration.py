"""A workspace whose catalog was made by 0.1.0 (before liveness) keeps working after the upgrade, on both
catalogs: the new columns are added in place, its imports stay as they were, and an import it had in
progress (with no holder recorded) is taken for dead and abandoned rather than waited for."""

import shutil
from pathlib import Path

import duckdb
import pytest

from audience_pipeline_tests.conftest import FIXTURES, base_config, over_both_catalogs

OLD_SCHEMA = (FIXTURES / "catalog_schema_0.1.0.sql").read_text()
OLD_IMPORT = """
INSERT INTO imports (import_id, partition_key, delivery, feed, source_uri, file_name, status, error, received_at,
                     finished_at)
VALUES (nextval('import_ids'), ?, ?, 'repro', 'file:///old/a.csv', 'a.csv', ?, ?, now(), ?)
"""


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def old_catalog(location: str | None, root: Path) -> None:
    """Write a 0.1.0 catalog: a failed import, and one in progress when the old version stopped."""
    rows = [["repro:a.csv:00000001", "old-1", "failed", "empty file", "2026-01-01T00:00:00Z"],
            ["repro:a.csv:00000002", "old-2", "received", None, None]]
    if location is None:
        root.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(root / "catalog.duckdb"))
        con.execute(OLD_SCHEMA)
        for row in rows:
            con.execute(OLD_IMPORT, row)
        con.close()
        return
    import psycopg

    with psycopg.connect(location, autocommit=True) as con:
        con.execute(OLD_SCHEMA)
        for row in rows:
            con.execute(OLD_IMPORT.replace("?", "%s"), row)


def test_a_0_1_0_catalog_is_migrated_in_place(make_env, catalog_location, tmp_path):
    old_catalog(catalog_location, tmp_path / "ws")
    env = make_env(base_config())
    catalog = env.runner.service.catalog
    with catalog.session() as con:
        columns = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'imports' "
            "ORDER BY ordinal_position").fetchall()]
    assert columns[-8:] == ["holder", "alive_at", "applied_at", "profile", "ineligible", "resolved_by", "dirty",
                            "in_delta"]
    assert "status" in columns
    with catalog.session() as con:
        sweeps = con.execute("SELECT count(*) FROM eligibility_sweeps").fetchone()
    assert sweeps == (0,)
    failed = catalog.get_import(1)
    assert (failed.status, failed.error, failed.holder, failed.ineligible, failed.resolved_by) == (
        "failed", "empty file", None, None, None)

    record = env.import_file("a.csv", "u1\nu2\n")
    assert record.import_id == 3 and record.status == "succeeded" and env.members("a") == {"u1", "u2"}
    assert record.holder is not None and f"run {record.run_id}" in record.holder
    stranded = catalog.get_import(2)
    assert stranded.status == "abandoned" and "holder (unknown) died" in stranded.error
    assert env.query("SELECT import_id, status, ineligible, resolved_by FROM imports ORDER BY 1") == [
        (1, "failed", None, None), (2, "abandoned", None, None), (3, "succeeded", 0, "{}")]

    # 0.1.0's UNIQUE (feed, name) is gone: a deleted name can be reused where the feed says so
    env.runner.service.delete_audience("repro", "a")
    env2 = make_env(base_config(reuse_deleted_names=True), name="ws")
    assert env2.import_file("a.csv", "u3\n").status == "succeeded"
    assert env2.query("SELECT status FROM audiences WHERE name = 'a' ORDER BY audience_id") == [
        ("deleted",), ("active",)]


def test_an_older_views_file_and_placeholder_are_rewritten(make_env, tmp_path):
    """The analytics file and the lake's empty placeholders of an older version are replaced when the
    workspace is prepared (by rename: an analyst's open session keeps the old file)."""
    from audience_pipeline.storage.lake import Lake
    from audience_pipeline.storage.views import VIEWS_VERSION
    from audience_pipeline.workspace_setup import prepare

    env = make_env(base_config())
    env.import_file("a.csv", "u1\n")
    analytics = env.workspace.analytics
    analytics.unlink()
    old = duckdb.connect(str(analytics))
    old.execute("CREATE VIEW audience_versions AS SELECT 1 AS audience_id")  # views of 0.1.0 had no version
    old.close()
    placeholder = Lake(env.workspace.lake).events(0)
    con = duckdb.connect()
    con.execute(f"COPY (SELECT 1::BIGINT AS audience_id LIMIT 0) TO '{placeholder}' (FORMAT parquet)")
    con.close()
    held = duckdb.connect(str(analytics), read_only=True)  # an analyst's session on the old file
    try:
        assert prepare(env.workspace) is True
        assert held.execute("SELECT count(*) FROM audience_versions").fetchone() == (1,)
    finally:
        held.close()
    assert env.query("SELECT views_version()") == [(VIEWS_VERSION,)]
    assert env.query("SELECT audience_name, list_time FROM audience_versions") == [("a", None)]
    assert env.query("SELECT user_id, observed_at FROM membership_events") == [("u1", None)]
    assert prepare(env.workspace) is False  # current: left alone


def test_a_workspace_of_whole_catalog_snapshots_is_published_as_deltas(make_env, catalog_location):
    """A workspace from before incremental publishing: a catalog without the dirty marks, and its state in
    whole-catalog snapshots (catalog/snapshots/seq=N/snapshot.parquet), which the views of then read. Preparing it
    adds the marks (every row starts marked) and publishes the whole catalog as one delta; the new views show
    what the old snapshot showed; the old snapshots go once no query can still be reading them."""
    import os

    from audience_pipeline.storage import publishing
    from audience_pipeline.storage.lake import Lake
    from audience_pipeline.workspace_setup import prepare

    env = make_env(base_config())
    env.import_file("a.csv", "u1\nu2\n")
    env.import_file("b.csv", "u3\n")
    before = (env.query("SELECT import_id, file_name, status, members FROM imports ORDER BY 1"),
              env.query("SELECT name, member_count, version FROM audiences ORDER BY 1"))
    catalog = env.runner.service.catalog
    with catalog.session() as con:
        for table in publishing.PUBLISHED_TABLES:
            for column in ("dirty", "in_delta"):
                if catalog.backend.kind == "postgresql":
                    con.execute(f"DROP INDEX IF EXISTS {table}_{column}")
                con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        con.execute("DROP TABLE publication")
        con.execute("DROP TABLE IF EXISTS catalog_schema")  # a DuckDB catalog of then had no schema version
    lake = Lake(env.workspace.lake)
    legacy = lake.root / "catalog" / "snapshots" / "seq=000000000007"
    legacy.mkdir(parents=True)
    (legacy / "snapshot.parquet").write_bytes((lake.base_file(0)).read_bytes())
    for kind in ("base", "deltas"):
        shutil.rmtree(lake.root / "catalog" / kind)
    env.workspace.analytics.unlink()

    assert prepare(env.workspace) is True
    assert (env.query("SELECT import_id, file_name, status, members FROM imports ORDER BY 1"),
            env.query("SELECT name, member_count, version FROM audiences ORDER BY 1")) == before
    with catalog.session() as con:
        assert con.execute("SELECT count(*) FROM imports WHERE dirty").fetchone() == (0,)
    assert sorted(lake.deltas()) == [(0, 0), (sorted(lake.deltas())[1][0], 0)]  # one delta: the whole catalog
    assert env.import_file("a.csv", "u1\n").status == "succeeded"
    assert env.members("a") == {"u1"}
    catalog.publisher.prune()
    assert legacy.exists()  # a query that started before the first delta may still read it
    (first, _), (second, _) = sorted(d for d in lake.deltas() if d[0] > 0)
    os.utime(lake.delta_dir(first, 0), (0, 0))
    catalog.publisher.prune()
    assert not legacy.exists() and sorted(lake.deltas()) == [(0, 0), (first, 0), (second, 0)]
    os.utime(lake.delta_dir(second, 0), (0, 0))  # the second delta has been the newest for the grace period
    catalog.publisher.prune()
    assert sorted(lake.deltas()) == [(0, 0), (second, 0)]
    assert env.members("a") == {"u1"}
