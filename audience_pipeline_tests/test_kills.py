"""Imports killed at random points (SIGKILL: a lost node, an OOM kill) through the CLI, as a user would run
them, over both catalogs: each killed import ends abandoned, and the next delivery of the file applies at
once, without waiting for anything the dead processes held."""

import os
import random
import signal
import subprocess
import sys

import pytest

from audience_pipeline_tests.conftest import base_config, over_both_catalogs

# Every fault point from the import's opening in the catalog up to its commit transaction (the points
# before it leave no import to abandon).
IN_PROGRESS_POINTS = (
    "receive.begun", "receive.archived", "validate.files_written", "validate.summary_written",
    "apply.audiences_registered", "diff.final_state", "diff.transitions", "diff.members_written",
    "diff.events_written", "diff.moved_into_place", "commit.in_transaction",
)


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def cli(env, *args, crash_at: str | None = None):
    variables = {"PATH": "/usr/bin:/bin", "HOME": str(env.root), "COLUMNS": "200"}
    if crash_at:
        variables["AUDIENCE_PIPELINE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args, "--config", str(env.workspace.path)],
                          cwd=env.root, capture_output=True, text=True, env=variables)


def test_killed_imports_end_abandoned_and_the_next_import_applies(make_env, tmp_path):
    config = base_config()
    config["storage"].update(liveness_timeout_seconds=5)
    env = make_env(config)
    assert env.import_file("crash.csv", "left_before\n").status == "succeeded"
    ids = [f"user{i:08d}" for i in range(20_000)]
    path = tmp_path / "crash.csv"
    path.write_text("\n".join(ids) + "\n")
    points = random.Random().sample(IN_PROGRESS_POINTS, 4)
    for point in points:
        killed = cli(env, "import", str(path), "--feed", "repro", crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout, killed.stderr)
    final = cli(env, "import", str(path), "--feed", "repro")
    assert final.returncode == 0, (points, final.stdout, final.stderr)
    assert "succeeded" in final.stdout and "+20000 qualified, -1 disqualified" in final.stdout

    assert env.members("crash") == set(ids)
    rows = env.query("SELECT import_id, status, error FROM imports ORDER BY import_id")
    assert [status for _, status, _ in rows] == ["succeeded", *["abandoned"] * 4, "succeeded"], points
    for import_id, _, error in rows[1:-1]:
        assert "died" in error and "pid" in error, error
        # found dead by a later import (the next killed one, when it got as far as waiting, or the last)
        finder = int(error.split("found dead by import ")[1].split(".")[0])
        assert import_id < finder <= rows[-1][0]
    with env.runner.service.catalog.session() as con:
        assert con.execute("SELECT count(*) FROM audience_locks").fetchone() == (0,)
    holders = env.workspace.catalog.with_name(env.workspace.catalog.name + ".holders") \
        if not str(env.workspace.catalog).startswith("postgres") else None
    if holders is not None:
        assert sorted(os.listdir(holders)) == []  # a dead holder's lock file goes with its import
