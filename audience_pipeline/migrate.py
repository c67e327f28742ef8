"""``audience-pipeline migrate``: rewrite the mediarithmics identities a 0.1.0 workspace stored the old way.

0.1.0 named an audience ``coalesce(segment_technical_name, segment_id)`` and made a member's user id the first
identifier present with its type dropped. The current reading (formats/mediarithmics.py) names a segment known
only by id ``segment_id:<id>`` (or its technical name through the feed's ``segments:`` map) and, without a users
registry, keeps every non-primary type in the user id (``user_id_sql``).

What changes is decided from what the workspace still holds, never from the names alone:

- An audience's new name: the lines of the imports that committed its versions are read again, from the raw
  archive, with the current format module, and joined by line number with the rows 0.1.0 validated. The names
  the current reading gives the lines that fed the audience are its evidence: one name is a rename (or no
  change), several are ambiguous (a segment id that 0.1.0 merged with a technical name), none is undetermined
  (every raw file or validated rows file of its imports pruned by retention).
- A member's new user id: the validated rows of the same imports keep each line's ``identifier_type`` and
  ``identifier``; ``user_id_sql`` over them is the current user id. A member matches the lines that stored its
  id, or whose current id it already is (so a second run sees the migrated ids as unchanged). One current id is
  a change (or none), several are ambiguous (0.1.0 merged ``user_agent_id u9`` and ``user_account_id u9``), none
  is undetermined. Rows resolved through a users registry hold registry ids and are left alone.

Ambiguous and undetermined audiences and members are reported by name and left as they are. Renames commit as
imports of their own (the audience keeps its id and history); user ids change through one incremental import
per feed, so membership_events shows a disqualify of the old id and a qualify of the new one (expires_at and
data_bag kept; qualified_at is the migration's instant). A rename onto a name a live audience already has, or
two audiences onto one name, refuses the whole migration before anything changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb

from audience_pipeline.duck import copy_to_parquet, work_connection
from audience_pipeline.formats import FileRejected, get_format, mediarithmics
from audience_pipeline.importer import ImportService
from audience_pipeline.model import ImportStatus, Semantics
from audience_pipeline.storage.catalog import Catalog, ImportRecord, Outcome

EXAMPLES = 5

LIVE_AUDIENCES = """
SELECT a.audience_id, a.name, v.version FROM audiences a JOIN audience_versions v USING (audience_id)
WHERE a.feed = ? AND a.status = 'active' AND v.valid_to IS NULL ORDER BY a.audience_id
"""
LIVE_NAMES = "SELECT name FROM audiences WHERE feed = ? AND status = 'active'"
UNFINISHED = """
SELECT import_id, status, file_name FROM imports
WHERE feed = ? AND status IN ('received', 'held', 'waiting', 'abandoned')
  AND coalesce(source_uri, '') <> 'migrate' ORDER BY import_id
"""
RENAME = "UPDATE audiences SET name = ?, dirty = true WHERE audience_id = ? AND name = ? AND status = 'active'"

WORK_TABLES = """
CREATE TABLE lines (import_id BIGINT, source_line BIGINT, old_key VARCHAR, identifier VARCHAR, user_id VARCHAR,
                    new_user VARCHAR, new_key VARCHAR);
CREATE TABLE audience_imports (audience_id BIGINT, import_id BIGINT);
CREATE TABLE audience_names (audience_id BIGINT, feed VARCHAR, name VARCHAR, final_name VARCHAR);
"""
# One import's lines: the rows 0.1.0 validated (type, identifier, stored user id, audience) beside what the
# current reading of the same raw line names (a line it rejects names nothing).
IMPORT_LINES = """
INSERT INTO lines
SELECT $migrate_import_id, v.source_line, v.audience_key, v.identifier, v.user_id, v.new_user, p.new_key
FROM (SELECT *, ({user_id_sql}) AS new_user FROM read_parquet($migrate_rows)) v
LEFT JOIN (SELECT source_line, CASE WHEN reject_reason IS NULL THEN audience_key END AS new_key
           FROM ({parse})) p USING (source_line)
