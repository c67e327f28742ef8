"""Opt-outs act promptly: when a new version of the users registry leaves current members of a feed with
``eligible:`` ineligible (an opt-out, a deactivation, or the user gone from the registry), they are
disqualified at once, as an import of their own with disqualify events, whatever the feed's kind. An
incremental feed (mediarithmics, ODP, Loymax adds) would otherwise keep them until a file named them, and a
full-list feed until its next list, a day later for Attentive.

A sweep is per feed and per registry version (its sha256). Each sweep is numbered and recorded in the
catalog (``eligibility_sweeps``), so the same registry version never sweeps a feed twice, and its import is
keyed by that number, so two processes running the same sweep make one import. Another sweep of the same
version is due only when an import validated against an older registry version added members after the
sweep read the lists (validated before the registry changed, committed after the sweep): it may have put an
opted-out user back. For Attentive, whose list is the union of its parts' rows as each part was validated, any
import that added members calls for another sweep.

Opt-outs are never held by the removal gate (holding them would keep messaging people who asked us to
stop), but a removal the gate would hold (the feed's ``gate:``), or one that empties an audience, is
e-mailed to the feed's admins: a truncated registry upload looks like this.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from audience_pipeline.duck import copy_to_parquet, work_connection
from audience_pipeline.formats import get_format
from audience_pipeline.importer import ImportFailed, ImportService, Summary
from audience_pipeline.model import Semantics
from audience_pipeline.storage.catalog import ImportRecord
from audience_pipeline.users import RegistryError

SOURCE = "registry sweep"
LABEL = "(opt-out sweep)"

# Canonical rows removing every current member of the feed's audiences whom the registry no longer makes
# eligible (missing from it, or failing the feed's eligible:). Memberships already expired are left to the
# expiry sweep: they are no opt-outs. observed_at carries each list's list_time over to the sweep's version
# (the diff takes a version's list_time from its rows), so a dated list (Attentive, ODP with skip_older_ts)
# keeps its date: a later part of the same date still joins it, and an older list is still stale.
INELIGIBLE_MEMBERS = """
SELECT m.audience_key, 'user_id' AS identifier_type, m.user_id AS identifier, m.user_id, 'remove' AS action,
       NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in, NULL::VARCHAR AS data_bag,
       m.list_time AS observed_at, NULL::VARCHAR AS warning, 1::BIGINT AS source_line
FROM (SELECT a.audience_key, a.list_time, f.user_id
      FROM read_parquet($member_files, hive_partitioning = true) f
      JOIN (SELECT unnest($audience_ids) AS audience_id, unnest($audience_names) AS audience_key,
                   unnest(CAST($list_times AS TIMESTAMPTZ[])) AS list_time) a
        ON a.audience_id = f.audience_id::BIGINT
      WHERE f.expires_at IS NULL OR f.expires_at > $at::TIMESTAMPTZ) m
ANTI JOIN ({eligible}) e ON e.user_id = m.user_id
"""


@dataclass(frozen=True)
class SweepResult:
    """One feed's sweep: the registry version, how many members it found ineligible, its import (None when it
    found none), and the audiences whose drop was e-mailed."""

    feed: str
    users_sha256: str
    ineligible: int
    record: ImportRecord | None
    large_drops: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Its import failed: nothing is recorded, and the next tick (or command) sweeps the feed again."""
        return self.record is not None and self.record.status != "succeeded"


