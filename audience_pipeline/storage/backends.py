"""Where the catalog lives: a local DuckDB file (one machine) or PostgreSQL (several nodes).

Both speak the same statements (audience_pipeline.storage.statements, ``?`` placeholders); a backend
opens sessions, adapts placeholders, and tells which errors mean "another writer got there first".
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import duckdb

from audience_pipeline.duck import process_cursor
from audience_pipeline.sql import quote_identifier, quote_literal
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.liveness import AdvisoryLiveness, FileLiveness


class CatalogBusy(RuntimeError):
    """Another process held the catalog (or an audience) for longer than the configured lock timeout."""


class _CatalogFile:
    """One process's access to a DuckDB catalog file, attached for each session into the process's in-memory
    DuckDB (creating a DuckDB instance costs ~12 ms, attaching a file ~1 ms; an import opens ~36 sessions).

    Processes take turns with an exclusive ``flock`` on a file beside the catalog, held from before the
    attach until after the detach. flock belongs to an open file, so the process's threads take the turn
    one after another under one hold, and a session opened inside another on the same thread shares the
    attachment instead of waiting for itself.
    """

    def __init__(self, path: Path):
        self.path = path
        self.alias = quote_identifier("catalog_" + hashlib.sha256(str(path).encode()).hexdigest()[:16])
        self.lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    @contextmanager
    def cursor(self, deadline: float, busy) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise busy()
        try:
            if self.depth == 0:
                self._attach(deadline, busy)
            self.depth += 1
            try:
                with process_cursor() as cur:
                    cur.execute(f"USE {self.alias}")
                    yield cur
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self._detach()
        finally:
            self.lock.release()

    def _attach(self, deadline: float, busy) -> None:
        fd = os.open(self.path.with_name(self.path.name + ".turn"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_by(fd, deadline, busy)
            delay = 0.005
            while True:
                try:
                    _on_host(f"ATTACH {quote_literal(self.path)} AS {self.alias}")
                    break
                except duckdb.Error as exc:
                    # a process outside the turn (a `duckdb` shell, say) holds the file
                    if not _is_lock_error(exc):
                        raise
                    if time.monotonic() > deadline:
                        raise busy() from exc
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 0.2)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _detach(self) -> None:
        try:
            _on_host(f"DETACH {self.alias}")
        finally:
            os.close(self.fd)
            self.fd = None


_FILES: dict[tuple[int, Path], _CatalogFile] = {}
_FILES_LOCK = threading.Lock()


def _catalog_file(path: Path) -> _CatalogFile:
    """This process's access to ``path`` (a forked child starts with none of its parent's holds)."""
    with _FILES_LOCK:
        return _FILES.setdefault((os.getpid(), path), _CatalogFile(path))


def _on_host(statement: str) -> None:
    with process_cursor() as cur:
        cur.execute(statement)


def _flock_by(fd: int, deadline: float, busy) -> None:
    """An exclusive flock on ``fd``, polled (flock takes no timeout) until ``deadline``, then ``busy()``."""
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise busy() from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.01)


class Session(Protocol):
    def execute(self, query: str, params: Any = None) -> Any: ...


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class DuckDBBackend:
    """A DuckDB file held by one process at a time: runs attach it for milliseconds and wait while another
    holds it, so every transaction on it is serial.

    The turn is an ``flock`` on a file beside the catalog (``_CatalogFile``). DuckDB's own lock on the
    catalog file is not enough: with several processes opening and closing it in turn, one of them now and
    then read a block past the end of the file (DuckDB 2.0.0: 1 to 4 sessions in 2,400 of six processes;
    ``IO Error: Could not read enough bytes``), which failed its import.
    """

    kind = "duckdb"
    conflict_errors: tuple[type[Exception], ...] = (duckdb.ConstraintException, duckdb.TransactionException)

    def __init__(self, path: Path, lock_timeout: float):
        self.path = path
        self.lock_timeout = lock_timeout

    def describe(self) -> str:
        return str(self.path)

    def liveness(self, timeout_seconds: float) -> FileLiveness:
        """Holders' lock files beside the catalog file (every process sharing it is on this machine)."""
        return FileLiveness(self.path.with_name(self.path.name + ".holders"))

    def _busy(self) -> CatalogBusy:
        return CatalogBusy(f"catalog {self.path} stayed locked by another process for {self.lock_timeout:.0f} s")

    @contextmanager
    def session(self, schema: str) -> Iterator[Session]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _catalog_file(self.path.resolve()).cursor(time.monotonic() + self.lock_timeout, self._busy) as con:
            if _schema_version(con) != (version := _version_of(schema)):
                con.execute(schema)
                if con.execute(sql.DUCKDB_NAME_CONSTRAINT).fetchone()[0]:
                    _migrate_duckdb(con)
                    con.execute(schema)  # the rebuilt table gets the columns added since 0.1.0
                con.execute("CREATE OR REPLACE TABLE catalog_schema AS SELECT ? AS version", [version])
            yield con

    export_begin = "BEGIN TRANSACTION"

    @contextmanager
    def export_order(self, con: Session) -> Iterator[None]:
        """Holding the file already orders exports."""
        yield

    def row_versions(self, con: Session) -> None:
        """Nothing to remember: no other process changes the catalog while this one holds the file."""
        return None

    def clear_marks(self, con: Session, read: None, in_delta: bool) -> None:
        """After a compaction every marked row is in the base; else the dirty ones are now in the delta."""
        marked = "dirty" if in_delta else "dirty OR in_delta"
        for table in sql.PUBLISHED_TABLES:
            con.execute(f"UPDATE {quote_identifier(table)} SET dirty = false, in_delta = ? WHERE {marked}",
                        [in_delta])


