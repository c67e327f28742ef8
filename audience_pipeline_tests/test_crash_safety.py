"""SIGKILL at every named point of an import, then a re-run of the same delivery: the result equals an
uncrashed import, and in between an analyst sees the state before or after, never a mixture."""

import hashlib
import os
import subprocess
import sys

import pytest

from audience_pipeline import faults
from audience_pipeline.keys import partition_key
from audience_pipeline_tests.conftest import base_config, over_both_catalogs

BEFORE = {f"u{i:03d}" for i in range(0, 60)}
AFTER = {f"u{i:03d}" for i in range(20, 90)}  # 20 leave, 30 join

RUN = """
import sys
import dagster as dg
from audience_pipeline.config import load_workspace
from audience_pipeline.runner import Runner
workspace = load_workspace(sys.argv[1])
instance = dg.DagsterInstance.local_temp(tempdir=sys.argv[2])
record = Runner(workspace, instance).run(sys.argv[3], sys.argv[4], sys.argv[5])
print(record.status)
"""


def snapshot_state(env) -> tuple:
    return (
        frozenset(env.members("crash")),
        env.query("SELECT count(*) FROM membership_events WHERE audience_name = 'crash'")[0][0],
        tuple(env.query("SELECT status FROM imports ORDER BY import_id")),
    )


CASES = [(catalog, p) for catalog in ("duckdb", "postgresql") for p in faults.POINTS]


@pytest.fixture
def catalog_location(request):
    return over_both_catalogs(request)


@pytest.mark.parametrize(("catalog_location", "point"), CASES, indirect=["catalog_location"])
def test_kill_at_each_point_then_rerun_converges(make_env, tmp_path, point):
    config = base_config()
    config["outboxes"] = [{"location": "outbox", "mode": "changes"}]
    env = make_env(config)
    env.import_file("crash.csv", "".join(u + "\n" for u in sorted(BEFORE)))
    before = snapshot_state(env)
    path = env.drop_file("crash.csv", "".join(u + "\n" for u in sorted(AFTER)))
    pkey = partition_key("repro", "crash.csv", hashlib.sha256(path.read_bytes()).hexdigest())
    delivery, uri = "cli:crash-test", path.resolve().as_uri()

    (tmp_path / "dagster_sub").mkdir(exist_ok=True)
    crashed = subprocess.run(
        [sys.executable, "-c", RUN, str(env.workspace.path), str(tmp_path / "dagster_sub"), pkey, delivery, uri],
        env={**os.environ, "AUDIENCE_PIPELINE_CRASH_AT": point}, capture_output=True, text=True, timeout=300,
    )
    assert crashed.returncode == -9, f"{point} was not reached:\n{crashed.stdout}\n{crashed.stderr[-2000:]}"

    # between the crash and the re-run an analyst sees the whole old state or the whole new one
    mid_members, mid_events, _ = snapshot_state(env)
    assert mid_members in (frozenset(BEFORE), frozenset(AFTER))
    assert mid_events == (60 if mid_members == frozenset(BEFORE) else 60 + 50)

    record = env.runner.run(pkey, delivery, uri)  # the same delivery again: converges
    assert record.status == "succeeded"
    assert (record.qualified, record.disqualified, record.members) == (30, 20, 70)
    members, events, statuses = snapshot_state(env)
    assert members == frozenset(AFTER)
    assert events == 60 + 50  # each event once, crash or no crash
    assert statuses == (("succeeded",), ("succeeded",))
    assert before[0] == frozenset(BEFORE)
    # every file the views reference exists, and the outbox holds the import's file once
    env.query("SELECT count(*) FROM members")
    outbox = sorted(p.name for p in (env.root / "outbox").iterdir() if not p.name.startswith("."))
    assert outbox == [f"{1:012d}_crash.changes.csv.gz", f"{record.import_id:012d}_crash.changes.csv.gz"]
