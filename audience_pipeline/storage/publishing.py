"""Publishing the catalog's committed state to the lake, at a cost that does not grow with its history.

Every statement that changes a column analysts see marks its row ``dirty`` (an insert is dirty by
default; storage.statements): changed since the last export. An export that finds such rows writes the
published records of every row changed since the newest base (``dirty`` or ``in_delta``) into a new numbered
delta, whose path names the base it applies to, and moves it into place by one atomic rename: the commit
point analysts see. Its rows become ``in_delta``. A delta holds everything since its base, so the newest
delta and its base are the whole state: a query never depends on seeing an earlier delta. Once a delta
reaches COMPACT_ROWS records, the export also merges it into a new base, records that base as the one the
next delta applies to, and then clears ``in_delta``. Marks are cleared after the rename, only on rows still
as the export read them: a stop in between leaves rows marked, which the next delta publishes again.

    catalog/base/seq=<b>/base.parquet                 every published record as of number b
    catalog/deltas/seq=<n>/base=<b>/delta.parquet     the records changed since base b, as of number n

Files are never rewritten in place, and superseded ones stay GRACE_SECONDS, so a query in flight keeps
every file it planned to read.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import duckdb

from audience_pipeline import faults
from audience_pipeline.duck import process_cursor
from audience_pipeline.sql import quote_identifier, quote_literal
from audience_pipeline.storage import chunks
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.backends import Session
from audience_pipeline.storage.lake import Lake

GRACE_SECONDS = 600
COMPACT_ROWS = 2000
PUBLISHED_TABLES = sql.PUBLISHED_TABLES

# One record per import (record = 'import') and per audience version (record = 'version'), from tables
# named by the placeholders: the dirty rows for a delta, every row for a full export.
RECORDS = """
SELECT 'version' AS record, v.audience_id, a.name AS audience_name, a.feed, a.status AS audience_status,
       v.version, v.import_id, v.sha256, v.member_count, v.qualified, v.disqualified, v.valid_from, v.valid_to,
       v.list_time
FROM {audience_versions} v JOIN {audiences} a USING (audience_id)
UNION ALL BY NAME
SELECT 'import' AS record, import_id, feed, source_uri, file_name, sha256, size_bytes, semantics, status,
       rows_total, rows_valid, rows_rejected, duplicates, unmatched, qualified, disqualified, members,
       noops, warnings, audiences, error, users_sha256, run_id, received_at, finished_at, ineligible, resolved_by
FROM {imports}
"""
# A version's record carries its audience's name and status, so a changed audience republishes its versions.
SINCE_BASE = {
    "imports": "(SELECT * FROM imports WHERE dirty OR in_delta)",
    "audiences": "(SELECT * FROM audiences WHERE dirty OR in_delta OR audience_id IN "
                 "(SELECT audience_id FROM audience_versions WHERE dirty OR in_delta))",
    "audience_versions": "(SELECT * FROM audience_versions WHERE dirty OR in_delta OR audience_id IN "
                         "(SELECT audience_id FROM audiences WHERE dirty OR in_delta))",
}
# Imports below this id are all settled: none is pending, so none will write its lake files again. An import
# received within chunks.SETTLE_SECONDS is taken as unsettled too: on PostgreSQL, another node's import may hold an
# id below the highest committed one before its own insert commits.
SETTLED_BELOW = """
SELECT least(coalesce((SELECT min(import_id) FROM imports WHERE status IN ('received', 'held', 'waiting', 'abandoned')),
                      9223372036854775807),
             coalesce((SELECT min(import_id) FROM imports WHERE received_at > ?), 9223372036854775807),
             (SELECT coalesce(max(import_id), 0) + 1 FROM imports))
