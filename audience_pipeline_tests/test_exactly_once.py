"""The same file version delivered 100 times applies once; versions arriving together apply in arrival order."""

import json
import time

import dagster as dg
import pytest

from audience_pipeline.runner import RunNotRecorded, sensor_context
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


def test_a_cli_redelivery_of_archived_content_is_not_read_again(env):
    """`audience-pipeline import` hashes the file for its partition key and hands the hash to the run (tag
    `audience_pipeline/sha256`): content already in the raw archive is neither read nor copied again (a 500 MB
    re-delivery spent a second copying it). Shown by a run whose file is gone by the time it starts: it
    imports the archived content the hash names. A hash the archive does not hold is not trusted: that file
    is read, hashed and archived as always."""
    from audience_pipeline.hashing import sha256_file
    from audience_pipeline.keys import partition_key

    first = env.import_file("gone.csv", "a\nb\n")
    path = env.drop / "gone.csv"
    assert env.runner.instance.get_run_by_id(first.run_id).tags["audience_pipeline/sha256"] == first.sha256
    path.unlink()
    again = env.runner.run(partition_key("repro", "gone.csv", first.sha256), "cli:again", path.as_uri(),
                           {"audience_pipeline/sha256": first.sha256})
    assert (again.status, again.sha256, again.file_name) == ("skipped", first.sha256, "gone.csv")
    assert "content identical" in again.error
    assert env.members("gone") == {"a", "b"}
    # a tag that is not a well-formed digest names no archived file: the (missing) file is read, and fails
    with pytest.raises(RunNotRecorded, match="gone.csv no longer exists"):
        env.runner.run(partition_key("repro", "gone.csv", first.sha256), "cli:malformed", path.as_uri(),
                       {"audience_pipeline/sha256": first.sha256.upper()})

    new = env.drop_file("gone.csv", "a\nc\n")
    unknown = "f" * 64  # not in the archive: the file is read and hashed
    sha = sha256_file(new)
    record = env.runner.run(partition_key("repro", "gone.csv", sha), "cli:new", new.as_uri(),
                            {"audience_pipeline/sha256": unknown})
    assert (record.status, record.sha256) == ("succeeded", sha)
    assert env.runner.service.lake.raw_path(sha).read_bytes() == b"a\nc\n"
    assert env.members("gone") == {"a", "c"}
