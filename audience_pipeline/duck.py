"""DuckDB connections for the heavy, per-import work (never the catalog or the analyst file)."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa

from audience_pipeline.sql import quote_literal


def work_connection(temp_dir: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that spills to ``temp_dir`` beyond ``memory_limit``."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    con.execute("SET memory_limit = ?", [memory_limit])
    con.execute("SET temp_directory = ?", [str(temp_dir)])
    con.execute("SET threads = ?", [max(1, os.cpu_count() or 1)])
    return con


# zstd level 1 rather than DuckDB's default 3: on 30-character IDs it writes 40% faster and the files come
# out no larger (measured on 4M IDs: 0.67 s and 64 MB against 1.09 s and 69 MB).
PARQUET_OPTIONS = "FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1"


def arrow_utc(field: pa.Field) -> pa.Field:
    """``field`` with instants labelled UTC: DuckDB hands TIMESTAMPTZ to Arrow in the session's zone, and a
    file written from it would read back in that zone elsewhere (polars, pandera)."""
    return field.with_type(pa.timestamp(field.type.unit, tz="UTC")) if pa.types.is_timestamp(field.type) else field


def copy_to_parquet(con: duckdb.DuckDBPyConnection, query: str, params: list | dict, dest: Path) -> None:
    """Write a query's result to ``dest`` atomically: a reader sees the old file or the whole new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    con.execute(f"COPY ({query}) TO {quote_literal(tmp)} ({PARQUET_OPTIONS})", params)
    os.replace(tmp, dest)


CANONICAL_EMPTY = """
SELECT NULL::VARCHAR AS audience_key, NULL::VARCHAR AS identifier_type, NULL::VARCHAR AS identifier,
       NULL::VARCHAR AS user_id, NULL::VARCHAR AS action, NULL::TIMESTAMPTZ AS expires_at,
       NULL::BIGINT AS expires_in, NULL::VARCHAR AS data_bag, NULL::TIMESTAMPTZ AS observed_at,
       NULL::VARCHAR AS warning,
       NULL::BIGINT AS source_line
LIMIT 0
"""


def empty_rows(dest: Path) -> None:
    """A canonical rows file with no rows (an expiry sweep applies no commands)."""
    con = duckdb.connect(":memory:")
    try:
        copy_to_parquet(con, CANONICAL_EMPTY, [], dest)
    finally:
        con.close()


def removal_rows(dest: Path, user_id: str, audiences: list[str]) -> None:
    """Canonical rows removing one user from each of these audiences."""
    con = duckdb.connect(":memory:")
    try:
        copy_to_parquet(
            con,
            """SELECT a AS audience_key, 'user_id' AS identifier_type, $u AS identifier, $u AS user_id,
                      'remove' AS action, NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
                      NULL::VARCHAR AS data_bag,
                      NULL::TIMESTAMPTZ AS observed_at, NULL::VARCHAR AS warning, 1::BIGINT AS source_line
               FROM unnest($a) t(a)""",
            {"u": user_id, "a": audiences},
            dest,
        )
    finally:
        con.close()
