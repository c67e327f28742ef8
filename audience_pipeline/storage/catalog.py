"""The catalog: the activity log, audiences and their versions, and its export for analysts.

It lives in a small DuckDB file (one machine: runs open it for milliseconds at a time and retry while
another run holds it) or in PostgreSQL (several nodes), through the same statements. After every change
what it committed is published to the lake as a new numbered delta, moved into place by atomic rename:
that rename is the commit point analysts see (storage.publishing).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from audience_pipeline import faults
from audience_pipeline.model import TERMINAL_STATUSES, ImportStatus
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.backends import CatalogBusy, Session, backend_for
from audience_pipeline.storage.lake import Lake
from audience_pipeline.storage.liveness import Holds, describe_holder, holder_key
from audience_pipeline.storage.publishing import Publisher


class CommitRefused(Exception):
    """The import breaks an audience rule (limit reached, deleted name); nothing was committed."""


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
    holder: str | None = None  # the process working on it: run, pid and host (storage.liveness)
    alive_at: datetime | None = None  # its last sign of life: the last step it recorded
    applied_at: datetime | None = None  # its one instant: events' event_at and its versions' valid_from
    profile: str | None = None  # the feed profile whose options the file was read with (Loymax)
    ineligible: int | None = None  # rows whose user the registry does not make eligible for the feed
    resolved_by: str | None = None  # JSON: identifier type -> rows it resolved through the registry

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
class SweepRecord:
    """A feed's opt-out sweep: its number, the registry version it applied, the instant it read the lists at
    (imports finished after it with another registry version call for another sweep), its import if any."""

    sweep: int
    users_sha256: str
    watermark: datetime
    import_id: int | None


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
    ineligible: int | None = None
    resolved_by: dict[str, int] | None = None

    @property
    def resolved_by_json(self) -> str | None:
        return None if self.resolved_by is None else json.dumps(self.resolved_by, sort_keys=True)


class Catalog:
    def __init__(self, location: str | Path, lake: Lake, lock_timeout: float = 300.0,
                 liveness_timeout: float = 60.0):
        """``location``: a DuckDB file path or a ``postgresql://`` URL. ``liveness_timeout``: how soon the
        PostgreSQL server ends the session (and the holds) of a node that stopped answering."""
        self.backend = backend_for(location, lock_timeout)
        self.lake = lake
        self.lock_timeout = lock_timeout
        self.liveness = self.backend.liveness(liveness_timeout)
        self.publisher = Publisher(self.backend, lake)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open the catalog (with the DuckDB file, waiting while another process holds it)."""
        with self.backend.session(sql.SCHEMA) as con:
            yield con

    @contextmanager
    def transaction(self) -> Iterator[Session]:
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
    def _record(cur) -> ImportRecord | None:
        row = cur.fetchone()
        if row is None:
            return None
        names = [d[0] for d in cur.description]
        return ImportRecord(**_known(zip(names, row, strict=True)))

    @staticmethod
    def _records(cur) -> list[ImportRecord]:
        names = [d[0] for d in cur.description]
        return [ImportRecord(**_known(zip(names, row, strict=True))) for row in cur.fetchall()]

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
        profile: str | None = None,
    ) -> ImportRecord:
        """The import of this delivery, created on first sight (get-or-create, so re-runs converge), held by
        this process until it ends; an unfinished one (abandoned, or its holder dead) is taken over.
        ``profile``: the feed profile the file is read with, recorded with it."""
        self.hold(partition_key, delivery)
        with self.transaction() as con:
            existing = self._record(con.execute(sql.FIND_IMPORT, [partition_key, delivery]))
            if existing is None:
                con.execute(
                    sql.INSERT_IMPORT,
                    [partition_key, delivery, feed, source_uri, file_name, sha256, size_bytes, semantics, run_id,
                     received_at, describe_holder(run_id), _now(con), profile],
                )
                # another node may have opened it in between: either way, this is the delivery's import
                return self._record(con.execute(sql.FIND_IMPORT, [partition_key, delivery]))
        return self.take_over(existing, run_id)

    # -- liveness of the processes working on imports ----------------------------------------------------
    def _hold_key(self, partition_key: str, delivery: str) -> tuple[str, int]:
        return self.backend.describe(), holder_key(partition_key, delivery)

    def hold(self, partition_key: str, delivery: str) -> None:
        """Make this process the holder of the delivery's import, waiting (up to the lock timeout) while a
        live process holds it. Kept until the import leaves ``received`` or :meth:`let_go`."""
        scoped = self._hold_key(partition_key, delivery)
        if Holds.has(scoped):
            return
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while (hold := self.liveness.try_hold(scoped[1])) is None:
            if time.monotonic() > deadline:
                record = self.find_import(partition_key, delivery)
                who = f" by {record.holder} (import {record.import_id}, last sign of life " \
                      f"{_iso(record.alive_at)})" if record else ""
                raise CatalogBusy(f"delivery {delivery} of {partition_key} is being imported{who} "
                                  f"(waited {self.lock_timeout:.0f} s)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        Holds.add(scoped, hold)

    def let_go(self, partition_key: str, delivery: str) -> None:
        """This process stops working on the delivery's import (done, or its run ended unfinished)."""
        Holds.release(self._hold_key(partition_key, delivery))

    def holder_alive(self, partition_key: str, delivery: str) -> bool:
        scoped = self._hold_key(partition_key, delivery)
        return Holds.has(scoped) or self.liveness.alive(scoped[1])

    def take_over(self, record: ImportRecord, run_id: str | None) -> ImportRecord:
        """Make an unfinished import this process's (it must hold the delivery): an abandoned import goes
        back to ``received``. A finished one is returned as it is."""
        if record.finished:
            return record
        self.hold(record.partition_key, record.delivery)
        with self.transaction() as con:
            con.execute(sql.TAKE_OVER, [run_id, describe_holder(run_id), _now(con), record.import_id])
        with self.session() as con:
            if record.status == ImportStatus.ABANDONED:
                self.export_snapshot(con)
            return self._record(con.execute(sql.GET_IMPORT, [record.import_id]))

    def _dead(self, row: tuple, found_by: str) -> bool:
        """Whether the holder of an import in progress (row: import_id, partition_key, delivery, holder,
        alive_at, ...) is dead; a dead one's import is marked ``abandoned`` with the reason."""
        import_id, partition_key, delivery, holder, alive_at = row[:5]
        if self.holder_alive(partition_key, delivery):
            return False
        reason = (f"abandoned: its holder ({holder or 'unknown'}) died; last sign of life {_iso(alive_at)}; "
                  f"found dead by {found_by}. A run of the same delivery takes it over")
        with self.transaction() as con:
            marked = con.execute(sql.MARK_ABANDONED + " RETURNING import_id",
                                 [reason, _now(con), import_id, holder]).fetchall()
        if marked:
            with self.session() as con:
                self.export_snapshot(con)
        return True

    def abandon_dead(self, feed: str, found_by: str) -> list[ImportRecord]:
        """Mark every import of the feed whose holder died ``abandoned`` (the sensor's sweep)."""
        with self.session() as con:
            rows = con.execute(sql.IN_PROGRESS_OF_FEED, [feed]).fetchall()
        dead = [row[0] for row in rows if self._dead(row, found_by)]
        return [self.get_import(import_id) for import_id in dead]

    def abandoned_imports(self, feed: str) -> list[ImportRecord]:
        with self.session() as con:
            return self._records(con.execute(sql.ABANDONED_OF_FEED, [feed]))

    def applied_imports(self, audience_id: int) -> list[ImportRecord]:
        with self.session() as con:
            return self._records(con.execute(sql.APPLIED_IMPORTS, [audience_id]))

    def _published(self, import_id: int) -> ImportRecord:
        """Export the snapshot after a status change; an import that left ``received`` is let go."""
        with self.session() as con:
            self.export_snapshot(con)
            record = self._record(con.execute(sql.GET_IMPORT, [import_id]))
        if record.status != ImportStatus.RECEIVED:
            self.let_go(record.partition_key, record.delivery)
        return record

    def finish_import(self, import_id: int, status: str, outcome: Outcome, error: str | None = None,
                      at: datetime | None = None) -> ImportRecord:
        """Close an import that changes no audience (failed or skipped) and publish it."""
        with self.transaction() as con:
            self._finish(con, import_id, status, outcome, error, at or _now(con))
        return self._published(import_id)

    @staticmethod
    def _finish(con, import_id: int, status: str, outcome: Outcome, error: str | None, at: datetime) -> None:
        con.execute(
            sql.FINISH_IMPORT,
            [status, error, outcome.rows_total, outcome.rows_valid, outcome.rows_rejected, outcome.duplicates,
             outcome.unmatched, outcome.qualified, outcome.disqualified, outcome.members, outcome.noops,
             outcome.warnings, list(outcome.audiences), outcome.users_sha256, outcome.ineligible,
             outcome.resolved_by_json, at, import_id],
        )

    # -- audiences ---------------------------------------------------------------------------------
    def audience_ids(self, feed: str, names: tuple[str, ...] | list[str],
                     reuse_deleted: bool = False) -> dict[str, int]:
        """Stable ids for (feed, name): the live audience of each name, registering new names. A deleted name
        resolves to its deleted audience (a commit naming it is refused), or with ``reuse_deleted`` to a new
        audience of that name. An audience with no committed version is invisible to analysts, so
        registering one ahead of its first commit is harmless."""
        ids: dict[str, int] = {}
        with self.transaction() as con:
            now = _now(con)
            for name in names:
                row = con.execute(sql.FIND_AUDIENCE, [feed, name]).fetchone()
                if row is None or (row[1] != "active" and reuse_deleted):
                    con.execute(sql.INSERT_AUDIENCE, [feed, name, now, feed, name])
                    row = con.execute(sql.FIND_AUDIENCE, [feed, name]).fetchone()
                ids[name] = row[0]
        return ids

    def find_audience(self, feed: str, name: str) -> int | None:
        """The live audience of that name."""
        with self.session() as con:
            row = con.execute(sql.FIND_AUDIENCE, [feed, name]).fetchone()
        return row[0] if row and row[1] == "active" else None

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
            [record.feed, record.file_name, record.sha256, record.profile, record.sha256, users_sha256,
             record.profile],
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
        return self._published(record.import_id)

    def import_instant(self, record: ImportRecord, audience_ids: list[int], floor: datetime | None = None) -> datetime:
        """The one instant of an import, chosen under its audience locks after the earlier imports of its
        audiences committed: the time of its events and the start of its versions (and of relative expiries).
        Recorded, so a re-run after a crash reuses it, unless another import of its audiences committed
        since (a version must never start before the one it closes). ``floor``: not before this (a sweep
        of expiries due at a given instant)."""
        with self.transaction() as con:
            (latest,) = con.execute(sql.LATEST_VALID_FROM, [audience_ids]).fetchone()
            (recorded,) = con.execute(sql.APPLIED_AT, [record.import_id]).fetchone()
            if recorded is not None and (latest is None or recorded >= latest) and (floor is None or recorded >= floor):
                return recorded
            at = max(t for t in (_now(con), latest, floor) if t is not None)
            con.execute(sql.SET_APPLIED_AT, [at, record.import_id])
        return at

    def commit_versions(
        self,
        record: ImportRecord,
        expected: dict[int, int | None],
        versions: list[NewVersion],
        outcome: Outcome,
        max_audiences: int | None = None,
        delete: bool = False,
        at: datetime | None = None,
    ) -> bool:
        """Apply new audience versions and close the import, in one transaction, then publish.

        ``expected`` maps each audience to the version the diff was computed against; if another run
        committed one of them in between, nothing is written and False is returned so the caller diffs
        again against the new state. The audience rules are checked in the same transaction:
        :class:`CommitRefused` when a deleted audience is named or the feed's audience limit would be
        passed. With ``delete``, the audiences are marked deleted (their empty versions are the removal).
        ``at``: the import's instant (:meth:`import_instant`), where its versions start and the ones they
        replace end, so versions of an audience never overlap nor leave gaps.
        """
        with self.transaction() as con:
            now = _now(con)
            at = at or now
            (status,) = con.execute(sql.OWN_STATUS, [record.import_id]).fetchone()
            if status not in (ImportStatus.RECEIVED, ImportStatus.HELD, ImportStatus.WAITING):
                return False  # found dead (a lost connection) and abandoned meanwhile: nothing is written
            owned = con.execute(sql.OWN_LOCKS, [record.import_id, list(expected)]).fetchall()
            if len(owned) != len(expected):
                return False  # the locks went with a holder found dead: diff again
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
            if delete:
                con.execute(sql.MARK_DELETED, [list(expected)])
            for v in versions:
                con.execute(sql.CLOSE_VERSION, [at, v.audience_id])
                con.execute(
                    sql.INSERT_VERSION,
                    [v.audience_id, record.import_id, record.import_id, record.sha256 or f"import:{record.import_id}",
                     outcome.users_sha256, v.member_count, v.qualified, v.disqualified, at, v.list_time,
                     v.next_expiry],
                )
            self._finish(con, record.import_id, "succeeded", outcome, None, now)
            faults.point("commit.in_transaction")
        faults.point("commit.committed")
        self._published(record.import_id)
        return True

    # -- per-audience commit locks -------------------------------------------------------------------
    def set_audiences(self, import_id: int, names: list[str]) -> None:
        """Name the audiences of an import in progress, so later imports of other audiences need not wait."""
        with self.session() as con:
            con.execute(sql.SET_AUDIENCES, [sorted(names), _now(con), import_id])

    @contextmanager
    def audience_locks(self, record: ImportRecord, audiences: dict[str, int]) -> Iterator[None]:
        """Hold these audiences for one import's diff and commit: two imports never commit the same audience
        at once, while imports of other audiences go on in parallel. An import also waits for the earlier
        imports of its feed still in progress on the same audiences (or on audiences not named yet), so
        each audience takes its imports in the order they arrived. Waits (jittered backoff) up to the lock
        timeout for live holders; an import whose holder died is marked abandoned and waits nobody."""
        self.hold(record.partition_key, record.delivery)  # an approval works on an import it did not receive
        ids = sorted(set(audiences.values()))
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            blocker = self._earlier_in_progress(record, sorted(audiences)) or self._try_lock(record.import_id, ids)
            if blocker is None:
                break
            if time.monotonic() > deadline:
                raise CatalogBusy(f"{blocker} (waited {self.lock_timeout:.0f} s)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            with self.session() as con:
                con.execute(sql.RELEASE_LOCKS, [record.import_id])

    def _earlier_in_progress(self, record: ImportRecord, names: list[str]) -> str | None:
        with self.session() as con:
            rows = con.execute(sql.EARLIER_IN_PROGRESS, [record.feed, record.import_id, names]).fetchall()
        for row in rows:
            if not self._dead(row, f"import {record.import_id}"):
                import_id, _, _, holder, alive_at, received_at = row
                return (f"import {record.import_id} waits for earlier import {import_id} of the same audiences "
                        f"(received {_iso(received_at)}, held by {holder or 'unknown'}, last sign of life "
                        f"{_iso(alive_at)})")
        return None

    def _try_lock(self, import_id: int, ids: list[int]) -> str | None:
        """Take every lock or none: why not, or None once they are all this import's."""
        if not ids:
            return None
        with self.session() as con:
            seen = con.execute(sql.LOCK_HOLDERS, [ids, import_id]).fetchall()
        for _, holder_import, acquired_at, *row in seen:
            if self._dead((holder_import, *row), f"import {import_id}"):
                with self.session() as con:
                    con.execute(sql.DROP_DEAD_LOCKS, [holder_import, acquired_at])
        try:
            with self.transaction() as con:
                now = _now(con)
                holders = con.execute(sql.LOCK_HOLDERS, [ids, import_id]).fetchall()
                if not holders:
                    for audience_id in ids:  # in id order, so that two imports never wait on each other
                        con.execute(sql.TAKE_LOCK, [audience_id, import_id, now, now])
                    # with PostgreSQL, a concurrent taker may have won a row between the check and the insert
                    holders = con.execute(sql.LOCK_HOLDERS, [ids, import_id]).fetchall()
                    if holders:
                        raise _LostRace(holders)
        except _LostRace as lost:
            holders = lost.holders
        except self.backend.conflict_errors:
            return f"import {import_id} lost a race for one of audiences {ids}"
        if not holders:
            return None
        audience, holder_import, since, _, _, holder, _ = holders[0]
        return (f"audience {audience} has been held by import {holder_import} ({holder or 'unknown'}) "
                f"since {_iso(since)}")

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
                outcome.unmatched, outcome.users_sha256, outcome.ineligible, outcome.resolved_by_json, _now(con),
                import_id])
        return self._published(import_id)

    def set_status(self, import_id: int, status: str, reason: str) -> ImportRecord:
        """Move a held or waiting import to a final status without applying it (rejected, superseded)."""
        with self.transaction() as con:
            con.execute(sql.SET_STATUS, [status, reason, _now(con), import_id])
        return self._published(import_id)

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

    # -- opt-out sweeps (audience_pipeline.eligibility) ----------------------------------------------------
    def now(self) -> datetime:
        """The catalog's clock (the one finished_at and the other recorded instants come from)."""
        with self.session() as con:
            return _now(con)

    def feed_current_versions(self, feed: str) -> list[tuple[int, str, int, datetime | None]]:
        """(audience_id, name, version, list_time) of the current non-empty list of each live audience."""
        with self.session() as con:
            return con.execute(sql.FEED_CURRENT_VERSIONS, [feed]).fetchall()

    def last_sweep(self, feed: str) -> SweepRecord | None:
        with self.session() as con:
            row = con.execute(sql.LAST_SWEEP, [feed]).fetchone()
        return SweepRecord(*row) if row else None

    def record_sweep(self, feed: str, sweep: int, users_sha256: str, import_id: int | None,
                     watermark: datetime) -> None:
        """Record a feed's opt-out sweep (once: a concurrent run of the same sweep records nothing more)."""
        with self.session() as con:
            con.execute(sql.RECORD_SWEEP, [feed, sweep, users_sha256, import_id, watermark])

    def stale_since_sweep(self, feed: str, watermark: datetime, users_sha256: str, any_registry: bool) -> int:
        """How many imports of the feed added members after ``watermark`` resolved against another registry
        (with ``any_registry``, against any)."""
        with self.session() as con:
            return con.execute(sql.STALE_SINCE_SWEEP, [feed, watermark, any_registry, users_sha256]).fetchone()[0]

    def import_versions(self, import_id: int) -> list[tuple[str, int, int, int]]:
        """(audience name, members before, members after, removed) of each audience the import changed."""
        with self.session() as con:
            return con.execute(sql.IMPORT_VERSIONS, [import_id]).fetchall()

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
    def export_snapshot(self, con: Session) -> None:
        """Publish what the catalog committed since the last export (storage.publishing)."""
        self.publisher.export(con)

    @contextmanager
    def publishing_paused(self) -> Iterator[None]:
        """Hold the export order, so that no export (nor its compactions) runs meanwhile."""
        with self.session() as con, self.backend.export_order(con):
            yield

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

    def add_import_warning(self, import_id: int, text: str) -> bool:
        """Record a warning on a succeeded import (it stays succeeded): the text joins its ``error`` column,
        once, and is published to the activity log. False when it was there already."""
        with self.transaction() as con:
            added = con.execute(sql.ADD_IMPORT_WARNING, [text, import_id, text]).fetchall()
        if added:
            with self.session() as con:
                self.export_snapshot(con)
        return bool(added)


class _LostRace(Exception):
    def __init__(self, holders: list[tuple]):
        super().__init__("another import took an audience lock first")
        self.holders = holders


_RECORD_FIELDS = frozenset(f.name for f in fields(ImportRecord))


def _known(pairs) -> dict:
    """An import row's columns that ImportRecord holds (not the publishing marks)."""
    return {name: value for name, value in pairs if name in _RECORD_FIELDS}


def _iso(at: datetime | None) -> str:
    return at.isoformat() if at is not None else "none recorded"


def _now(con: Session) -> datetime:
    return con.execute("SELECT now()::TIMESTAMPTZ").fetchone()[0]
