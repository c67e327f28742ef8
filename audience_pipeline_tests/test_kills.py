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


def cli(env, *args, crash_at: str | None = None, dagster_home=None):
    variables = {"PATH": "/usr/bin:/bin", "HOME": str(env.root), "COLUMNS": "200"}
    if dagster_home:
        variables["DAGSTER_HOME"] = str(dagster_home)
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


RUN_ONE = """
import json, sys
from audience_pipeline.config import load_workspace
from audience_pipeline.runner import Runner, instance_for
workspace = load_workspace(sys.argv[1])
Runner(workspace, instance_for(workspace)).run(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
"""


def test_the_sensor_abandons_a_killed_run_and_retries_its_delivery(make_env, tmp_path):
    """As the daemon does it: a tick keeps its cursor and its run goes to another process, killed there
    mid-import. The next tick finds the holder dead, marks the import abandoned and asks for the delivery
    again with the run's tags; that run takes the import over and finishes it. A killed CLI import is
    abandoned too, but not retried: the CLI reported its own failure."""
    import json

    import dagster as dg

    from audience_pipeline.runner import Runner, sensor_context

    env = make_env(base_config())
    home = tmp_path / "shared_home"
    home.mkdir()
    instance = dg.DagsterInstance.from_config(str(home))
    runner = Runner(env.workspace, instance)
    env.drop_file("a.csv", "u1\nu2\n")
    sensor = runner.defs.resolve_sensor_def("repro_audience_sensor")
    tick = sensor(sensor_context(env.workspace, instance, runner.defs, None))
    [request] = tick.run_requests
    runner.service.catalog.set_cursor("repro", tick.cursor)
    instance.add_dynamic_partitions("audience_files", [request.partition_key])
    variables = {"PATH": "/usr/bin:/bin", "HOME": str(env.root), "DAGSTER_HOME": str(home),
                 "AUDIENCE_PIPELINE_CRASH_AT": "validate.summary_written"}
    killed = subprocess.run([sys.executable, "-c", RUN_ONE, str(env.workspace.path), request.partition_key,
                             request.tags["audience_pipeline/delivery"], request.tags["audience_pipeline/source_uri"],
                             json.dumps(dict(request.tags))], cwd=env.root, capture_output=True, text=True,
                            env=variables)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (tmp_path / "b.csv").write_text("u3\n")
    cli_killed = cli(env, "import", str(tmp_path / "b.csv"), "--feed", "repro", crash_at="validate.summary_written",
                     dagster_home=home)
    assert cli_killed.returncode == -signal.SIGKILL

    [record] = runner.poll("repro")
    assert (record.import_id, record.status, record.file_name) == (1, "succeeded", "a.csv")
    assert env.members("a") == {"u1", "u2"}
    [retry] = instance.get_runs(filters=dg.RunsFilter(tags={"audience_pipeline/attempt": "2"}))
    assert retry.tags["audience_pipeline/delivery"] == record.delivery
    assert retry.tags["audience_pipeline/source_uri"].endswith("/a.csv")
    cli_import = runner.service.catalog.get_import(2)
    assert cli_import.status == "abandoned" and "found dead by the repro sensor" in cli_import.error
    assert env.members("b") == set()
    assert runner.poll("repro") == []  # nothing more to retry