"""
ANY_DIRTY = ("SELECT EXISTS (SELECT 1 FROM imports WHERE dirty) OR EXISTS (SELECT 1 FROM audiences WHERE dirty) "
             "OR EXISTS (SELECT 1 FROM audience_versions WHERE dirty)")


def state_sql(base: str, delta: str) -> str:
    """The published state: the delta's records (one per key: an import, or an audience version), and the
    base's records of the keys the delta does not hold. Each argument is scanned more than once: it must name
    one file, or a materialized query. An import still ``received`` is not published (a delta records one when
    a run takes an abandoned import over)."""
    return f"""(SELECT * EXCLUDE (seq) FROM (
        SELECT b.* FROM {base} b ANTI JOIN (SELECT import_id FROM {delta} WHERE record = 'import') d USING (import_id)
        WHERE b.record = 'import'
        UNION ALL BY NAME
        SELECT b.* FROM {base} b
        ANTI JOIN (SELECT audience_id, version FROM {delta} WHERE record = 'version') d USING (audience_id, version)
        WHERE b.record = 'version'
        UNION ALL BY NAME
        SELECT * FROM {delta})
      WHERE record = 'version' OR status <> 'received')"""


def _scan(path: Path) -> str:
    return f"(SELECT * FROM read_parquet({quote_literal(path)}, hive_partitioning = true))"


class Publisher:
    """Exports of one catalog into one lake."""

    def __init__(self, backend, lake: Lake):
        self.backend = backend
        self.lake = lake

    def export(self, con: Session) -> int | None:
        """Publish what changed since the last export; returns its number, None when nothing had changed.

        Numbering, reading and renaming happen while the backend's export order is held, so a higher number
        always holds a later state: a delta's records replace those of every lower number."""
        with self.backend.export_order(con):
            return self._export_once(con)

    def _export_once(self, con: Session) -> int | None:
        if not con.execute(ANY_DIRTY).fetchone()[0]:
            return None
        # a number is taken outside the transaction: DuckDB's sequences roll back, and one must never be
        # handed out twice (a delta of a rolled-back export may already be in place)
        (seq,) = con.execute("SELECT nextval('snapshot_seq')").fetchone()
        # The records are read in one transaction that only reads (REPEATABLE READ on PostgreSQL: one state),
        # so it never conflicts with the commits going on; the marks are cleared afterwards, each only where
        # the row is still the version that was read.
        con.execute(self.backend.export_begin)
        try:
            base_seq, upto = con.execute("SELECT base_seq, chunks_upto FROM publication").fetchone()
            staged = self.lake.staging(f"delta_{seq}_{uuid.uuid4().hex}")
            staged.mkdir(parents=True)
            rows = self._write_records(con, SINCE_BASE, staged / "delta.parquet")
            read = self.backend.row_versions(con)
            final = self.lake.delta_dir(seq, base_seq)
            if self.lake.remote is not None:
                # on an S3 lake, the new delta object appearing is the commit point
                self.lake.remote.upload(staged / "delta.parquet", self.lake.relative(final / "delta.parquet"))
            faults.point("export.written")
            self.lake.move_into_place(staged, final)
            faults.point("export.renamed")
            compacted = rows >= COMPACT_ROWS
            if compacted:
                self._compact(base_seq, seq)
            settled_below = con.execute(SETTLED_BELOW, [_ago(con, chunks.SETTLE_SECONDS)]).fetchone()[0]
            if span := chunks.next_range(upto, settled_below):
                chunks.compact(self.lake, *span)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        # Each statement on its own, in this order: a later delta applies to the new base before any mark
        # says a row is in it (a stop in between leaves rows marked: published again, never lost).
        if compacted or span:
            con.execute("UPDATE publication SET base_seq = ?, chunks_upto = ?",
                        [seq if compacted else base_seq, span[1] if span else upto])
        self.backend.clear_marks(con, read, in_delta=not compacted)
        if compacted or span:
            self.prune()
        return seq

    def _write_records(self, con: Session, tables: dict[str, str], dest: Path) -> int:
        """Write the records of ``tables`` (their sources by table name) to ``dest``; returns how many."""
        if self.backend.kind == "duckdb":
            return con.execute(f"COPY ({RECORDS.format(**tables)}) TO {quote_literal(dest)} (FORMAT parquet)"
                               ).fetchone()[0]
        # PostgreSQL: each table's rows stream as CSV (COPY ... TO STDOUT) and DuckDB reads them back with the
        # catalog schema's types, into the very same records
        sources, files = {}, []
        try:
            for table, source in tables.items():
                columns = _published_columns()[table]
                csv = dest.with_name(f"{table}.csv")
                files.append(csv)
                self.backend.copy_csv(con, _pg_select(columns, source), csv)
                # no rows: DuckDB's reader refuses an empty file
                sources[table] = (f"(SELECT {_duckdb_select(columns)} FROM read_csv({quote_literal(csv)}, "
                                  f"header = false, auto_detect = false, delim = ',', quote = '\"', escape = '\"', "
                                  f"allow_quoted_nulls = false, columns = {_csv_columns(columns)}))"
                                  if csv.stat().st_size else _empty(columns))
            with process_cursor() as mem:
                return mem.execute(f"COPY ({RECORDS.format(**sources)}) TO {quote_literal(dest)} (FORMAT parquet)"
                                   ).fetchone()[0]
        finally:
            for csv in files:
                csv.unlink(missing_ok=True)

    def _compact(self, base_seq: int, seq: int) -> None:
        """Merge base ``base_seq`` and delta ``seq`` (everything since it) into base ``seq``."""
        base = self.lake.base_file(base_seq)
        if not self.lake.fetch(base):
            raise FileNotFoundError(f"catalog base {base} is missing from the lake")
        staged = self.lake.staging(f"base_{seq}_{uuid.uuid4().hex}")
        staged.mkdir(parents=True)
        mem = duckdb.connect(":memory:")
        try:
            mem.execute("SET TimeZone = 'UTC'")
            state = state_sql(_scan(base), _scan(self.lake.delta_file(seq, base_seq)))
            mem.execute(f"COPY (SELECT * FROM {state}) TO {quote_literal(staged / 'base.parquet')} (FORMAT parquet)")
        finally:
            mem.close()
        final = self.lake.base_dir(seq)
        if self.lake.remote is not None:
            self.lake.remote.upload(staged / "base.parquet", self.lake.relative(final / "base.parquet"))
        self.lake.move_into_place(staged, final)

    def prune(self) -> None:
        """Drop what no query can still be reading: a query reads the newest delta of its start and that
        delta's base, so a delta goes once a newer one has been in place GRACE_SECONDS, a base once a delta
        of a newer base has, and the snapshots of the layout before deltas once any delta has; per-import
        files go once their chunk has (storage.chunks)."""
        cutoff = time.time() - GRACE_SECONDS
        deltas = [(n, b) for n, b in self.lake.deltas() if n > 0]
        settled = [(n, b) for n, b in deltas if self.lake.delta_dir(n, b).stat().st_mtime < cutoff]
        newest_settled, settled_base = max(settled, default=(0, 0))
        folders = [self.lake.delta_dir(n, b).parent for n, b in deltas if n < newest_settled]
        folders += [self.lake.base_dir(n) for n in Lake.numbers(self.lake.base_dir(0).parent)
                    if 0 < n < settled_base]
        legacy = self.lake.root / "catalog" / "snapshots"
        folders += list(legacy.iterdir()) if legacy.is_dir() and settled else []
        for folder in folders:
            self.lake.delete_tree(folder)
        chunks.prune(self.lake, GRACE_SECONDS)

    def ensure(self) -> None:
        """The empty base and delta numbered 0, and the empty chunks, which give the views their columns on a
        fresh lake."""
        chunks.ensure(self.lake)
        for path in (self.lake.base_file(0), self.lake.delta_file(0, 0)):
            if self.lake.fetch(path):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            mem = duckdb.connect(":memory:")
            try:
                mem.execute(sql.SCHEMA)
                mem.execute(f"COPY ({RECORDS.format(**{t: t for t in PUBLISHED_TABLES})}) TO {quote_literal(tmp)} "
                            f"(FORMAT parquet)")
            finally:
                mem.close()
            os.replace(tmp, path)
            self.lake.publish(path)

    def published(self) -> bool:
        """Whether any export has been published (a delta numbered above 0)."""
        return any(n > 0 for n, _ in self.lake.deltas())


