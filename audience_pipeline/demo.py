"""The demo (``audience-pipeline demo``, ``make demo``): staged deliveries of every format, landed in the
feeds' drop folders one step at a time and imported by the feeds' own sensors, then a summary of what changed.

A workspace's ``data/demo/`` holds the steps, in name order; inside a step, one folder per feed, whose
content is copied into that feed's drop folder as it is (profile folders such as Loymax's ``remove/`` kept):

    data/demo/1-first-delivery/odp/newsletter_engaged.csv.gz  ->  data/drop/odp/newsletter_engaged.csv.gz

A staged file is due when the catalog has no import of its content under its name, nor of a later step's file
for the same drop path, so the demo resumes where an earlier run stopped and a second run imports nothing. A
file at a due file's drop path that no import knows is a leftover of an earlier run, and is removed first.
The files stay in the drop folders, so ``make dev``'s sensors see the same deliveries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import duckdb

from audience_pipeline.config import ConfigError, Workspace
from audience_pipeline.hashing import sha256_file
from audience_pipeline.keys import partition_key
from audience_pipeline.storage.catalog import ImportRecord

DEMO_FOLDER = "data/demo"


class DemoError(ValueError):
    """The staged deliveries cannot be delivered (no demo folder, a folder naming no local feed)."""


class Poller(Protocol):
    def poll(self, feed: str) -> list[ImportRecord]: ...


class ImportLookup(Protocol):
    def latest_import(self, partition_key: str) -> ImportRecord | None: ...


@dataclass(frozen=True)
class StagedFile:
    step: str
    feed: str
    path: Path  # the staged copy under data/demo/<step>/<feed>/
    destination: Path  # where it lands in the feed's drop folder

    def partition_key(self) -> str:
        return partition_key(self.feed, self.path.name, sha256_file(self.path))


@dataclass
class DemoRun:
    staged: list[StagedFile]
    due: list[StagedFile]
    imports: list[tuple[str, str, ImportRecord]] = field(default_factory=list)  # (step, feed, record)

    @property
    def import_ids(self) -> list[int]:
        return [record.import_id for _, _, record in self.imports]


def _folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def staged_files(workspace: Workspace) -> list[StagedFile]:
    """Every staged file, in delivery order (step, then feed, then path)."""
    root = workspace.root / DEMO_FOLDER
    if not root.is_dir():
        raise DemoError(f"{root} does not exist: the demo delivers the staged files found there "
                        "(`audience-pipeline init DIR` writes a workspace that has them)")
    staged = []
    for step in _folders(root):
        for feed_dir in _folders(step):
            try:
                location = workspace.source_location(feed_dir.name)
            except ConfigError:
                raise DemoError(f"{feed_dir}: {workspace.path} has no feed named {feed_dir.name!r}") from None
            if "://" in location and not location.startswith("file://"):
                raise DemoError(f"{feed_dir}: feed {feed_dir.name!r} reads {location}, not a local drop folder; "
                                "the demo delivers into local folders only")
            drop = Path(location.removeprefix("file://"))
            for path in sorted(p for p in feed_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
                staged.append(StagedFile(step.name, feed_dir.name, path, drop / path.relative_to(feed_dir)))
    return staged


def due_files(staged: list[StagedFile], catalog: ImportLookup) -> list[StagedFile]:
    """The staged files still to deliver. A drop path whose later version was imported is done with: copying
    an earlier version again would undo a delivery."""
    due, done_with = [], set()
    for item in reversed(staged):
        if item.destination in done_with:
            continue
        if catalog.latest_import(item.partition_key()) is not None:
            done_with.add(item.destination)
        else:
            due.append(item)
    return list(reversed(due))


def _land(item: StagedFile) -> None:
    """Copy a staged file into its drop folder in one rename: the sensor never sees half a file (it skips
    hidden names)."""
    dest = item.destination
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.demo-partial")
    shutil.copyfile(item.path, partial)
    os.replace(partial, dest)


def deliver(workspace: Workspace, catalog: ImportLookup, poller: Poller,
            on_step: Callable[[str, list[StagedFile]], None] | None = None,
            on_import: Callable[[str, str, ImportRecord], None] | None = None) -> DemoRun:
    """Land each step's due files, then poll the feeds they belong to, before the next step lands."""
    staged = staged_files(workspace)
    run = DemoRun(staged=staged, due=due_files(staged, catalog))
    for item in run.due:
        # a file no import knows, left by an earlier run (after `make clean`, or interrupted): a sensor
        # would import it with the first step, out of order
        dest = item.destination
        if dest.is_file() and catalog.latest_import(partition_key(item.feed, dest.name, sha256_file(dest))) is None:
            dest.unlink()
    steps: dict[str, list[StagedFile]] = {}
    for item in run.due:
        steps.setdefault(item.step, []).append(item)
    for step, items in steps.items():
        if on_step:
            on_step(step, items)
        for item in items:
            _land(item)
        for feed in sorted({item.feed for item in items}):
            for record in poller.poll(feed):
                run.imports.append((step, feed, record))
                if on_import:
                    on_import(step, feed, record)
    return run


