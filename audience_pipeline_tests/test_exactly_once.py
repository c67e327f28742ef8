"""The same file version delivered 100 times applies once; versions arriving together apply in arrival order."""

import json
import time

import dagster as dg

from audience_pipeline.runner import sensor_context
from audience_pipeline_tests.conftest import base_config


def test_one_version_delivered_a_hundred_times_applies_once(env):
    env.drop_file("once.csv", "a\nb\nc\n")
    sensor = env.runner.defs.resolve_sensor_def("repro_audience_sensor")
    job = env.runner.defs.resolve_job_def("audience_import_job")
    deliveries = 0
    for _ in range(34):  # ticks that lost their cursor: the same version is requested again and again
        [request] = sensor(sensor_context(env.workspace, env.instance, env.runner.defs, None)).run_requests
        env.runner.run(request.partition_key, request.tags["audience_pipeline/delivery"],
                       request.tags["audience_pipeline/source_uri"])
        deliveries += 1
    key = request.partition_key
    for _ in range(33):  # manual re-materializations from the UI or the dagster CLI
        assert job.execute_in_process(partition_key=key, instance=env.instance).success
        deliveries += 1
    for _ in range(33):  # the file imported by hand, over and over
        assert env.import_file("once.csv").status == "skipped"
        deliveries += 1
    assert deliveries == 100
    assert env.members("once") == {"a", "b", "c"}
    assert env.query("SELECT count(*) FROM membership_events") == [(3,)]
    assert env.query("SELECT status, count(*) FROM imports GROUP BY ALL ORDER BY ALL") == [
        ("skipped", 33), ("succeeded", 1)]
    runs = env.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": key}))
    assert len(runs) == 100 - 33 + 33  # every delivery ran, and only one changed anything


def test_versions_arriving_together_apply_in_arrival_order(make_env):
    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics"}}
    env = make_env(config)
    drop = env.root / "drop" / "mics"
    drop.mkdir(parents=True, exist_ok=True)

    def command(op):
        return json.dumps({"operation": op, "expiration_duration": 0, "user_account_id": "u1",
                           "segment_technical_name": "s"})

    # z_first.ndjson arrives first although its name sorts last
    (drop / "z_first.ndjson").write_text(command("UPDATE") + "\n")
    time.sleep(0.05)
    (drop / "a_second.ndjson").write_text(command("DELETE") + "\n")
    records = env.runner.poll("mics")
    assert [r.file_name for r in records] == ["z_first.ndjson", "a_second.ndjson"]
    assert env.members("s") == set()  # the DELETE that arrived last wins
    assert env.query("SELECT action FROM membership_events WHERE audience_name = 's' ORDER BY import_id") == [
        ("qualify",), ("disqualify",)]
