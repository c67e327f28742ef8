"""The production instance config, deploy/dagster.production.yaml, as shipped: a real PostgreSQL server holds
the instance, the project's import job waits in the QueuedRunCoordinator's queue, the real `dagster-daemon`
drains it with the default run launcher, and the queue's limits hold."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
import psycopg
import pytest
import yaml

# Queueing a run from outside the webserver takes the workspace machinery `dagster job launch` uses; Dagster
# exports none of it.
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_postgres import PostgresRunStorage

from audience_pipeline.config import load_workspace
from audience_pipeline.defs.assets import TAG_DELIVERY, TAG_FEED, TAG_SOURCE_URI, audience_files
from audience_pipeline.hashing import sha256_file
from audience_pipeline.keys import partition_key
from audience_pipeline.workspace_setup import prepare
from audience_pipeline_tests.conftest import stop_group
from audience_pipeline_tests.test_daemon import members

PRODUCTION_YAML = Path(__file__).parents[1] / "deploy" / "dagster.production.yaml"
FEEDS = ("alpha_feed", "beta_feed", "gamma_feed")
MAX_CONCURRENT_RUNS = 2
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.fixture
def production_instance(tmp_path, postgres, monkeypatch):
    """The instance of a DAGSTER_HOME holding the production yaml unchanged, its environment variables
    pointing at a fresh database. Yields the instance and the database URL."""
    url = urlparse(postgres())
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PRODUCTION_YAML, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_USERNAME": url.username,
        # The test server trusts loopback and never checks it, but the URL dagster-postgres builds from these
        # variables must still name the right user, host, port and database with these characters in it.
        "DAGSTER_PG_PASSWORD": "p@ss:w/rd%",
        "DAGSTER_PG_HOST": url.hostname,
        "DAGSTER_PG_DB": url.path.lstrip("/"),
        "DAGSTER_PG_PORT": str(url.port),
        "DAGSTER_MAX_CONCURRENT_RUNS": str(MAX_CONCURRENT_RUNS),
        "DAGSTER_LOCAL_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DAGSTER_COMPUTE_LOG_DIR": str(tmp_path / "compute_logs"),
    }.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.get()
    try:
        yield instance, url
    finally:
        instance.dispose()


def queue_imports(instance: dg.DagsterInstance, workspace_yaml: Path, files: list[tuple[str, Path]]) -> list[str]:
    """Submit one audience_import_job run per (feed, file), tagged as the feed sensor tags its runs, the way
    the webserver or `dagster job launch` submits: a run of the code location's job, through submit_run."""
    run_ids = []
    with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(workspace_yaml)])) as process:
        request = process.create_request_context()
        [location_name] = request.code_location_names
        location = request.get_code_location(location_name)
        [repository] = location.get_repositories().values()
        job = repository.get_full_job("audience_import_job")
        plan = location.get_execution_plan(job, {}, step_keys_to_execute=None, known_state=None,
                                           instance=instance).execution_plan_snapshot
        for feed, path in files:
            pkey = partition_key(feed, path.name, sha256_file(path))
            instance.add_dynamic_partitions(audience_files.name, [pkey])
            run = instance.create_run(
                job_name=job.name, run_id=None, run_config={}, status=None,
                tags={**job.tags, "dagster/partition": pkey, TAG_FEED: feed,
                      TAG_DELIVERY: f"test:{uuid.uuid4().hex}", TAG_SOURCE_URI: path.as_uri()},
                root_run_id=None, parent_run_id=None, step_keys_to_execute=plan.step_keys_to_execute,
                execution_plan_snapshot=plan, job_snapshot=job.job_snapshot,
                parent_job_snapshot=job.parent_job_snapshot, asset_selection=None, asset_check_selection=None,
                resolved_op_selection=None, op_selection=None, remote_job_origin=job.get_remote_origin(),
                job_code_origin=job.get_python_origin(), asset_graph=repository.asset_graph,
            )
            assert instance.submit_run(run.run_id, request).status == dg.DagsterRunStatus.QUEUED
            run_ids.append(run.run_id)
    return run_ids


@contextlib.contextmanager
def running_daemon(workspace_yaml: Path, log_path: Path):
    """A real `dagster-daemon run` on the instance of $DAGSTER_HOME, in its own process group."""
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace_yaml)],
            cwd=workspace_yaml.parent, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield daemon
        finally:
            stop_group(daemon)
            # The daemon's code server outlived the daemon, ignoring SIGTERM, in 6 of about 20 runs of this
            # test (dagster 1.13.27): end what is left of the daemon's process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)


def wait_for(condition, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.25)


def wait_for_runs(instance: dg.DagsterInstance, run_ids: list[str], log_path: Path, timeout: float) -> list:
    """The runs' records once every one has ended, polling four times a second."""
    deadline = time.monotonic() + timeout
    while True:
        records = instance.get_run_records(filters=dg.RunsFilter(run_ids=run_ids))
        if len(records) == len(run_ids) and all(r.dagster_run.status in DONE for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"runs not finished: {[r.dagster_run.status for r in records]}\n"
                                 f"{log_path.read_text()[-4000:]}")
        time.sleep(0.25)