@functools.cache
def _published_columns() -> dict[str, list[tuple[str, str]]]:
    """The published tables' columns and DuckDB types, from the catalog schema (read once per process)."""
    mem = duckdb.connect(":memory:")
    try:
        mem.execute(sql.SCHEMA)
        return {table: [(n, t) for n, t, *_ in mem.execute(f"DESCRIBE {quote_identifier(table)}").fetchall()
                        if n not in ("dirty", "in_delta")]
                for table in PUBLISHED_TABLES}
    finally:
        mem.close()


def _empty(columns: list[tuple[str, str]]) -> str:
    return f"(SELECT {', '.join(f'NULL::{t} AS {quote_identifier(n)}' for n, t in columns)} LIMIT 0)"


def _pg_select(columns: list[tuple[str, str]], source: str) -> str:
    """PostgreSQL writes arrays as JSON text, which DuckDB reads back exactly."""
    exprs = [f"array_to_json({quote_identifier(n)})::text" if t.endswith("[]") else quote_identifier(n)
             for n, t in columns]
    return f"SELECT {', '.join(exprs)} FROM {source} AS rows"


def _duckdb_select(columns: list[tuple[str, str]]) -> str:
    exprs = [f"CAST(json_transform({quote_identifier(n)}, '[\"{t[:-2]}\"]') AS {t}) AS {quote_identifier(n)}"
             if t.endswith("[]") else quote_identifier(n) for n, t in columns]
    return ", ".join(exprs)


def _csv_columns(columns: list[tuple[str, str]]) -> str:
    pairs = ", ".join(f"{quote_literal(n)}: {quote_literal('VARCHAR' if t.endswith('[]') else t)}" for n, t in columns)
    return "{" + pairs + "}"


def _ago(con: Session, seconds: float):
    return con.execute("SELECT now()::TIMESTAMPTZ").fetchone()[0] - timedelta(seconds=seconds)
