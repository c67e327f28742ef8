"""Incremental publishing (storage.publishing): what analysts see, assembled from a base and deltas, equals the
catalog's whole committed state after every kind of change, on both catalogs, across compactions; and every
statement that changes what they see marks its row for the next delta."""

import re

import pytest

from audience_pipeline.storage import publishing
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.lake import Lake
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def _published_columns() -> dict[str, set[str]]:
    """Per catalog table, the columns that the published records read."""
    versions, imports = publishing.RECORDS.split("UNION ALL BY NAME")
    return {"audience_versions": set(re.findall(r"\bv\.(\w+)", versions)),
            "audiences": set(re.findall(r"\ba\.(\w+)", versions)),
            "imports": {w for w in re.findall(r"\b(\w+)\b", imports.split("FROM")[0])} - {"SELECT", "AS", "record"}}


# Changes only while an import is `received`, which is never published: the delta of its next status, which
# sets dirty, carries them.
UNPUBLISHED_WHILE_RECEIVED = {"SET_AUDIENCES"}


def test_every_statement_that_changes_a_published_column_marks_its_row():
    from audience_pipeline import migrate

    published = _published_columns()
    assert {"status", "error", "audiences", "finished_at"} <= published["imports"]
    assert {"valid_to", "member_count"} <= published["audience_versions"]
    assert {"name", "status"} <= published["audiences"]
    statements = {**{f"sql.{k}": v for k, v in vars(sql).items() if isinstance(v, str)},
                  **{f"migrate.{k}": v for k, v in vars(migrate).items() if isinstance(v, str)}}
    checked = []
    for name, text in statements.items():
        for table, assignments in re.findall(r"UPDATE\s+(\w+)\s+SET\s+(.*?)(?:\bWHERE\b|$)", text, re.S):
            if table not in published:
                continue
            changed = set(re.findall(r"(\w+)\s*=", assignments))
            if not changed & published[table] or name.split(".")[1] in UNPUBLISHED_WHILE_RECEIVED:
                continue
            checked.append(name)
            assert "dirty" in changed, f"{name} changes {sorted(changed & published[table])} without dirty = true"
    assert len(checked) >= 9, checked


def _catalog_state(catalog, tmp_path) -> list[tuple]:
    """The whole committed state, straight from the catalog's tables (a full export, as the first one)."""
    import duckdb

    dest = tmp_path / "full.parquet"
    with catalog.session() as con:
        catalog.publisher._write_records(con, {t: t for t in publishing.PUBLISHED_TABLES}, dest)
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT * FROM read_parquet('{dest}') WHERE record = 'version' OR status <> 'received' "
                           "ORDER BY ALL").fetchall()
    finally:
        con.close()


def _published_state(env) -> list[tuple]:
    """The same records as the analysts' views assemble them, from the newest delta and its base."""
    from audience_pipeline.storage.views import view_statements

    lake = Lake(env.workspace.lake)
    import duckdb

    con = duckdb.connect()
    try:
        for statement in view_statements(lake):
            con.execute(statement)
        # the views' own state subquery, through a view that keeps every column
        snapshot = next(s for s in view_statements(lake) if s.startswith("CREATE VIEW audiences"))
        inner = snapshot[snapshot.index("(WITH pick"):snapshot.rindex(" WHERE record = 'version'")]
        return con.execute(f"SELECT * FROM {inner} ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_published_state_equals_the_catalog_after_every_kind_of_change(make_env, tmp_path, monkeypatch):
    monkeypatch.setattr(publishing, "COMPACT_ROWS", 6)
    config = base_config(gate={"max_removed": 1, "max_removed_share": 0.4})
    env = make_env(config)
    catalog = env.runner.service.catalog
    lake = Lake(env.workspace.lake)
    checks = []

    def check(step: str) -> None:
        expected = _catalog_state(catalog, tmp_path)
        assert _published_state(env) == expected, step
        checks.append(step)

    env.import_file("a.csv", "u1\nu2\nu3\n")
    check("first import")
    env.import_file("b.csv", "u1\n")
    env.import_file("a.csv", "u1\nu2\nu3\nu4\n")
    check("a new version closes the old one")
    held = env.import_file("a.csv", "u1\n")
    assert held.status == "held", held.error
    check("held")
    env.runner.service.reject(held.import_id)
    check("rejected")
    held = env.import_file("a.csv", "u4\n")
    env.runner.service.approve(held.import_id)
    check("approved")
    # text that CSV and Parquet must carry exactly: a comma, quotes, a newline, an empty string's neighbour
    assert catalog.add_import_warning(held.import_id, 'outbox, "x"\nfailed; \'q\'')
    check("warning")
    env.runner.service.delete_audience("repro", "b")
    check("deleted audience: its versions' records change")
    assert max(Lake.numbers(lake.base_dir(0).parent)) > 0, "no compaction happened"
    with catalog.session() as con:  # every mark cleared by the export of its change, or by a compaction
        assert [con.execute(f"SELECT count(*) FROM {t} WHERE dirty").fetchone()[0]
                for t in publishing.PUBLISHED_TABLES] == [0, 0, 0]
    assert env.query("SELECT name, status FROM audiences ORDER BY name") == [("a", "active"), ("b", "deleted")]
    assert env.query("SELECT error FROM imports WHERE import_id = ?", [held.import_id]) == [
        ('outbox, "x"\nfailed; \'q\'',)]
    assert env.query("SELECT count(*) FROM imports WHERE status = 'received'") == [(0,)]
    # a delta holds what changed since its base, never more than a compaction's worth
    import duckdb

    sizes = [duckdb.sql(f"SELECT count(*) FROM read_parquet('{lake.delta_file(n, b)}')").fetchall()[0][0]
             for n, b in lake.deltas()]
    assert max(sizes) < 6 + 4 and len({b for _, b in lake.deltas()}) >= 2
    assert len(checks) == 7


def test_an_abandoned_import_taken_over_leaves_the_published_imports(env, tmp_path):
    """Back to `received` is a change too: the published state drops the import until it finishes."""
    catalog = env.runner.service.catalog
    record = catalog.begin_import(partition_key="repro|x.csv|1", delivery="d1", feed="repro",
                                  source_uri="file:///x.csv", file_name="x.csv", sha256="a" * 64, size_bytes=1,
                                  semantics="replace", run_id=None, received_at=catalog.now())
    catalog.let_go(record.partition_key, record.delivery)
    assert [r.import_id for r in catalog.abandon_dead("repro", "test")] == [record.import_id]
    assert env.query("SELECT status FROM imports WHERE import_id = ?", [record.import_id]) == [("abandoned",)]
    catalog.hold(record.partition_key, record.delivery)
    catalog.take_over(catalog.get_import(record.import_id), None)
    assert env.query("SELECT count(*) FROM imports WHERE import_id = ?", [record.import_id]) == [(0,)]
    assert _published_state(env) == _catalog_state(catalog, tmp_path)