class _PostgresSession:
    """psycopg with the statements' ``?`` placeholders (a literal ``%`` is doubled for psycopg)."""

    def __init__(self, con):
        self.con = con

    def execute(self, query: str, params: Any = None):
        if params is None:
            return self.con.execute(query)
        return self.con.execute(query.replace("%", "%%").replace("?", "%s"), params)


class PostgresBackend:
    """A PostgreSQL database shared by every node. Connection settings come from the URL and libpq's
    environment (PGPASSWORD, PGSSLMODE, ~/.pgpass ...), so no secret needs to be in the configuration."""

    kind = "postgresql"

    def __init__(self, url: str, lock_timeout: float):
        import psycopg

        self.url = url
        self.lock_timeout = lock_timeout
        self._psycopg = psycopg
        self.conflict_errors = (psycopg.errors.UniqueViolation, psycopg.errors.SerializationFailure,
                                psycopg.errors.DeadlockDetected)
        self._schema_ready = False

    def describe(self) -> str:
        """The URL without its password, for messages and logs."""
        parts = urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username + "@" if parts.username else ""
        return urlunsplit((parts.scheme, user + host, parts.path, "", ""))

    def liveness(self, timeout_seconds: float) -> AdvisoryLiveness:
        return AdvisoryLiveness(self.url, timeout_seconds)

    @contextmanager
    def session(self, schema: str) -> Iterator[Session]:
        try:
            con = self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.lock_timeout)))
        except self._psycopg.OperationalError as exc:
            raise CatalogBusy(f"catalog {self.describe()}: cannot connect: {exc}".strip()) from exc
        try:
            con.execute("SET TIME ZONE 'UTC'")
            session = _PostgresSession(con)
            if not self._schema_ready:
                version = _version_of(schema + sql.POSTGRES_MIGRATION)
                # Only a catalog of another schema version runs the statements: ALTER TABLE takes an exclusive
                # lock even when the column exists, and run processes starting while imports commit
                # deadlocked on it. Nodes starting together must not race each other's CREATE IF NOT EXISTS.
                if _pg_schema_version(con) != version:
                    with con.transaction():
                        con.execute("SELECT pg_advisory_xact_lock(7317001)")
                        con.execute(schema)
                        con.execute(sql.POSTGRES_MIGRATION)
                        con.execute("CREATE TABLE IF NOT EXISTS catalog_schema (version VARCHAR)")
                        con.execute("DELETE FROM catalog_schema")
                        con.execute("INSERT INTO catalog_schema VALUES (%s)", [version])
                self._schema_ready = True
            yield session
        finally:
            con.close()

    # The export reads the catalog in one REPEATABLE READ transaction: under READ COMMITTED each read saw the
    # catalog of its own instant, and an import committed between two of them was half in the export (its
    # versions without its import).
    export_begin = "BEGIN ISOLATION LEVEL REPEATABLE READ"

    def row_versions(self, con: Session) -> dict[str, list]:
        """The marked rows the export read, each with the version it read (``xmin``, the transaction that
        wrote that version of the row). Small: the rows changed since the newest base."""
        return {table: con.execute(query).fetchall() for table, query in sql.MARKED_ROW_VERSIONS.items()}

    def clear_marks(self, con: Session, read: dict[str, list], in_delta: bool) -> None:
        """Clear the marks of the rows read, where the row is still the version that was read, one table per
        statement: a row that a commit changed after the export's snapshot, or is changing now (locked, so
        skipped rather than waited for), stays marked for the next export. (Clearing in the reading
        transaction conflicted with those commits: under REPEATABLE READ, PostgreSQL refuses to change a row
        changed after the snapshot; and waiting for their row locks deadlocked with them.)"""
        for table, statement in sql.CLEAR_MARKS.items():
            # after a compaction every row read is in the base; else only the dirty ones change (into the delta)
            rows = [row[1:] for row in read[table] if row[0] or not in_delta]
            if rows:
                con.execute(statement, [in_delta, *(list(column) for column in zip(*rows, strict=True))])

    @contextmanager
    def export_order(self, con: Session) -> Iterator[None]:
        """Concurrent commits export concurrently: a lock makes the export numbers follow the order in
        which the exports read the catalog, so a higher number holds a later state. (PostgreSQL sequences
        never roll back, so a number is never handed out twice.) It is a session lock, taken before the
        transaction whose view of the catalog its first statement fixes: an export that waited for the
        previous one reads a catalog at least as new as the one the previous export read."""
        con.execute("SELECT pg_advisory_lock(7317002)")
        try:
            yield
        finally:
            con.execute("SELECT pg_advisory_unlock(7317002)")

    def copy_csv(self, con: _PostgresSession, query: str, dest: Path) -> None:
        """Stream a query's rows into a CSV file (COPY ... TO STDOUT), never as Python objects per row."""
        with con.con.cursor() as cur, open(dest, "wb") as out:
            with cur.copy(f"COPY ({query}) TO STDOUT (FORMAT csv)") as copy:
                for chunk in copy:
                    out.write(chunk)


def _version_of(schema: str) -> str:
    return hashlib.sha256((schema + sql.DUCKDB_MIGRATION).encode()).hexdigest()[:16]


def _schema_version(con) -> str | None:
    """The schema a DuckDB catalog was last brought to. Its statements are skipped when it is current: they
    took half of every session's time, and an import opens a few dozen sessions."""
    try:
        row = con.execute("SELECT version FROM catalog_schema").fetchone()
    except duckdb.CatalogException:
        return None
    return row[0] if row else None


def _pg_schema_version(con) -> str | None:
    """The schema a PostgreSQL catalog was last brought to (read without taking any lock a commit waits on)."""
    if con.execute("SELECT to_regclass('catalog_schema')").fetchone()[0] is None:
        return None
    row = con.execute("SELECT version FROM catalog_schema").fetchone()
    return row[0] if row else None


def _migrate_duckdb(con) -> None:
    """Drop a 0.1.0 catalog's UNIQUE (feed, name) by rebuilding the table (DuckDB cannot drop a constraint)."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(sql.DUCKDB_MIGRATION)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def backend_for(location: str | Path, lock_timeout: float) -> DuckDBBackend | PostgresBackend:
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(text, lock_timeout)
    return DuckDBBackend(Path(location), lock_timeout)
