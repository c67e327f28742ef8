"""Named fault points for the crash-safety and concurrency tests.

With AUDIENCE_PIPELINE_CRASH_AT=<name> in its environment, a process kills itself (SIGKILL, no cleanup)
when it reaches that point. With AUDIENCE_PIPELINE_JITTER_AT=<name>[,<name>...] it sleeps a random time
of up to AUDIENCE_PIPELINE_JITTER_SECONDS (default 0.1) there, which widens the windows where concurrent
imports can interleave. With AUDIENCE_PIPELINE_PAUSE_AT=<name> and AUDIENCE_PIPELINE_PAUSE_DIR=<folder> it
writes <folder>/<pid>.paused there and waits until <folder>/go exists, so a test can look at processes that
are provably inside an import at the same time. Unset, a point costs one comparison. Every point is listed
in POINTS so the tests can be sure they reached each one."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

POINTS = (
    "receive.staged", "receive.downloaded", "receive.begun", "receive.archived",
    "validate.files_written", "validate.summary_written", "apply.audiences_registered",
    "diff.final_state", "diff.transitions", "diff.members_written", "diff.events_written", "diff.moved_into_place",
    "commit.in_transaction", "commit.committed", "export.written", "export.renamed",
    "apply.superseded", "apply.outboxes", "apply.pruned", "apply.done",
)

_CRASH_AT = os.environ.get("AUDIENCE_PIPELINE_CRASH_AT")
_JITTER_AT = frozenset(filter(None, os.environ.get("AUDIENCE_PIPELINE_JITTER_AT", "").split(",")))
_JITTER_SECONDS = float(os.environ.get("AUDIENCE_PIPELINE_JITTER_SECONDS", "0.1"))
_PAUSE_AT = os.environ.get("AUDIENCE_PIPELINE_PAUSE_AT")
_PAUSE_DIR = os.environ.get("AUDIENCE_PIPELINE_PAUSE_DIR")


def point(name: str) -> None:
    if _CRASH_AT is not None and _CRASH_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if _JITTER_AT and name in _JITTER_AT:
        time.sleep(random.uniform(0, _JITTER_SECONDS))
    if _PAUSE_AT is not None and _PAUSE_AT == name and _PAUSE_DIR:
        _pause(Path(_PAUSE_DIR))


def _pause(folder: Path) -> None:
    (folder / f"{os.getpid()}.paused").touch()
    while not (folder / "go").exists():
        time.sleep(0.05)
