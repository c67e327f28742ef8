"""DuckDB connections: the heavy, per-import work (never the catalog or the analyst file), and the one
in-memory instance of each process (catalog sessions attach their file to it; exports convert with it)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from audience_pipeline.sql import quote_literal

_PROCESS_DB: tuple[int, duckdb.DuckDBPyConnection] | None = None
_PROCESS_DB_LOCK = threading.Lock()


@contextmanager
def process_cursor() -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor, in UTC, on this process's own in-memory DuckDB. Creating a DuckDB instance costs ~12 ms
    (its threads, cgroup probes, built-in catalog), a cursor on one well under a millisecond; the instance
    holds no file, so it stays for the process's life. A forked child creates its own."""
    global _PROCESS_DB
    with _PROCESS_DB_LOCK:
        if _PROCESS_DB is None or _PROCESS_DB[0] != os.getpid():
            _PROCESS_DB = (os.getpid(), duckdb.connect(":memory:"))
        cursor = _PROCESS_DB[1].cursor()
    try:
        # a session setting: a cursor starts from the machine's zone, not its connection's
        cursor.execute("SET TimeZone = 'UTC'")
        yield cursor
    finally:
        cursor.close()


def work_connection(temp_dir: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that spills to ``temp_dir`` beyond ``memory_limit``."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    con.execute("SET memory_limit = ?", [memory_limit])
    con.execute("SET temp_directory = ?", [str(temp_dir)])
    con.execute("SET threads = ?", [max(1, os.cpu_count() or 1)])
    return con


_END = object()


def read_ahead(batches: Iterable[pa.RecordBatch], depth: int = 1) -> Iterator[pa.RecordBatch]:
    """``batches``, pulled by a thread of their own. A streamed DuckDB result computes only when asked for
    its next batch, and pyarrow encodes Parquet on one thread: pulled in turn, one of the two cores sits idle
    while the other writes. Both let go of the GIL, so a reader thread keeps DuckDB at work meanwhile (the
    16M churn import's diff: 21.6 s -> 18.7 s for the whole import). One batch waits at most, so memory grows
    by one batch. An error of the reader is raised here; a consumer that stops early stops the reader."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for batch in batches:
                if not hand(batch):
                    return
            hand(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            hand(exc)

    reader = threading.Thread(target=pull, name="read_ahead", daemon=True)
    reader.start()
    try:
        while (item := handoff.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


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
