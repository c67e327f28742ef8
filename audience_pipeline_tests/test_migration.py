"""A workspace whose catalog was made by 0.1.0 (before liveness) keeps working after the upgrade, on both
catalogs: the new columns are added in place, its imports stay as they were, and an import it had in
progress (with no holder recorded) is taken for dead and abandoned rather than waited for."""

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
    assert columns[-6:] == ["holder", "alive_at", "applied_at", "profile", "ineligible", "resolved_by"]
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


def test_views_are_written_over_snapshots_older_than_their_columns(make_env):
    """A workspace upgraded before its next import holds only snapshots of the older shape (no list_time,
    ineligible, resolved_by): the views are still written, and read those columns as NULL."""
    from audience_pipeline.workspace_setup import prepare

    env = make_env(base_config())
    env.import_file("a.csv", "u1\n")
    snapshots = sorted(env.workspace.lake.glob("catalog/snapshots/*/snapshot.parquet"))
    for older in snapshots[:-1]:
        older.unlink()
    con = duckdb.connect()
    newest = str(snapshots[-1])
    con.execute(f"COPY (SELECT * EXCLUDE (list_time, ineligible, resolved_by) FROM read_parquet('{newest}')) "
                f"TO '{newest}.old' (FORMAT parquet)")
    con.close()
    Path(newest + ".old").replace(newest)
    env.workspace.analytics.unlink()
    assert prepare(env.workspace) is True
    assert env.query("SELECT file_name, status, ineligible, resolved_by FROM imports") == [
        ("a.csv", "succeeded", None, None)]
    assert env.query("SELECT audience_name, list_time FROM audience_versions") == [("a", None)]