class EligibilitySweep:
    """The opt-out sweep of a workspace, on the import service's catalog, lake and registry."""

    def __init__(self, service: ImportService):
        self.service = service
        self.catalog = service.catalog
        self.workspace = service.workspace

    def feeds(self) -> list[str]:
        """The feeds with ``eligible:``, when the workspace has a users registry (else nothing to sweep)."""
        if self.service.users is None:
            return []
        return sorted(name for name, feed in self.workspace.config.feeds.items() if feed.eligible)

    def registry_sha256(self) -> str:
        registry = self.service.users
        if registry is None or not registry.path.is_file():
            raise RegistryError(f"users registry {registry.path if registry else '(none configured)'} not found: "
                                "no opt-out sweep can run until it is back")
        return registry.sha256()

    def due(self) -> dict[str, str]:
        """Feed -> registry sha256, for each feed whose members have not been swept against this registry
        version (or have been, but an import resolved against another version added members since)."""
        feeds = self.feeds()
        if not feeds:
            return {}
        sha = self.registry_sha256()
        due = {}
        for feed in feeds:
            last = self.catalog.last_sweep(feed)
            unions = getattr(get_format(self.workspace.feed(feed).format), "UNION_SAME_LIST_TIME", False)
            if (last is None or last.users_sha256 != sha
                    or self.catalog.stale_since_sweep(feed, last.watermark, sha, unions)):
                due[feed] = sha
        return due

    def sweep(self, feeds: list[str] | None = None) -> list[SweepResult]:
        """Sweep every feed that is due (or only ``feeds`` among them)."""
        due = self.due()
        return [self.sweep_feed(feed, sha) for feed, sha in sorted(due.items()) if feeds is None or feed in feeds]

    def sweep_feed(self, feed_name: str, sha: str) -> SweepResult:
        """Disqualify the feed's current members who are not eligible under registry version ``sha``, as one
        import, and record the sweep; when its import fails, nothing is recorded (see SweepResult.failed)."""
        last = self.catalog.last_sweep(feed_name)
        number = last.sweep + 1 if last else 1
        watermark = self.catalog.now()
        current = self.catalog.feed_current_versions(feed_name)
        lake = self.service.lake
        files = [lake.members_file(a, v) for a, _, v, _ in current]
        missing = [str(path) for path in files if not lake.fetch(path)]
        if missing:
            raise FileNotFoundError(f"opt-out sweep of {feed_name}: current member lists are missing from the lake: "
                                    f"{', '.join(missing)}")
        rows = lake.staging(f"eligibility_{feed_name}_{number}_{os.getpid()}.parquet")
        try:
            ineligible = self._write_rows(feed_name, current, files, rows, watermark) if current else {}
            total = sum(ineligible.values())
            if not total:
                self.catalog.record_sweep(feed_name, number, sha, None, watermark)
                return SweepResult(feed_name, sha, 0, None)
            record = self._begin(feed_name, number, sha, watermark)
            if not record.finished:
                audience_ids = {name: a for a, name, _, _ in current if name in ineligible}
                summary = Summary(rows_total=total, rows_valid=total, rows_rejected=0, unmatched=0,
                                  audiences=tuple(sorted(audience_ids)), users_sha256=sha, ineligible=total)
                # approved: opt-outs pass the removal gate (reported below instead); released: nor do they wait
                # behind an import held for approval
                try:
                    record = self.service._commit(record, Semantics.INCREMENTAL, rows, audience_ids, summary,
                                                  approved=True, released=True)
                except ImportFailed as exc:
                    record = exc.record
        finally:
            rows.unlink(missing_ok=True)
        if record.status != "succeeded":
            return SweepResult(feed_name, sha, total, record)
        self.catalog.record_sweep(feed_name, number, sha, record.import_id, watermark)
        return SweepResult(feed_name, sha, total, record, self._report_drops(record))

    def _begin(self, feed_name: str, number: int, sha: str, at) -> ImportRecord:
        """The import of this sweep: the one another process began (unfinished: taken over; succeeded: its
        work is done), or a new one after a failed attempt."""
        key, delivery = f"{feed_name}:eligibility:{number}", f"eligibility:{number}:{sha}"
        while True:
            record = self.catalog.begin_import(
                partition_key=key, delivery=delivery, feed=feed_name, source_uri=SOURCE, file_name=LABEL,
                sha256=None, size_bytes=None, semantics=Semantics.INCREMENTAL.value, run_id=None, received_at=at)
            if not record.finished:
                return record
            self.catalog.let_go(key, delivery)
            if record.status == "succeeded":
                return record
            delivery = f"eligibility:{number}:{sha}:after:{record.import_id}"

    def _write_rows(self, feed_name: str, current: list, files: list, rows, at) -> dict[str, int]:
        """Write the removal rows; returns the ineligible members per audience name."""
        work = self.service.lake.staging(f"work_eligibility_{feed_name}_{os.getpid()}")
        con = work_connection(work, self.workspace.config.storage.memory_limit)
        try:
            eligible, params = self.service.users.eligible_users_sql(con, self.workspace.feed(feed_name))
            copy_to_parquet(con, INELIGIBLE_MEMBERS.format(eligible=eligible), {
                **params, "member_files": [str(f) for f in files], "at": at,
                "audience_ids": [a for a, _, _, _ in current], "audience_names": [n for _, n, _, _ in current],
                "list_times": [t for _, _, _, t in current],
            }, rows)
            counts = con.execute("SELECT audience_key, count(*) FROM read_parquet(?) GROUP BY 1",
                                 [str(rows)]).fetchall()
        finally:
            con.close()
            shutil.rmtree(work, ignore_errors=True)
        return dict(counts)

    def _report_drops(self, record: ImportRecord) -> list[str]:
        """E-mail the feed's admins the audiences whose drop the gate would hold, or that it emptied."""
        gate = self.workspace.feed(record.feed).gate
        drops = []
        for name, before, after, removed in self.catalog.import_versions(record.import_id):
            if gate.exceeded(removed, before) or (before > 0 and after == 0):
                drops.append(f"{name!r}: {removed} of {before} members removed ({removed / max(before, 1):.0%}), "
                             f"{after} left")
        if drops:
            self.service.notifier.eligibility_drop(record, drops)
        return drops