@dataclass(frozen=True)
class Section:
    title: str
    cursor: duckdb.DuckDBPyConnection


CHANGES_SQL = """
SELECT a.feed, e.audience_name AS audience,
       count(*) FILTER (WHERE e.action = 'qualify') AS qualified,
       count(*) FILTER (WHERE e.action = 'disqualify') AS disqualified,
       any_value(a.member_count) AS members_now
FROM membership_events e JOIN audiences a USING (audience_id)
WHERE list_contains(?, e.import_id)
GROUP BY ALL ORDER BY a.feed, audience"""

REJECTS_SQL = """
SELECT r.import_id, i.feed, i.file_name, r.line_number AS line, r.reason
FROM rejected_rows r JOIN imports i USING (import_id)
WHERE list_contains(?, r.import_id)
ORDER BY r.import_id, r.line_number"""

HELD_SQL = """
SELECT import_id, feed, file_name, qualified AS would_qualify, disqualified AS would_disqualify, error AS reason
FROM imports WHERE status IN ('held', 'waiting') ORDER BY import_id"""


def summary(con: duckdb.DuckDBPyConnection, run: DemoRun) -> list[Section]:
    """What this run changed (per audience), the rows it rejected, and every import waiting for an operator."""
    sections = []
    if run.imports:
        sections.append(Section("what changed in this demo, per audience",
                                con.cursor().execute(CHANGES_SQL, [run.import_ids])))
        sections.append(Section("rejected rows (audience-pipeline rejects IMPORT_ID shows each line)",
                                con.cursor().execute(REJECTS_SQL, [run.import_ids])))
    sections.append(Section("held by the removal gate (audience-pipeline approve IMPORT_ID applies it, "
                            "reject IMPORT_ID drops it)", con.cursor().execute(HELD_SQL)))
    return sections


def held_imports(con: duckdb.DuckDBPyConnection) -> list[int]:
    return [row[0] for row in con.execute("SELECT import_id FROM imports WHERE status IN ('held', 'waiting') "
                                          "ORDER BY import_id").fetchall()]


def where_to_look(workspace: Workspace, held: list[int], invoked_from: Path) -> list[str]:
    """Commands to run next, with ``--config`` unless the workspace is the default one where they run."""
    config = "" if workspace.path == invoked_from / "feeds.yaml" else f" --config {workspace.path}"
    lines = [
        f"analyst views:  duckdb -readonly {workspace.analytics}   (e.g. SELECT * FROM audiences)",
        f"activity log:   audience-pipeline activity{config}",
        f"members:        audience-pipeline members high_intent{config}",
    ]
    for import_id in held:
        lines.append(f"held import:    audience-pipeline approve {import_id}{config}   "
                     f"(or: audience-pipeline reject {import_id}{config})")
    lines.append(f"Dagster UI:     make dev (or DAGSTER_HOME={workspace.root} dagster dev -w "
                 f"{workspace.root / 'workspace.yaml'}), then http://127.0.0.1:3000")
    return lines
