"""The catalog: a small DuckDB file that only runs open, briefly, and its export for analysts.

DuckDB lets one process hold a database file; runs therefore open the catalog for milliseconds at a
time and retry while another run holds it. After every change they export the committed state to
``lake/catalog/snapshot.parquet`` by atomic rename: that rename is the commit point analysts see.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from audience_pipeline import faults
from audience_pipeline.model import TERMINAL_STATUSES
from audience_pipeline.sql import quote_literal
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.lake import Lake

SNAPSHOT_GRACE_SECONDS = 600


class CommitRefused(Exception):
    """The import breaks an audience rule (limit reached, deleted name); nothing was committed."""


class CatalogBusy(RuntimeError):
    """Another process held the catalog for longer than the configured lock timeout."""


@dataclass(frozen=True)
class ImportRecord:
    import_id: int
    partition_key: str
    delivery: str
    feed: str
    source_uri: str | None
    file_name: str | None
    sha256: str | None
    size_bytes: int | None
    semantics: str | None
    status: str
    rows_total: int | None
    rows_valid: int | None
    rows_rejected: int | None
    duplicates: int | None
    unmatched: int | None
    qualified: int | None
    disqualified: int | None
    members: int | None
    noops: int | None
    warnings: int | None
    audiences: list[str] | None
    error: str | None
    users_sha256: str | None
    run_id: str | None
    received_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class CurrentVersion:
    audience_id: int
    version: int
    sha256: str
    users_sha256: str | None
    list_time: datetime | None
    member_count: int = 0


@dataclass(frozen=True)
class NewVersion:
    audience_id: int
    member_count: int
    qualified: int
    disqualified: int
    next_expiry: datetime | None = None
    list_time: datetime | None = None


@dataclass(frozen=True)
class Outcome:
    """Counts that close an import."""

    rows_total: int | None = None
    rows_valid: int | None = None
    rows_rejected: int | None = None
    duplicates: int | None = None
    unmatched: int | None = None
    qualified: int | None = None
    disqualified: int | None = None
    members: int | None = None
    noops: int | None = None
    warnings: int | None = None
    audiences: tuple[str, ...] = ()
    users_sha256: str | None = None


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class Catalog:
    def __init__(self, path: Path, lake: Lake, lock_timeout: float = 300.0):
        self.path = path
        self.lake = lake
        self.lock_timeout = lock_timeout

    @contextmanager
    def session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the catalog, waiting (with jittered backoff) while another process holds it."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() > deadline:
                    raise CatalogBusy(
                        f"catalog {self.path} stayed locked by another process for {self.lock_timeout:.0f} s"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute(sql.SCHEMA)
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.session() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- imports -----------------------------------------------------------------------------------
    @staticmethod
    def _record(cur: duckdb.DuckDBPyConnection) -> ImportRecord | None:
        row = cur.fetchone()
        if row is None:
            return None
        names = [d[0] for d in cur.description]
        return ImportRecord(**dict(zip(names, row, strict=True)))

    def find_import(self, partition_key: str, delivery: str) -> ImportRecord | None:
        with self.session() as con:
            return self._record(con.execute(sql.FIND_IMPORT, [partition_key, delivery]))

    def latest_import(self, partition_key: str) -> ImportRecord | None:
        with self.session() as con:
            return self._record(con.execute(sql.LATEST_IMPORT_OF_PARTITION, [partition_key]))

    def get_import(self, import_id: int) -> ImportRecord:
        with self.session() as con:
            record = self._record(con.execute(sql.GET_IMPORT, [import_id]))
        if record is None:
            raise KeyError(f"no import {import_id}")
        return record

    def begin_import(
        self,
        *,
        partition_key: str,
        delivery: str,
        feed: str,
        source_uri: str,
        file_name: str,
        sha256: str | None,
        size_bytes: int | None,
        semantics: str,
        run_id: str | None,
        received_at: datetime,
    ) -> ImportRecord:
        """The import of this delivery, created on first sight (get-or-create, so re-runs converge)."""
        with self.transaction() as con:
            existing = self._record(con.execute(sql.FIND_IMPORT, [partition_key, delivery]))
            if existing is not None:
                return existing
            (import_id,) = con.execute(
                sql.INSERT_IMPORT,
                [partition_key, delivery, feed, source_uri, file_name, sha256, size_bytes, semantics, run_id,
                 received_at],
            ).fetchone()
            return self._record(con.execute(sql.GET_IMPORT, [import_id]))

    def finish_import(self, import_id: int, status: str, outcome: Outcome, error: str | None = None,
                      at: datetime | None = None) -> ImportRecord:
        """Close an import that changes no audience (failed or skipped) and publish it."""
        with self.transaction() as con:
            self._finish(con, import_id, status, outcome, error, at or _now(con))
        with self.session() as con:
            self.export_snapshot(con)
            return self._record(con.execute(sql.GET_IMPORT, [import_id]))

    @staticmethod
    def _finish(con, import_id: int, status: str, outcome: Outcome, error: str | None, at: datetime) -> None:
        con.execute(
            sql.FINISH_IMPORT,
            [status, error, outcome.rows_total, outcome.rows_valid, outcome.rows_rejected, outcome.duplicates,
             outcome.unmatched, outcome.qualified, outcome.disqualified, outcome.members, outcome.noops,
             outcome.warnings, list(outcome.audiences), outcome.users_sha256, at, import_id],
        )

    # -- audiences ---------------------------------------------------------------------------------
    def audience_ids(self, feed: str, names: tuple[str, ...] | list[str]) -> dict[str, int]:
        """Stable ids for (feed, name), registering new names. An audience with no committed version
        is invisible to analysts, so registering one ahead of its first commit is harmless."""
        ids: dict[str, int] = {}
        with self.transaction() as con:
            now = _now(con)
            for name in names:
                row = con.execute(sql.FIND_AUDIENCE, [feed, name]).fetchone()
                if row is None:
                    row = con.execute(sql.INSERT_AUDIENCE, [feed, name, now]).fetchone()
                ids[name] = row[0]
        return ids

    def find_audience(self, feed: str, name: str) -> int | None:
        with self.session() as con:
            row = con.execute(sql.FIND_AUDIENCE, [feed, name]).fetchone()
        return row[0] if row else None

    def current_versions(self, audience_ids: list[int]) -> dict[int, CurrentVersion]:
        with self.session() as con:
            return self._current(con, audience_ids)

    @staticmethod
    def _current(con, audience_ids: list[int]) -> dict[int, CurrentVersion]:
        rows = con.execute(sql.CURRENT_VERSIONS, [audience_ids]).fetchall()
        return {r[0]: CurrentVersion(*r) for r in rows}

    @staticmethod
    def _skip_holds(con, record: ImportRecord, users_sha256: str | None) -> int | None:
        """The member count the file's audiences hold when they all hold this content, else None."""
        rows = con.execute(
            sql.SKIP_CANDIDATES,
            [record.feed, record.file_name, record.sha256, record.sha256, users_sha256],
        ).fetchall()
        if rows and all(holds for _, holds, _ in rows):
            return sum(count for _, _, count in rows)
        return None

    def is_applied(self, record: ImportRecord, users_sha256: str | None) -> bool:
        """True when every audience this file content was applied to still holds exactly that content,
        resolved against the same users registry: a re-delivery that would change nothing."""
        with self.session() as con:
            return self._skip_holds(con, record, users_sha256) is not None

    def skip_if_applied(self, record: ImportRecord, users_sha256: str | None) -> ImportRecord | None:
        """Atomically re-check :meth:`is_applied` and, if it holds, close the import as skipped."""
        with self.transaction() as con:
            members = self._skip_holds(con, record, users_sha256)
            if members is None:
                return None
            self._finish(con, record.import_id, "skipped",
                         Outcome(users_sha256=users_sha256, qualified=0, disqualified=0, members=members),
                         "content identical to the list currently applied", _now(con))
        with self.session() as con:
            self.export_snapshot(con)
            return self._record(con.execute(sql.GET_IMPORT, [record.import_id]))

    def commit_versions(
        self,
        record: ImportRecord,
        expected: dict[int, int | None],
        versions: list[NewVersion],
        outcome: Outcome,
        max_audiences: int | None = None,
        delete: bool = False,
    ) -> bool:
        """Apply new audience versions and close the import, in one transaction, then publish.

        ``expected`` maps each audience to the version the diff was computed against; if another run
        committed one of them in between, nothing is written and False is returned so the caller diffs
        again against the new state. The audience rules are checked in the same transaction:
        :class:`CommitRefused` when a deleted audience is named or the feed's audience limit would be
        passed. With ``delete``, the audiences are marked deleted (their empty versions are the removal).
        """
        with self.transaction() as con:
            current = self._current(con, list(expected))
            if any((current[a].version if a in current else None) != v for a, v in expected.items()):
                return False
            for name, status in con.execute(sql.AUDIENCE_STATUS, [list(expected)]).fetchall():
                if status == "deleted":
                    raise CommitRefused(f"audience {name!r} was deleted; a deleted name cannot be re-created")
            new = [a for a in expected if a not in current]
            if max_audiences is not None and new:
                (active,) = con.execute(sql.ACTIVE_AUDIENCES, [record.feed]).fetchone()
                if active + len(new) > max_audiences:
                    raise CommitRefused(f"audience limit {max_audiences} reached (feed {record.feed!r} has "
                                        f"{active}; this file would add {len(new)})")
            now = _now(con)
            if delete:
                con.execute(sql.MARK_DELETED, [list(expected)])
            for v in versions:
                con.execute(sql.CLOSE_VERSION, [now, v.audience_id])
                con.execute(
                    sql.INSERT_VERSION,
                    [v.audience_id, record.import_id, record.import_id, record.sha256 or f"import:{record.import_id}",
                     outcome.users_sha256, v.member_count, v.qualified, v.disqualified, now, v.list_time,
                     v.next_expiry],
                )
            self._finish(con, record.import_id, "succeeded", outcome, None, now)
            faults.point("commit.in_transaction")
        faults.point("commit.committed")
        with self.session() as con:
            self.export_snapshot(con)
        return True

    def pending_for(self, feed: str, names: list[str], exclude: int) -> list[tuple[int, str]]:
        """Held or waiting imports of the feed that name one of these audiences, oldest first."""
        with self.session() as con:
            return con.execute(sql.PENDING_FOR_AUDIENCES, [feed, exclude, names]).fetchall()

    def set_pending(self, import_id: int, status: str, outcome: Outcome, reason: str) -> ImportRecord:
        """Record a held, waiting or dry-run verdict (nothing applied) with its would-be counts, and publish."""
        with self.transaction() as con:
            con.execute(sql.SET_PENDING, [
                status, reason, outcome.qualified, outcome.disqualified, outcome.members, list(outcome.audiences),
                outcome.rows_total, outcome.rows_valid, outcome.rows_rejected, outcome.duplicates,
                outcome.unmatched, outcome.users_sha256, _now(con), import_id])
        with self.session() as con:
            self.export_snapshot(con)
            return self._record(con.execute(sql.GET_IMPORT, [import_id]))

    def set_status(self, import_id: int, status: str, reason: str) -> ImportRecord:
        """Move a held or waiting import to a final status without applying it (rejected, superseded)."""
        with self.transaction() as con:
            con.execute(sql.SET_STATUS, [status, reason, _now(con), import_id])
        with self.session() as con:
            self.export_snapshot(con)
            return self._record(con.execute(sql.GET_IMPORT, [import_id]))

    def memberships_of(self, user_id: str) -> list[tuple[str, str, int]]:
        """(feed, audience name, audience_id) of every current list that holds the user."""
        with self.session() as con:
            current = con.execute(
                """SELECT v.audience_id, v.version, a.feed, a.name FROM audience_versions v
                   JOIN audiences a USING (audience_id) WHERE v.valid_to IS NULL""").fetchall()
        files = {a: (feed, name) for a, v, feed, name in current if self.lake.fetch(self.lake.members_file(a, v))}
        if not files:
            return []
        paths = [str(self.lake.members_file(a, v)) for a, v, _, _ in current if a in files]
        con = duckdb.connect(":memory:")
        try:
            rows = con.execute("SELECT DISTINCT audience_id::BIGINT FROM read_parquet(?, hive_partitioning = true) "
                               "WHERE user_id = ?", [paths, user_id]).fetchall()
        finally:
            con.close()
        return sorted((files[a][0], files[a][1], a) for (a,) in rows)

    def record_erasure(self, user_sha256: str, imports: list[int], files_rewritten: int) -> None:
        with self.session() as con:
            con.execute(sql.RECORD_ERASURE, [user_sha256, imports, files_rewritten])

    def claim_notification(self, key: str) -> bool:
        """Record that the message ``key`` is being sent; False if it was already."""
        with self.session() as con:
            return con.execute(sql.CLAIM_NOTIFICATION, [key]).fetchone() is not None

    def release_notification(self, key: str) -> None:
        with self.session() as con:
            con.execute(sql.RELEASE_NOTIFICATION, [key])

    def last_delivery(self, feed: str) -> datetime | None:
        """When the feed's newest file arrived (sweeps, deletions and other internal imports aside)."""
        with self.session() as con:
            return con.execute(sql.LAST_DELIVERY, [feed]).fetchone()[0]

    def expiry_due(self, at: datetime) -> list[tuple[int, str, str]]:
        """(audience_id, feed, name) of every audience with a membership expired by ``at``."""
        with self.session() as con:
            return con.execute(sql.EXPIRY_DUE, [at]).fetchall()

    def current_member_files(self) -> set[Path]:
        with self.session() as con:
            rows = con.execute("SELECT audience_id, version FROM audience_versions WHERE valid_to IS NULL").fetchall()
        return {self.lake.members_file(a, v) for a, v in rows}

    def get_cursor(self, feed: str) -> str | None:
        with self.session() as con:
            row = con.execute(sql.GET_CURSOR, [feed]).fetchone()
        return row[0] if row else None

    def set_cursor(self, feed: str, cursor: str) -> None:
        with self.session() as con:
            con.execute(sql.SET_CURSOR, [feed, cursor])

    # -- publishing and retention ------------------------------------------------------------------
    def export_snapshot(self, con: duckdb.DuckDBPyConnection) -> None:
        """Publish the committed state as a new, numbered snapshot folder, moved into place by one atomic
        rename: the commit point analysts see. The views read the highest number.

        Called while holding the catalog, so snapshots are published in commit order.
        """
        (seq,) = con.execute("SELECT nextval('snapshot_seq')").fetchone()
        final = self.lake.snapshot_dir(seq)
        staged = self.lake.staging(f"snapshot_{seq}")
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        con.execute(f"COPY ({sql.SNAPSHOT}) TO {quote_literal(staged / 'snapshot.parquet')} (FORMAT parquet)")
        if self.lake.remote is not None:
            # on an S3 lake, the new snapshot object appearing is the commit point
            self.lake.remote.upload(staged / "snapshot.parquet", self.lake.relative(final / "snapshot.parquet"))
        faults.point("export.written")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        faults.point("export.renamed")
        self._prune_snapshots(seq)

    def _prune_snapshots(self, newest: int) -> None:
        """Drop superseded snapshots once no query can still be reading them (kept 10 minutes)."""
        cutoff = time.time() - SNAPSHOT_GRACE_SECONDS
        for folder in self.lake.snapshot_dir(newest).parent.iterdir():
            if folder.name != self.lake.snapshot_dir(newest).name and folder.stat().st_mtime < cutoff:
                self.lake.delete_tree(folder)

    def publish(self) -> None:
        with self.session() as con:
            self.export_snapshot(con)

    def prune_versions(self, retention: timedelta) -> int:
        """Delete member lists of versions closed longer ago than ``retention``; returns how many."""
        with self.session() as con:
            cutoff = _now(con) - retention
            expired = con.execute(sql.EXPIRED_VERSIONS, [cutoff]).fetchall()
        removed = 0
        for audience_id, version in expired:
            self.lake.delete_tree(self.lake.members_dir(audience_id, version))
            with self.session() as con:
                con.execute(sql.MARK_VERSION_DELETED, [audience_id, version])
            removed += 1
        return removed


def _now(con: duckdb.DuckDBPyConnection) -> datetime:
    return con.execute("SELECT now()::TIMESTAMPTZ").fetchone()[0]
