"""One import, step by step: receive (raw archive) -> validate -> diff and commit, or skip or fail.

Every step is idempotent per (partition key, delivery): a re-run of a finished import re-reports its
outcome and changes nothing; a re-run after a crash redoes the unfinished steps and converges.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import duckdb

from audience_pipeline import faults
from audience_pipeline.config import FeedConfig, S3Options, Workspace
from audience_pipeline.diff import compute_diff, list_times
from audience_pipeline.duck import copy_to_parquet, empty_rows, removal_rows, work_connection
from audience_pipeline.erasure import identifiers_of, scrub_lake
from audience_pipeline.formats import FileRejected, get_format
from audience_pipeline.hashing import sha256_file
from audience_pipeline.keys import parse_partition_key
from audience_pipeline.model import ImportStatus, Semantics
from audience_pipeline.notify import Notifier
from audience_pipeline.outbox import write_outboxes
from audience_pipeline.polling import source_delivery
from audience_pipeline.sources import S3ClientFactory, SourceChanged, SourceError, SourceTransient, source_for_uri
from audience_pipeline.storage.catalog import Catalog, CommitRefused, ImportRecord, Outcome
from audience_pipeline.storage.lake import Lake
from audience_pipeline.storage.remote import RemoteStore
from audience_pipeline.users import RegistryError, UsersRegistry
from audience_pipeline.validate import ValidationResult, validate_file

COMMIT_ATTEMPTS = 5
SHA256_HEX = re.compile("[0-9a-f]{64}")

# Who follows an import's phases (the CLI's progress line): called with (phase, rows parsed or None). A context
# variable rather than a parameter: a run's steps build their own ImportService, in the caller's thread.
import_progress: contextvars.ContextVar[Callable[[str, int | None], None] | None] = contextvars.ContextVar(
    "import_progress", default=None)


def _progress(phase: str, rows: int | None = None) -> None:
    report = import_progress.get()
    if report is not None:
        report(phase, rows)


def feed_name_of(partition_key: str) -> str:
    return parse_partition_key(partition_key)[0]


class ImportFailed(Exception):
    """The import ended ``failed``; the message is the reason recorded in the activity log."""

    def __init__(self, record: ImportRecord):
        super().__init__(record.error or "import failed")
        self.record = record


@dataclass(frozen=True)
class Summary:
    """What validation found, kept beside the validated rows so a later step (or process) can use it."""

    rows_total: int
    rows_valid: int
    rows_rejected: int
    unmatched: int
    audiences: tuple[str, ...]
    users_sha256: str | None
    warnings: int = 0
    # absent from the summaries of imports validated before eligibility: none ineligible, none resolved
    ineligible: int = 0
    resolved_by: dict[str, int] = field(default_factory=dict)
    registry_invalid: int = 0  # registry values that fail to normalize (they match nothing)


class ImportService:
    def __init__(self, workspace: Workspace, s3_client: Callable[[S3Options], S3ClientFactory] | None = None):
        """``s3_client(options)`` gives a factory of boto3 S3 clients for an endpoint (a feed's, the lake's)."""
        self.workspace = workspace
        self.s3_client = s3_client
        storage = workspace.config.storage
        remote = None
        if workspace.lake_is_remote:
            if s3_client is None:
                raise ValueError(f"{workspace.config.storage.lake}: an S3 lake needs an S3 client")
            remote = RemoteStore(s3_client(storage.s3)(), storage.lake, storage.server_side_encryption,
                                 storage.kms_key_id)
        self.lake = Lake(workspace.lake, remote)
        self.catalog = Catalog(workspace.catalog, self.lake, storage.lock_timeout_seconds,
                               storage.liveness_timeout_seconds)
        users = workspace.config.users
        self.users = UsersRegistry(workspace.users_path, users.user_id_column) if workspace.users_path else None
        self.lake.ensure()
        self.notifier = Notifier(workspace, self.catalog)

    # -- step 1: raw file ---------------------------------------------------------------------------
    def receive(self, partition_key: str, delivery: str, source_uri: str, run_id: str | None,
                file_name: str | None = None, profile: str | None = None,
                sha256_hint: str | None = None) -> ImportRecord:
        """Copy the delivered object into the content-addressed raw archive and open its import. An import
        of this delivery that another run left unfinished (it died) is taken over. ``profile``: the feed
        profile the file is read with (recorded on the import; every later step reads it from there).
        ``sha256_hint``: the sha256 of a local file that the caller has just read whole (`audience-pipeline
        import` hashes it for the partition key); when that content is in the archive already, the file is
        neither read nor copied again (a re-delivery of a 500 MB list spent a second copying it)."""
        _progress("receiving")
        self.catalog.hold(partition_key, delivery)
        existing = self.catalog.find_import(partition_key, delivery)
        if existing is not None:
            existing = self.catalog.take_over(existing, run_id)
            if existing.finished:
                self.catalog.let_go(partition_key, delivery)
                return existing
            if existing.sha256 is None or self.lake.fetch(self.lake.raw_path(existing.sha256)):
                return existing
        # new, or a crashed attempt that opened the import but did not archive the file: fetch it again
        feed_name, _, digest = parse_partition_key(partition_key)
        feed = self.workspace.feed(feed_name).for_profile(profile)
        received_at = datetime.now(UTC)
        # A delivery is one object, or (parts of one list found together) several, concatenated in order.
        if delivery.startswith("parts:"):
            parts = list(zip(json.loads(source_uri), json.loads(delivery[len("parts:"):]), strict=True))
        else:
            parts = [(source_uri, source_delivery(delivery))]
        listed = all(d.startswith("source:") for _, d in parts)
        known = self._archived_local_file(parts, sha256_hint)
        if known is not None:
            staged, (obj_name, size), sha256, starts = None, known, sha256_hint, [0]
            over_limit = size > feed.max_file_bytes
        else:
            staged = self.lake.staging(f"receive_{os.getpid()}_{hashlib.sha1(delivery.encode()).hexdigest()[:12]}")
            staged.parent.mkdir(parents=True, exist_ok=True)
            context = (partition_key, delivery, source_uri, run_id, received_at, staged, profile)
            obj_name, size, over_limit, sha256, starts = self._stage(staged, parts, feed, context)
        file_name = file_name or obj_name
        faults.point("receive.downloaded")
        fmt = get_format(feed.format)
        record = self.catalog.begin_import(
            partition_key=partition_key, delivery=delivery, feed=feed_name, source_uri=source_uri,
            file_name=file_name, sha256=None if over_limit else sha256, size_bytes=size,
            semantics=fmt.semantics(feed).value, run_id=run_id, received_at=received_at, profile=profile,
        )
        faults.point("receive.begun")
        if over_limit:
            if staged:
                staged.unlink(missing_ok=True)
            return self._fail(record, f"{file_name}: over the feed's limit of {feed.max_file_bytes} bytes")
        archived = self.lake.raw_path(sha256)
        if staged is not None and archived.exists():
            staged.unlink()
        elif staged is not None:
            archived.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, archived)
            self.lake.publish(archived)
        if len(parts) > 1:
            names = [posixpath.basename(unquote(urlparse(u).path)) for u, _ in parts]
            self._record_parts(record.import_id, archived, names, starts)
        faults.point("receive.archived")
        if record.sha256 is not None and record.sha256 != sha256:
            return self._fail(record, f"{file_name}: content changed between two attempts of this delivery")
        if not listed and not sha256.startswith(digest):
            return self._fail(
                record,
                f"{file_name}: content changed after it was listed (sha256 {sha256[:8]}, expected {digest}); "
                "the new content is a new version and will be imported on its own",
            )
        return record

    def _stage(self, staged: Path, parts: list[tuple[str, str]], feed: FeedConfig, context: tuple):
        """Download the parts, concatenated line-wise, onto ``staged``, hashing as they stream:
        (name of the last object, size, over the size limit, sha256, the offset where each part begins)."""
        digest = hashlib.sha256()
        size, over_limit, retried, obj_name = 0, False, False, None
        starts = []
        with open(staged, "w+b") as out:
            for part_uri, part_delivery in parts:
                if size and os.pread(out.fileno(), 1, size - 1) != b"\n":
                    out.write(b"\n")  # parts are concatenated line-wise
                    digest.update(b"\n")
                    size += 1
                starts.append(size)
                obj_name, part_size, over_limit, part_retried = self._receive_part(
                    part_uri, part_delivery, feed, out, digest, feed.max_file_bytes - size, context)
                size += part_size
                retried = retried or part_retried
                out.flush()
                if over_limit:
                    break
        # a retried download hashed bytes it then threw away: hash the file as it stands
        return obj_name, size, over_limit, sha256_file(staged) if retried else digest.hexdigest(), starts

    def _archived_local_file(self, parts: list[tuple[str, str]], sha256_hint: str | None) -> tuple[str, int] | None:
        """(name, size) of a single local file whose hinted content is in the local archive, else None. A hint
        comes from a run tag, which anyone starting a run can set: only a well-formed digest names a file."""
        if (sha256_hint is None or not SHA256_HEX.fullmatch(sha256_hint) or len(parts) != 1
                or urlparse(parts[0][0]).scheme != "file"):
            return None
        archived = self.lake.raw_path(sha256_hint)
        if not archived.exists():
            return None
        return posixpath.basename(unquote(urlparse(parts[0][0]).path)), archived.stat().st_size

    def _parts_path(self, import_id: int) -> Path:
        return self.lake.validated_rows(import_id).with_name("parts.json")

    def _record_parts(self, import_id: int, raw: Path, names: list[str], starts: list[int]) -> None:
        """Which lines of a concatenated delivery came from which part (a later re-upload of one part replaces
        only that part's lines: Attentive)."""
        firsts, lines, done = [], 0, 0
        with open(raw, "rb") as handle:
            for start in starts:
                while done < start:
                    chunk = handle.read(min(1 << 20, start - done))
                    lines += chunk.count(b"\n")
                    done += len(chunk)
                firsts.append(lines + 1)
        path = self._parts_path(import_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"name": n, "first_line": f} for n, f in zip(names, firsts, strict=True)]))
        os.replace(tmp, path)
        self.lake.publish(path)

    def part_lines(self, record: ImportRecord) -> dict[str, tuple[int, int | None]]:
        """Each part of an import and its lines (first, last; None = to the end)."""
        if not record.delivery.startswith("parts:"):
            return {record.file_name: (1, None)}
        path = self._parts_path(record.import_id)
        if not self.lake.fetch(path):
            raise FileNotFoundError(f"the part boundaries of import {record.import_id} ({path.name}) are gone")
        parts = json.loads(path.read_text())
        lasts = [p["first_line"] - 1 for p in parts[1:]] + [None]
        return {p["name"]: (p["first_line"], last) for p, last in zip(parts, lasts, strict=True)}

    def _receive_part(self, uri: str, delivery: str, feed, out, digest, budget: int, context: tuple):
        """Append one object to the staged file, retrying transient faults with backoff:
        (name, size, over the limit, retried)."""
        partition_key, import_delivery, import_uri, run_id, received_at, staged, profile = context
        source, key = source_for_uri(uri, self.s3_client(feed.s3) if self.s3_client else None, feed.sftp)
        # A sensor's delivery names the exact version it listed; read that one or learn it was replaced.
        listed_version = delivery.removeprefix("source:") if delivery.startswith("source:") else None
        start = out.tell()
        attempt = 0
        while True:
            try:
                name, size, over_limit = self._download(source, key, listed_version, out, digest, budget)
                return name, size, over_limit, attempt > 0
            except SourceChanged as exc:
                staged.unlink(missing_ok=True)
                record = self.catalog.begin_import(
                    partition_key=partition_key, delivery=import_delivery, feed=feed_name_of(partition_key),
                    source_uri=import_uri, file_name=key.rsplit("/", 1)[-1], sha256=None, size_bytes=None,
                    semantics=get_format(feed.format).semantics(feed).value, run_id=run_id,
                    received_at=received_at, profile=profile,
                )
                return self._fail(record, f"{exc}; the new version is a delivery of its own")
            except SourceTransient as exc:
                attempt += 1
                if attempt >= feed.download_attempts:
                    staged.unlink(missing_ok=True)
                    raise SourceTransient(f"{exc}; gave up after {attempt} attempts (a later poll tries again)") \
                        from None
                out.seek(start)
                out.truncate()
                time.sleep(feed.retry_backoff_seconds * 2 ** (attempt - 1))
            except SourceError:
                staged.unlink(missing_ok=True)
                raise
            finally:
                source.close()

    @staticmethod
    def _download(source, key: str, version: str | None, out, digest, max_bytes: int) -> tuple[str, int, bool]:
        """Stream one object onto ``out``: (name, size, over the size limit)."""
        size = 0
        with source.open(key, version) as (stream, obj):
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    return obj.name, size, True
                digest.update(chunk)
                out.write(chunk)
                faults.point("receive.staged")
        return obj.name, size, False

    def record_for(self, partition_key: str, delivery: str | None) -> ImportRecord:
        """The import a step works on: this delivery's, or for a manual re-materialization the latest."""
        record = (self.catalog.find_import(partition_key, delivery) if delivery
                  else self.catalog.latest_import(partition_key))
        if record is None:
            raise LookupError(
                f"partition {partition_key!r} has no received import"
                + (f" for delivery {delivery!r}" if delivery else "")
                + "; files are imported by the feed's sensor or 'audience-pipeline import'"
            )
        return record

    def _feed(self, record: ImportRecord) -> FeedConfig:
        """The options this import's file is read with: its feed's, with its profile's overrides."""
        return self.workspace.feed(record.feed).for_profile(record.profile)

    # -- step 2: validated file ---------------------------------------------------------------------
    def _summary_path(self, import_id: int) -> Path:
        return self.lake.validated_rows(import_id).with_name("summary.json")

    def users_sha256(self) -> str | None:
        return self.users.sha256() if self.users else None

    def validate(self, record: ImportRecord) -> Summary:
        """Parse and validate the archived file; on a whole-file problem the import ends ``failed``."""
        summary_path = self._summary_path(record.import_id)
        if self.lake.fetch(summary_path):
            data = json.loads(summary_path.read_text())
            data["audiences"] = tuple(data["audiences"])
            _progress("validated", data["rows_total"])
            return Summary(**data)
        feed = self._feed(record)
        work = self.lake.staging(f"work_{record.import_id}")
        raw = self.lake.raw_path(record.sha256)
        if not self.lake.fetch(raw):
            self._fail(record, f"{record.file_name}: its raw file {raw.name} is no longer in the archive")
        _progress("parsing and validating")
        con = work_connection(work, self.workspace.config.storage.memory_limit)
        try:
            users_sha = self.users_sha256()
            result: ValidationResult = validate_file(
                con, self.lake.raw_path(record.sha256), record.file_name, feed, self.users,
                self.lake.validated_rows(record.import_id), self.lake.rejected(record.import_id), work,
                record.received_at,
            )
        except (FileRejected, RegistryError) as exc:
            if self.lake.rejected(record.import_id).exists():
                self.lake.publish(self.lake.rejected(record.import_id))
            self._fail(record, str(exc))
        finally:
            con.close()
            shutil.rmtree(work, ignore_errors=True)
        faults.point("validate.files_written")
        summary = Summary(result.rows_total, result.rows_valid, result.rows_rejected, result.unmatched,
                          result.audiences, users_sha, result.warnings, result.ineligible, dict(result.resolved_by),
                          result.registry_invalid)
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(summary)))
        os.replace(tmp, summary_path)
        for path in (self.lake.validated_rows(record.import_id), self.lake.rejected(record.import_id), summary_path):
            self.lake.publish(path)
        faults.point("validate.summary_written")
        _progress("validated", summary.rows_total)
        return summary

    def _fail(self, record: ImportRecord, reason: str) -> ImportRecord:
        failed = self.catalog.finish_import(record.import_id, ImportStatus.FAILED, Outcome(), error=reason)
        self.notifier.import_outcome(failed)
        raise ImportFailed(failed)

    # -- step 3: membership snapshot and diff -------------------------------------------------------
    def skip_if_applied(self, record: ImportRecord) -> ImportRecord | None:
        return self.catalog.skip_if_applied(record, self.users_sha256())

    def apply(self, record: ImportRecord, dry_run: bool = False) -> ImportRecord:
        """Diff the validated rows against the current lists and commit every audience at once, unless the
        removal gate holds the import; a dry run records the diff and the gate's verdict only."""
        if record.finished:
            self.catalog.publish()
            self.publish_outboxes(record)
            return record
        if not dry_run:
            skipped = self.skip_if_applied(record)
            if skipped is not None:
                return skipped
        summary = self.validate(record)
        if not dry_run:
            self.catalog.set_audiences(record.import_id, list(summary.audiences))
        feed = self._feed(record)
        semantics = Semantics(get_format(feed.format).semantics(feed))
        audience_ids = self.catalog.audience_ids(record.feed, list(summary.audiences),
                                                 reuse_deleted=self.workspace.feed(record.feed).reuses_deleted_names)
        faults.point("apply.audiences_registered")
        union_parts = getattr(get_format(feed.format), "UNION_SAME_LIST_TIME", False)
        result = self._commit(record, semantics, self.lake.validated_rows(record.import_id), audience_ids,
                              summary, union_parts, dry_run=dry_run)
        if result.status == ImportStatus.SUCCEEDED and summary.registry_invalid:
            # after the commit: finishing the import writes its error column
            self.catalog.add_import_warning(
                result.import_id, f"warning: {summary.registry_invalid} users-registry value(s) fail to normalize "
                                  "and match nothing (audience-pipeline registry check)")
            return self.catalog.get_import(result.import_id)
        return result

    def _commit(self, record: ImportRecord, semantics: Semantics, rows_path: Path, audience_ids: dict[str, int],
                summary: Summary | None, union_parts: bool = False, delete: bool = False, approved: bool = False,
                dry_run: bool = False, released: bool = False, floor: datetime | None = None) -> ImportRecord:
        """Diff and commit while holding the file's audiences: parsing and validation run in parallel, but
        two imports never diff against, or commit, the same audience at once."""
        options = dict(union_parts=union_parts, delete=delete, approved=approved, dry_run=dry_run, released=released,
                       floor=floor)
        if dry_run:
            return self._commit_held(record, semantics, rows_path, audience_ids, summary, **options)
        self.catalog.set_audiences(record.import_id, list(audience_ids))
        with self.catalog.audience_locks(record, audience_ids):
            try:
                return self._commit_held(record, semantics, rows_path, audience_ids, summary, **options)
            except duckdb.Error as exc:
                # e.g. out of memory or disk in the diff: record it, so that the imports queued behind this
                # one in arrival order do not wait for it until its lease runs out
                self._fail(record, f"{record.file_name}: the diff failed: {exc}")

    def _commit_held(self, record: ImportRecord, semantics: Semantics, rows_path: Path,
                     audience_ids: dict[str, int], summary: Summary | None, union_parts: bool, delete: bool,
                     approved: bool, dry_run: bool, released: bool, floor: datetime | None) -> ImportRecord:
        names = sorted(audience_ids)
        if not (approved or dry_run or released or delete) and semantics == Semantics.INCREMENTAL:
            held = [i for i, _ in self.catalog.pending_for(record.feed, names, record.import_id)
                    if i < record.import_id]
            if held:
                # incremental commands must apply in order: queue behind the held import
                return self.catalog.set_pending(
                    record.import_id, ImportStatus.WAITING, self._base_outcome(summary, audience_ids),
                    f"waits behind held import {held[0]} of the same audience")
        work = self.lake.staging(f"work_{record.import_id}")
        con = work_connection(work, self.workspace.config.storage.memory_limit)
        try:
            for _ in range(COMMIT_ATTEMPTS):
                latest = self.catalog.get_import(record.import_id)
                if latest.status != record.status:
                    return latest  # another run of this delivery got there first
                current = self.catalog.current_versions(list(audience_ids.values()))
                times = list_times(con, rows_path)
                feed = self.workspace.feed(record.feed)
                orders = getattr(get_format(feed.format), "list_time_orders", lambda _feed: False)(feed)
                stale = self._stale(times, audience_ids, current) if orders else None
                if stale:
                    return self.catalog.finish_import(
                        record.import_id, ImportStatus.SKIPPED,
                        Outcome(users_sha256=summary.users_sha256 if summary else None, qualified=0,
                                disqualified=0),
                        error=stale)
                keep = {a: semantics == Semantics.INCREMENTAL for a in audience_ids.values()}
                diff_rows, own_pairs = rows_path, None
                if union_parts:
                    # other parts of the list's date already applied: the list is all of them, each part as
                    # last delivered (this file replacing its own part's earlier delivery)
                    same_date = [key for key, listed_at in times.items()
                                 if (applied := current.get(audience_ids[key])) is not None
                                 and applied.list_time == listed_at]
                    if same_date:
                        diff_rows, own_pairs = self._with_other_parts(con, record, rows_path, same_date,
                                                                      audience_ids, work)
                at = (datetime.now(UTC) if dry_run
                      else self.catalog.import_instant(record, list(audience_ids.values()), floor))
                _progress("diffing against the current lists")
                diff = compute_diff(con, self.lake, record.import_id, keep, diff_rows, audience_ids, current, at)
                pairs = diff.pairs if own_pairs is None else own_pairs
                outcome = Outcome(
                    rows_total=summary.rows_total if summary else 0,
                    rows_valid=summary.rows_valid if summary else 0,
                    rows_rejected=summary.rows_rejected if summary else 0,
                    duplicates=summary.rows_valid - pairs if summary else 0,
                    unmatched=summary.unmatched if summary else 0,
                    qualified=diff.qualified, disqualified=diff.disqualified, members=diff.members,
                    noops=diff.noops, warnings=summary.warnings if summary else 0, audiences=tuple(audience_ids),
                    users_sha256=summary.users_sha256 if summary else None,
                    ineligible=summary.ineligible if summary else 0,
                    resolved_by=summary.resolved_by if summary else {},
                )
                verdict = self._gate(self.workspace.feed(record.feed), semantics, diff, current, audience_ids)
                if dry_run:
                    return self.catalog.set_pending(record.import_id, ImportStatus.DRY_RUN, outcome,
                                                    f"dry run: {verdict or 'passes the removal gate'}")
                if verdict and not (approved or delete):
                    if semantics == Semantics.REPLACE:
                        self._supersede(record, names)
                    held = self.catalog.set_pending(record.import_id, ImportStatus.HELD, outcome, verdict)
                    self.notifier.import_outcome(held)
                    return held
                expected = {a: (current[a].version if a in current else None) for a in audience_ids.values()}
                _progress("committing")
                try:
                    committed = self.catalog.commit_versions(
                        record, expected, diff.versions, outcome,
                        max_audiences=self.workspace.feed(record.feed).max_audiences, delete=delete, at=at)
                except CommitRefused as exc:
                    self._fail(record, f"{record.file_name}: {exc}")
                if committed:
                    break
            else:
                self._fail(record, f"another import kept changing these audiences; gave up after "
                                   f"{COMMIT_ATTEMPTS} attempts")
        finally:
            con.close()
            shutil.rmtree(work, ignore_errors=True)
        if semantics == Semantics.REPLACE:
            self._supersede(record, names)
        faults.point("apply.superseded")
        self.publish_outboxes(self.catalog.get_import(record.import_id), audience_ids)
        faults.point("apply.outboxes")
        self.catalog.prune_versions(timedelta(days=self.workspace.config.storage.retention_days))
        faults.point("apply.pruned")
        if self.lake.remote is not None:
            self.lake.trim_cache(self.catalog.current_member_files(), self.workspace.config.storage.cache_max_bytes)
        faults.point("apply.done")
        return self.catalog.get_import(record.import_id)

    def _with_other_parts(self, con, record: ImportRecord, rows_path: Path, keys: list[str],
                          audience_ids: dict[str, int], work: Path) -> tuple[Path, int]:
        """This file's rows plus, for each segment of ``keys`` (whose applied list is of this file's date),
        the rows of the latest applied delivery of every other part of that date. Returns the combined rows
        and the number of (segment, user) pairs in this file alone."""
        feed = self.workspace.feed(record.feed)
        fmt = get_format(feed.format)
        group = fmt.group_name(record.file_name, feed)
        own = set(self.part_lines(record))
        selects, params = ["SELECT * FROM read_parquet(?)"], [str(rows_path)]
        for key in keys:
            seen = set(own)
            for earlier in self.catalog.applied_imports(audience_ids[key]):  # newest first
                earlier_group = fmt.group_name(earlier.file_name or "", feed)
                if earlier.import_id == record.import_id or earlier_group is None:
                    continue  # not a delivery of this feed's files (an erasure, say)
                if earlier_group != group:
                    break  # an older date: no part of this list
                rows = self.lake.validated_rows(earlier.import_id)
                for part, (first, last) in self.part_lines(earlier).items():
                    if part in seen:
                        continue
                    seen.add(part)
                    if not self.lake.fetch(rows):
                        self._fail(record, f"{record.file_name}: cannot rebuild the list of {key!r}: the rows of its "
                                           f"part {part} (import {earlier.import_id}) are gone (raw_retention_days)")
                    selects.append("SELECT * FROM read_parquet(?) WHERE audience_key = ? AND source_line >= ? "
                                   "AND (CAST(? AS BIGINT) IS NULL OR source_line <= ?)")
                    params += [str(rows), key, first, last, last]
        combined = work / "with_other_parts.parquet"
        copy_to_parquet(con, " UNION ALL ".join(selects), params, combined)
        [(own_pairs,)] = con.execute("SELECT count(*) FROM (SELECT DISTINCT audience_key, user_id "
                                     "FROM read_parquet(?))", [str(rows_path)]).fetchall()
        return combined, own_pairs

    @staticmethod
    def _base_outcome(summary: Summary | None, audience_ids: dict[str, int]) -> Outcome:
        if summary is None:
            return Outcome(audiences=tuple(audience_ids))
        return Outcome(rows_total=summary.rows_total, rows_valid=summary.rows_valid,
                       rows_rejected=summary.rows_rejected, unmatched=summary.unmatched,
                       audiences=tuple(audience_ids), users_sha256=summary.users_sha256,
                       ineligible=summary.ineligible, resolved_by=summary.resolved_by)

    @staticmethod
    def _gate(feed, semantics: Semantics, diff, current: dict, audience_ids: dict[str, int]) -> str | None:
        """Why the removal gate holds this diff, or None."""
        names = {v: k for k, v in audience_ids.items()}
        gate = feed.gate
        for version in diff.versions:
            before = current[version.audience_id].member_count if version.audience_id in current else 0
            removed = version.disqualified
            name = names[version.audience_id]
            if semantics == Semantics.REPLACE and before > 0 and version.member_count == 0:
                return f"held: would empty audience {name!r} ({before} members)"
            if gate.exceeded(removed, before):
                share = removed / max(before, 1)
                limits = " and ".join(
                    text for text in (
                        f"more than {gate.max_removed}" if gate.max_removed is not None else "",
                        f"more than {gate.max_removed_share:.0%}" if gate.max_removed_share is not None else "",
                    ) if text
                )
                return (f"held: would remove {removed} of {before} members of {name!r} ({share:.0%}), "
                        f"over the removal gate ({limits})")
        return None

    def _supersede(self, record: ImportRecord, names: list[str]) -> None:
        for import_id, status in self.catalog.pending_for(record.feed, names, record.import_id):
            if status == ImportStatus.HELD and import_id < record.import_id:
                self.catalog.set_status(import_id, ImportStatus.SUPERSEDED,
                                        f"superseded by the newer list of import {record.import_id}")

    # -- operator decisions -------------------------------------------------------------------------
    def held(self, import_id: int) -> ImportRecord:
        """The held import an operator decides on: KeyError for an unknown id, ValueError if it is not held."""
        record = self.catalog.get_import(import_id)
        if record.status != ImportStatus.HELD:
            raise ValueError(f"import {import_id} is {record.status}, not held")
        return record

    def approve(self, import_id: int) -> ImportRecord:
        """Apply a held import now (diffed again against the current lists), then the imports queued behind it."""
        record = self.held(import_id)
        feed = self._feed(record)
        summary = self.validate(record)
        audience_ids = self.catalog.audience_ids(record.feed, list(summary.audiences),
                                                 reuse_deleted=self.workspace.feed(record.feed).reuses_deleted_names)
        result = self._commit(record, Semantics(get_format(feed.format).semantics(feed)),
                              self.lake.validated_rows(import_id), audience_ids, summary,
                              getattr(get_format(feed.format), "UNION_SAME_LIST_TIME", False), approved=True)
        self._release_waiting(record.feed, list(summary.audiences))
        return result

    def reject(self, import_id: int) -> ImportRecord:
        """Drop a held import (status ``rejected``), then apply the imports queued behind it."""
        record = self.held(import_id)
        result = self.catalog.set_status(import_id, ImportStatus.REJECTED, "rejected by an operator")
        self._release_waiting(record.feed, list(record.audiences or []))
        return result

    def _release_waiting(self, feed_name: str, names: list[str]) -> None:
        for import_id, status in self.catalog.pending_for(feed_name, names, -1):
            if status != ImportStatus.WAITING:
                break  # another held import: the rest keep waiting behind it
            record = self.catalog.get_import(import_id)
            feed = self._feed(record)
            summary = self.validate(record)
            audience_ids = self.catalog.audience_ids(feed_name, list(summary.audiences),
                                                     reuse_deleted=self.workspace.feed(feed_name).reuses_deleted_names)
            result = self._commit(record, Semantics(get_format(feed.format).semantics(feed)),
                                  self.lake.validated_rows(import_id), audience_ids, summary, released=True)
            if result.status == ImportStatus.HELD:
                break

    @staticmethod
    def _stale(times: dict, audience_ids: dict[str, int], current: dict) -> str | None:
        """Why the file is older than what is applied (a late, out-of-order delivery), or None."""
        for key, listed_at in times.items():
            applied = current.get(audience_ids[key])
            if applied is not None and applied.list_time is not None and listed_at < applied.list_time:
                return (f"stale: the list of {key!r} is from {listed_at.isoformat()}, older than the applied list "
                        f"from {applied.list_time.isoformat()}")
        return None

    def publish_outboxes(self, record: ImportRecord, audience_ids: dict[str, int] | None = None) -> list[str]:
        """The downstream files of a committed import (idempotent: a re-run fills in what is missing). Full
        lists only of the audiences whose current version is this import's. An audience whose name cannot be
        a file name gets no file: the import stays succeeded, with the reason as a warning in its ``error``
        column and an e-mail to the feed's admins."""
        outboxes = self.workspace.config.outboxes
        if record.status != ImportStatus.SUCCEEDED or not outboxes:
            return []
        if audience_ids is None:
            audience_ids = self.catalog.audience_ids(record.feed, list(record.audiences or []),
                                                     reuse_deleted=self.workspace.feed(record.feed).reuses_deleted_names)
        for audience_id in audience_ids.values():
            self.lake.fetch(self.lake.members_file(audience_id, record.import_id))
        self.lake.fetch(self.lake.events(record.import_id))
        written, refused = [], []
        for outbox in outboxes:
            client = self.s3_client(outbox.s3) if self.s3_client and outbox.location.startswith("s3://") else None
            published = write_outboxes([outbox], self.workspace.resolve, self.lake, self.catalog, record,
                                       audience_ids, client)
            written += published.written
            refused += published.refused
        for reason in refused:
            self.catalog.add_import_warning(record.import_id, f"warning: {reason}")
        if refused:
            self.notifier.outbox_refused(self.catalog.get_import(record.import_id), refused)
        return written

    # -- lifecycle ----------------------------------------------------------------------------------
    def delete_audience(self, feed: str, name: str) -> ImportRecord:
        """Disqualify every member with events and mark the audience deleted; a file naming it later fails
        (Repro: a deleted audience's name cannot be re-created). Recorded as an import of its own."""
        self.workspace.feed(feed)
        audience_id = self.catalog.find_audience(feed, name)
        if audience_id is None:
            raise LookupError(f"no audience {name!r} in feed {feed!r}")
        return self._operation(feed, f"delete:{audience_id}", f"delete:{audience_id}", "delete-audience",
                               "(delete audience)", Semantics.REPLACE, datetime.now(UTC), {name: audience_id},
                               empty_rows, delete=True)

    def forget_user(self, user_id: str) -> tuple[list[ImportRecord], int]:
        """Take the user out of every audience (with disqualify events), then erase them from the lake.
        Returns the removal imports and how many files were rewritten."""
        if self.lake.remote is not None:
            raise ValueError("forget-user rewrites lake files in place and supports a local lake only")
        at = datetime.now(UTC)
        digest = hashlib.sha256(user_id.encode()).hexdigest()
        memberships = self.catalog.memberships_of(user_id)
        records = []
        for feed in sorted({f for f, _, _ in memberships}):
            audience_ids = {name: a for f, name, a in memberships if f == feed}
            records.append(self._operation(
                feed, f"erasure:{digest[:12]}", f"erasure:{digest}:{at.isoformat()}", "forget-user", "(erasure)",
                Semantics.INCREMENTAL, at, audience_ids,
                functools.partial(removal_rows, user_id=user_id, audiences=sorted(audience_ids)), released=True))
        con = duckdb.connect(":memory:")
        try:
            identifiers = identifiers_of(con, self.lake, user_id)
        finally:
            con.close()
        with self.catalog.publishing_paused():  # a chunk made meanwhile could copy a file before its scrub
            rewritten = scrub_lake(self.lake, user_id, identifiers)
        self.catalog.record_erasure(digest, [r.import_id for r in records], rewritten)
        return records, rewritten

    # -- expiry -------------------------------------------------------------------------------------
    def sweep_expired(self, at: datetime | None = None) -> list[ImportRecord]:
        """Commit, per feed, one import that removes every membership expired by ``at`` (default now), with
        disqualify events at each membership's own expires_at, so consumers of events see the removal."""
        at = at or datetime.now(UTC)
        due = self.catalog.expiry_due(at)
        records = []
        for feed in sorted({f for _, f, _ in due}):
            audience_ids = {name: audience_id for audience_id, f, name in due if f == feed}
            records.append(self._operation(
                feed, f"expiry:{at.strftime('%Y%m%dT%H%M%S')}", f"expiry:{at.isoformat()}", "expiry sweep",
                "(expiry sweep)", Semantics.INCREMENTAL, at, audience_ids, empty_rows))
        return records

    def _operation(self, feed: str, key: str, delivery: str, source: str, label: str, semantics: Semantics,
                   at: datetime, audience_ids: dict[str, int], write_rows, **commit_options) -> ImportRecord:
        """An import no file delivered (a deletion, an erasure, an expiry sweep), recorded in the activity log
        like any other; ``write_rows(path)`` writes its canonical rows."""
        record = self.catalog.begin_import(
            partition_key=f"{feed}:{key}", delivery=delivery, feed=feed, source_uri=source, file_name=label,
            sha256=None, size_bytes=None, semantics=semantics.value, run_id=None, received_at=at,
        )
        if record.finished:
            return record
        rows = self.lake.staging(f"operation_{record.import_id}.parquet")
        write_rows(rows)
        try:
            return self._commit(record, semantics, rows, audience_ids, None, floor=at, **commit_options)
        finally:
            rows.unlink(missing_ok=True)
