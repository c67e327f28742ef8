"""Named crash points for the crash-safety tests: with AUDIENCE_PIPELINE_CRASH_AT=<name> in its
environment, a process kills itself (SIGKILL, no cleanup) when it reaches that point. Unset, a point costs
one comparison. Every point is listed in POINTS so the tests can be sure they reached each one."""

from __future__ import annotations

import os
import signal

POINTS = (
    "receive.staged", "receive.downloaded", "receive.begun", "receive.archived",
    "validate.files_written", "validate.summary_written", "apply.audiences_registered",
    "diff.final_state", "diff.transitions", "diff.members_written", "diff.events_written", "diff.moved_into_place",
    "commit.in_transaction", "commit.committed", "export.written", "export.renamed",
    "apply.superseded", "apply.outboxes", "apply.pruned", "apply.done",
)

_CRASH_AT = os.environ.get("AUDIENCE_PIPELINE_CRASH_AT")


def point(name: str) -> None:
    if _CRASH_AT is not None and _CRASH_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
