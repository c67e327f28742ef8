"""End to end with the real Dagster daemon: its sensor polls a real S3 API server and launches the runs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import duckdb
import yaml

from audience_pipeline.config import load_workspace
from audience_pipeline.workspace_setup import prepare
from audience_pipeline_tests.conftest import base_config, stop_group

BUCKET = "daemon-drop"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def members(analytics: Path, audience: str) -> set[str]:
    con = duckdb.connect(str(analytics), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT user_id FROM members WHERE audience_name = ?", [audience]).fetchall()}
    finally:
        con.close()


def test_daemon_sensor_imports_from_s3(tmp_path, moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    ws = tmp_path / "ws"
    home = tmp_path / "dagster_home"
    ws.mkdir()
    home.mkdir()
    config = base_config(source=f"s3://{BUCKET}/in/", poll_interval_seconds=5,
                         s3={"endpoint_url": moto_s3, "region": "us-east-1"})
    (ws / "feeds.yaml").write_text(yaml.safe_dump(config))
    (ws / "workspace.yaml").write_text("load_from:\n  - python_module: audience_pipeline.definitions\n")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    workspace = load_workspace(ws / "feeds.yaml")
    prepare(workspace)
    env = {**os.environ, "DAGSTER_HOME": str(home), "AUDIENCE_PIPELINE_CONFIG": str(ws / "feeds.yaml")}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(ws / "workspace.yaml")],
        cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        client.put_object(Bucket=BUCKET, Key="in/daemon_list.csv", Body=b"d1\nd2\nd3\n")
        wait_for(lambda: members(workspace.analytics, "daemon_list") == {"d1", "d2", "d3"}, 150,
                 "the daemon's first import")
        client.put_object(Bucket=BUCKET, Key="in/daemon_list.csv", Body=b"d2\nd3\nd4\n")
        wait_for(lambda: members(workspace.analytics, "daemon_list") == {"d2", "d3", "d4"}, 150,
                 "the daemon's second import")
        con = duckdb.connect(str(workspace.analytics), read_only=True)
        events = con.execute(
            "SELECT action, user_id FROM membership_events WHERE import_id = "
            "(SELECT max(import_id) FROM imports WHERE status = 'succeeded') ORDER BY ALL").fetchall()
        runs = con.execute("SELECT count(*), count(DISTINCT run_id) FROM imports").fetchone()
        con.close()
        assert events == [("disqualify", "d1"), ("qualify", "d4")]
        assert runs == (2, 2)
    finally:
        stop_group(daemon)
        log.close()