@pytest.mark.timeout(300)
def test_production_instance_queues_and_runs_imports(tmp_path, production_instance, postgres, monkeypatch):
    instance, pg_url = production_instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    assert isinstance(instance.run_launcher, dg.DefaultRunLauncher)

    ws = tmp_path / "ws"
    catalog_url = postgres()
    config = {
        # several nodes share the catalog: PostgreSQL too
        "storage": {"lake": "lake", "catalog": catalog_url, "analytics": "analytics.duckdb"},
        "feeds": {feed: {"format": "repro", "source": f"drop/{feed}"} for feed in FEEDS},
    }
    for feed in FEEDS:
        (ws / "drop" / feed).mkdir(parents=True)  # left empty: the daemon's feed sensors ask for no runs
    (ws / "feeds.yaml").write_text(yaml.safe_dump(config))
    (ws / "workspace.yaml").write_text("load_from:\n  - python_module: audience_pipeline.definitions\n")
    monkeypatch.setenv("AUDIENCE_PIPELINE_CONFIG", str(ws / "feeds.yaml"))
    workspace = load_workspace(ws / "feeds.yaml")
    prepare(workspace)

    # Queue order: alpha's older list, its newer list, then one file each of two other feeds.
    files = []
    for n, (feed, name, content) in enumerate([
        ("alpha_feed", "alpha.csv", "a1\na2\na3\n"),
        ("alpha_feed", "alpha.csv", "a2\na3\na4\na5\n"),
        ("beta_feed", "beta.csv", "b1\nb2\n"),
        ("gamma_feed", "gamma.csv", "g1\n"),
    ]):
        path = tmp_path / "incoming" / str(n) / name
        path.parent.mkdir(parents=True)
        path.write_text(content)
        files.append((feed, path))
    # All four wait in the queue before the daemon starts, so its first dequeue sees them together.
    run_ids = queue_imports(instance, ws / "workspace.yaml", files)
    alpha_old, alpha_new = run_ids[0], run_ids[1]

    daemon_log = tmp_path / "daemon.log"
    # Every run stops inside its import (its delivery recorded) until told to go, so the runs the daemon
    # let in at once can be counted while they provably overlap, whatever this machine's speed.
    pause = tmp_path / "pause"
    pause.mkdir()
    monkeypatch.setenv("AUDIENCE_PIPELINE_PAUSE_AT", "receive.begun")
    monkeypatch.setenv("AUDIENCE_PIPELINE_PAUSE_DIR", str(pause))
    with running_daemon(ws / "workspace.yaml", daemon_log):
        wait_for(lambda: len(list(pause.glob("*.paused"))) >= MAX_CONCURRENT_RUNS, daemon_log, 120)
        statuses = [r.dagster_run.status for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=run_ids))]
        (pause / "go").touch()
        records = wait_for_runs(instance, run_ids, daemon_log, 120)
    # Four runs were queued together; max_concurrent_runs let two in, the other two waited in the queue.
    assert sorted(s.value for s in statuses) == sorted(
        [dg.DagsterRunStatus.QUEUED.value] * 2 + [dg.DagsterRunStatus.STARTED.value] * 2), statuses
    assert len(list(pause.glob("*.paused"))) == 4  # and each of them ran its import afterwards

    by_id = {r.dagster_run.run_id: r for r in records}
    assert [by_id[run_id].dagster_run.status for run_id in run_ids] == [dg.DagsterRunStatus.SUCCESS] * 4, (
        daemon_log.read_text()[-4000:])

    # The imports happened, and alpha's newer list is the one applied: it committed last.
    assert members(workspace.analytics, "alpha") == {"a2", "a3", "a4", "a5"}
    assert members(workspace.analytics, "beta") == {"b1", "b2"}
    assert members(workspace.analytics, "gamma") == {"g1"}

    # Both alpha runs could run side by side (no per-feed limit); the catalog applied alpha's lists one
    # after the other, in the order they were received: the older list's version was closed by the newer.
    with psycopg.connect(catalog_url) as con:
        versions = con.execute(
            """SELECT i.run_id, v.valid_to IS NULL FROM audience_versions v JOIN imports i USING (import_id)
               JOIN audiences a USING (audience_id) WHERE a.name = 'alpha' ORDER BY v.import_id""").fetchall()
        assert con.execute("SELECT count(*) FROM audience_locks").fetchone() == (0,)
    assert versions == [(alpha_old, False), (alpha_new, True)]

    # The runs are rows of the PostgreSQL database, not of a local fallback.
    with psycopg.connect(pg_url.geturl()) as con:
        stored = con.execute("SELECT run_id FROM runs WHERE pipeline_name = 'audience_import_job'").fetchall()
    assert {r[0] for r in stored} == set(run_ids)