"""
# The lines that fed each audience: those its name was given to then, or is given to now.
AUDIENCE_LINES = """
CREATE TABLE audience_lines AS
SELECT a.audience_id, l.* FROM audience_names a JOIN audience_imports USING (audience_id)
JOIN lines l USING (import_id) WHERE l.old_key = a.name
UNION ALL
SELECT a.audience_id, l.* FROM audience_names a JOIN audience_imports USING (audience_id)
JOIN lines l USING (import_id) WHERE l.new_key = a.name AND l.old_key IS DISTINCT FROM a.name
"""
NAME_EVIDENCE = """
SELECT audience_id, list(DISTINCT new_key ORDER BY new_key) FILTER (WHERE new_key IS NOT NULL)
FROM audience_lines GROUP BY audience_id
"""
# Each member's current user id candidates, by two equi-joins (an OR join would be a nested loop over 16M
# rows): the lines that stored its id, and the lines whose current id it is. Only lines read without a
# registry count: their stored id is the identifier (0.1.0) or already the current id.
MEMBER_TARGETS = """
CREATE TABLE member_targets AS
WITH keyed AS (
    SELECT audience_id, user_id AS member, new_user FROM audience_lines
    WHERE user_id = identifier OR user_id = new_user
    UNION ALL
    SELECT audience_id, new_user, new_user FROM audience_lines
    WHERE user_id = identifier OR user_id = new_user
),
-- min and max instead of count(DISTINCT): equal when there is one candidate, NULL when none
targets AS (
    SELECT m.audience_id, m.user_id, any_value(m.expires_at) AS expires_at, any_value(m.data_bag) AS data_bag,
           min(k.new_user) AS target, max(k.new_user) AS other
    FROM members m LEFT JOIN keyed k ON k.audience_id = m.audience_id AND k.member = m.user_id
    GROUP BY m.audience_id, m.user_id
),
-- two members moving onto one id would merge (the encoding is collision-free, so this is a safety net)
merging AS (
    SELECT audience_id, target FROM targets WHERE target = other AND target <> user_id
    GROUP BY ALL HAVING count(*) > 1
)
SELECT t.audience_id, t.user_id, t.expires_at, t.data_bag, t.target,
       CASE WHEN t.target IS NULL THEN 'undetermined'
            WHEN t.target <> t.other OR g.target IS NOT NULL THEN 'ambiguous'
            WHEN t.target = t.user_id THEN 'unchanged' ELSE 'change' END AS verdict
FROM targets t LEFT JOIN merging g ON g.audience_id = t.audience_id AND g.target = t.target
"""
MEMBERS = """
CREATE TABLE members AS
SELECT audience_id::BIGINT AS audience_id, user_id, expires_at, data_bag
FROM read_parquet($files, hive_partitioning = true)
"""
MEMBER_SUMMARY = """
SELECT audience_id, verdict, count(*), arg_min([user_id, target], user_id, $examples)
FROM member_targets WHERE verdict <> 'unchanged' GROUP BY ALL ORDER BY ALL
"""
# A changed member's new id may be a member already (added under it since the upgrade): that newer membership
# stays as it is, and only the old id leaves.
OPERATION_ROWS = """
WITH changed AS (
    SELECT t.*, n.final_name FROM member_targets t JOIN audience_names n USING (audience_id)
    WHERE t.verdict = 'change' AND n.feed = $feed
),
staying AS (
    SELECT audience_id, user_id FROM member_targets WHERE verdict <> 'change'
),
commands AS (
    SELECT 0 AS phase, final_name, audience_id, user_id, 'remove' AS action, NULL::TIMESTAMPTZ AS expires_at,
           NULL::VARCHAR AS data_bag FROM changed
    UNION ALL
    SELECT 1, c.final_name, c.audience_id, c.target, 'add', c.expires_at, c.data_bag FROM changed c
    WHERE NOT EXISTS (SELECT 1 FROM staying s WHERE s.audience_id = c.audience_id AND s.user_id = c.target)
)
SELECT final_name AS audience_key, 'user_id' AS identifier_type, user_id AS identifier, user_id, action,
       expires_at, NULL::BIGINT AS expires_in, data_bag, NULL::TIMESTAMPTZ AS observed_at, NULL::VARCHAR AS warning,
       row_number() OVER (ORDER BY phase, audience_id, user_id) AS source_line
FROM commands
"""
ALREADY_MEMBERS = """
SELECT count(*) FROM member_targets c JOIN audience_names n USING (audience_id)
WHERE c.verdict = 'change' AND n.feed = ?
  AND EXISTS (SELECT 1 FROM member_targets s WHERE s.verdict <> 'change' AND s.audience_id = c.audience_id
              AND s.user_id = c.target)
"""


class MigrationRefused(Exception):
    """The workspace cannot be migrated as it stands; nothing was changed."""


@dataclass(frozen=True)
class Rename:
    feed: str
    audience_id: int
    old: str
    new: str
    pruned: int = 0  # imports of the audience whose lines are gone: the name rests on the others


@dataclass(frozen=True)
class MemberChanges:
    feed: str
    audience_id: int
    audience: str
    count: int
    examples: list[tuple[str, str]]


@dataclass(frozen=True)
class Undetermined:
    feed: str
    audience: str
    what: str  # "name" or "members"
    why: str
    count: int = 1
    examples: list[str] = field(default_factory=list)


@dataclass
class Plan:
    renames: list[Rename] = field(default_factory=list)
    members: list[MemberChanges] = field(default_factory=list)
    left_alone: list[Undetermined] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.renames and not self.members

    def lines(self) -> list[str]:
        """The plan as an operator reads it."""
        out = [f"refused: {r}" for r in self.refusals]
        out += [f"rename audience {r.audience_id} of feed {r.feed!r}: {r.old!r} -> {r.new!r}"
                + (f" (decided from its retained lines; {r.pruned} earlier import(s) pruned by retention)"
                   if r.pruned else "") for r in self.renames]
        for m in self.members:
            shown = ", ".join(f"{old!r} -> {new!r}" for old, new in m.examples)
            out.append(f"change {m.count} user id(s) in {m.audience!r} ({m.feed}): {shown}"
                       f"{', ...' if m.count > len(m.examples) else ''}")
        for u in self.left_alone:
            shown = f": {', '.join(repr(e) for e in u.examples)}{', ...' if u.count > len(u.examples) else ''}" \
                if u.examples else ""
            subject = f"the name of {u.audience!r}" if u.what == "name" else f"{u.count} member(s) of {u.audience!r}"
            out.append(f"left unchanged, {u.why}: {subject} ({u.feed}){shown}")
        out += self.notes
        if self.empty and not self.refusals:
            out.append("nothing to migrate: every stored mediarithmics identity already reads as this release "
                       "reads it" + (" (or cannot be determined, above)" if self.left_alone else ""))
        return out


@dataclass
class Applied:
    renames: list[ImportRecord] = field(default_factory=list)
    member_imports: list[ImportRecord] = field(default_factory=list)


class Migration:
    """Plan, then apply, on one work connection (the plan's tables feed the imports that apply it)."""

    def __init__(self, service: ImportService):
        self.service = service
        self.workspace = service.workspace
        self.catalog: Catalog = service.catalog
        self.lake = service.lake
        self.work = self.lake.staging(f"migrate_{os.getpid()}")
        self.con: duckdb.DuckDBPyConnection | None = None
        self.plan: Plan | None = None
        self._finals: dict[int, tuple[str, str]] = {}
        self._versions: dict[int, int] = {}

    def __enter__(self) -> Migration:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.con = work_connection(self.work, self.workspace.config.storage.memory_limit)
        self.con.execute(WORK_TABLES)
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- plan --------------------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        plan = Plan()
        feeds = sorted(n for n, f in self.workspace.config.feeds.items() if f.format == mediarithmics.NAME)
        if not feeds:
            plan.notes.append("no mediarithmics feed in this workspace")
        audiences: dict[int, tuple[str, str, int]] = {}
        with self.catalog.session() as con:
            for feed in feeds:
                for import_id, status, file_name in con.execute(UNFINISHED, [feed]).fetchall():
                    plan.refusals.append(f"import {import_id} ({file_name}) of feed {feed!r} is {status}: approve, "
                                         f"reject or finish it before migrating (it was read the old way)")
                for audience_id, name, version in con.execute(LIVE_AUDIENCES, [feed]).fetchall():
                    audiences[audience_id] = (feed, name, version)
        if plan.refusals:
            self.plan = plan
            return plan
        self._versions = {a: v for a, (_, _, v) in audiences.items()}
        gone = self._load_lines(audiences)
        self.con.executemany("INSERT INTO audience_names VALUES (?, ?, ?, ?)",
                             [[a, f, n, n] for a, (f, n, _) in audiences.items()])
        self.con.execute(AUDIENCE_LINES)
        self._plan_names(plan, audiences, gone)
        if self.workspace.users_path is not None:
            plan.notes.append("user ids: the workspace resolves users through a registry, whose ids this release "
                              "does not re-encode; no user id is changed")
        elif audiences:
            self._plan_members(plan, audiences)
        self.plan = plan
        return plan

    def _load_lines(self, audiences: dict[int, tuple[str, str, int]]) -> dict[int, int]:
        """Read every retained import of these audiences into ``lines``; returns, per audience, how many of
        its imports could not be read (raw file or validated rows pruned)."""
        gone: dict[int, int] = {}
        loaded: dict[int, bool] = {}
        pairs = []
        for audience_id in audiences:
            gone[audience_id] = 0
            for record in self.catalog.applied_imports(audience_id):
                if record.sha256 is None:
                    continue  # a file-less import (deletion, erasure, expiry, an earlier migration): no lines
                if record.import_id not in loaded:
                    loaded[record.import_id] = self._load_import(record)
                if loaded[record.import_id]:
                    pairs.append([audience_id, record.import_id])
                else:
                    gone[audience_id] += 1
        if pairs:
            self.con.executemany("INSERT INTO audience_imports VALUES (?, ?)", pairs)
        return gone

    def _load_import(self, record: ImportRecord) -> bool:
        rows, raw = self.lake.validated_rows(record.import_id), self.lake.raw_path(record.sha256)
        if not (self.lake.fetch(rows) and self.lake.fetch(raw)):
            return False
        feed = self.workspace.feed(record.feed).for_profile(record.profile)
        fmt = get_format(feed.format)
        work = self.work / f"import_{record.import_id}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            text = fmt.decode(raw, record.file_name, feed, work)
            parse, params = fmt.parse_query(text, record.file_name, feed, work, record.received_at)
        except FileRejected as exc:
            raise MigrationRefused(f"import {record.import_id} ({record.file_name}) cannot be read again with "
                                   f"this release: {exc}") from None
        self.con.execute(IMPORT_LINES.format(user_id_sql=mediarithmics.user_id_sql(feed), parse=parse),
                         params | {"migrate_import_id": record.import_id, "migrate_rows": str(rows)})
        shutil.rmtree(work, ignore_errors=True)
        return True

    def _plan_names(self, plan: Plan, audiences: dict[int, tuple[str, str, int]], gone: dict[int, int]) -> None:
        evidence = dict(self.con.execute(NAME_EVIDENCE).fetchall())
        targets: dict[tuple[str, str], list[str]] = {}
        for audience_id, (feed, name, _) in sorted(audiences.items()):
            names = evidence.get(audience_id) or []
            if not names:
                if not name.startswith(mediarithmics.SEGMENT_ID_PREFIX):  # only this release names so
                    why = (f"its lines are gone ({gone[audience_id]} import(s) pruned by retention)"
                           if gone[audience_id] else "no line names it any more")
                    plan.left_alone.append(Undetermined(feed, name, "name", why))
            elif len(names) > 1:
                plan.left_alone.append(Undetermined(
                    feed, name, "name", f"ambiguous: its lines now name {len(names)} audiences", len(names), names))
            elif names[0] != name:
                plan.renames.append(Rename(feed, audience_id, name, names[0], gone[audience_id]))
                targets.setdefault((feed, names[0]), []).append(name)
        with self.catalog.session() as con:
            live = {(f, n) for f in {r.feed for r in plan.renames}
                    for (n,) in con.execute(LIVE_NAMES, [f]).fetchall()}
        for (feed, new), olds in sorted(targets.items()):
            if (feed, new) in live:
                plan.refusals.append(f"feed {feed!r}: {', '.join(map(repr, olds))} would be renamed to {new!r}, "
                                     f"which a live audience already has; merging audiences is not done "
                                     f"silently: move or delete one of them first")
            elif len(olds) > 1:
                plan.refusals.append(f"feed {feed!r}: {', '.join(map(repr, olds))} would all be renamed to "
                                     f"{new!r}; merging audiences is not done silently")
        for rename in plan.renames:
            self.con.execute("UPDATE audience_names SET final_name = ? WHERE audience_id = ?",
                             [rename.new, rename.audience_id])
        self._finals = {a: (f, n) for a, f, n in
                        self.con.execute("SELECT audience_id, feed, final_name FROM audience_names").fetchall()}

    def _plan_members(self, plan: Plan, audiences: dict[int, tuple[str, str, int]]) -> None:
        files = [str(self.lake.members_file(a, v)) for a, (_, _, v) in sorted(audiences.items())
                 if self.lake.fetch(self.lake.members_file(a, v))]
        if not files:
            return
        self.con.execute(MEMBERS, {"files": files})
        self.con.execute(MEMBER_TARGETS)
        already = {feed: self.con.execute(ALREADY_MEMBERS, [feed]).fetchone()[0]
                   for feed in {f for f, _ in self._finals.values()}}
        for audience_id, verdict, count, examples in self.con.execute(
                MEMBER_SUMMARY, {"examples": EXAMPLES}).fetchall():
            feed, name = self._finals[audience_id]
            if verdict == "change":
                plan.members.append(MemberChanges(feed, audience_id, name, count, [tuple(e) for e in examples]))
            else:
                why = ("ambiguous: the lines that stored each of these ids give it more than one current id"
                       if verdict == "ambiguous" else "undetermined: no retained line stored these ids")
                plan.left_alone.append(Undetermined(feed, name, "members", why, count, [e[0] for e in examples]))
        for feed, count in already.items():
            if count:
                plan.notes.append(f"feed {feed!r}: {count} changed member(s) already present under the new id "
                                  "keep that membership; only the old id leaves")

    # -- apply -------------------------------------------------------------------------------------
    def apply(self) -> Applied:
        """Commit the plan: renames first, then one import per feed that changes its user ids."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("make_plan() first")
        if plan.refusals:
            raise MigrationRefused("; ".join(plan.refusals))
        self._unchanged_since_plan(list(self._versions))
        applied = Applied()
        for rename in plan.renames:
            applied.renames.append(self._rename(rename))
        for feed in sorted({m.feed for m in plan.members}):
            applied.member_imports.append(self._change_members(feed))
        return applied

    def _unchanged_since_plan(self, audience_ids: list[int]) -> None:
        """The plan's member lists are still the current ones: rows computed from older lists would undo
        what an import committed in between (re-adding a member it removed)."""
        current = self.catalog.current_versions(audience_ids)
        moved = sorted(a for a in audience_ids if a in self._versions
                       and (a not in current or current[a].version != self._versions[a]))
        if moved:
            names = ", ".join(repr(self._finals.get(a, ("", str(a)))[1]) for a in moved)
            raise MigrationRefused(f"audience(s) {names} changed while the plan was made (an import committed); "
                                   "run migrate again, with the feeds' sensors stopped")

    def _rename(self, rename: Rename) -> ImportRecord:
        """One import that renames one audience, the name change and its finish in one transaction."""
        at = datetime.now(UTC)
        key = f"migrate:rename:{rename.audience_id}"
        delivery = f"{key}:{rename.old}->{rename.new}"
        record = self.catalog.begin_import(
            partition_key=f"{rename.feed}:{key}", delivery=delivery, feed=rename.feed, source_uri="migrate",
            file_name=f"(migrate: rename {rename.old!r} to {rename.new!r})", sha256=None, size_bytes=None,
            semantics=Semantics.INCREMENTAL.value, run_id=None, received_at=at)
        if record.finished:
            return record
        with self.catalog.transaction() as con:
            renamed = con.execute(RENAME + " RETURNING audience_id",
                                  [rename.new, rename.audience_id, rename.old]).fetchall()
            if renamed:
                # the rename and its record commit together (a crash leaves neither)
                Catalog._finish(con, record.import_id, ImportStatus.SUCCEEDED, Outcome(
                    qualified=0, disqualified=0, audiences=(rename.new,)), None, at)
        if not renamed:
            failed = self.catalog.finish_import(record.import_id, ImportStatus.FAILED, Outcome(), error=(
                f"audience {rename.audience_id} is no longer the live audience {rename.old!r}"))
            raise MigrationRefused(f"{failed.error}; run migrate again")
        self.catalog.publish()
        self.catalog.let_go(record.partition_key, record.delivery)
        return self.catalog.get_import(record.import_id)

    def _change_members(self, feed: str) -> ImportRecord:
        """One incremental import of the feed: each changed member's old id leaves, its new id joins with
        the old membership's expires_at and data_bag. Approved up front: the removal gate guards files."""
        audience_ids = {name: a for a, (f, name) in self._finals.items()
                        if f == feed and any(m.audience_id == a for m in self.plan.members)}
        digest = hashlib.sha256()
        for m in sorted(self.plan.members, key=lambda m: m.audience_id):
            if m.feed == feed:
                digest.update(f"{m.audience_id}:{m.count}:{m.examples}\n".encode())
        plan_key = digest.hexdigest()[:16]

        self._unchanged_since_plan(list(audience_ids.values()))

        def write_rows(path):
            copy_to_parquet(self.con, OPERATION_ROWS, {"feed": feed}, path)

        return self.service._operation(
            feed, f"migrate:users:{plan_key}", f"migrate:users:{plan_key}", "migrate", "(migrate user ids)",
            Semantics.INCREMENTAL, datetime.now(UTC), audience_ids, write_rows, approved=True)
