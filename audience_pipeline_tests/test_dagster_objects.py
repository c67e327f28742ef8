"""The Dagster objects people schedule or click, executed on a real instance: the expiry job and its
schedule, the approve and reject jobs, the feed-silence sensor (through a real SMTP server), and the cap on
the import sensor's retries."""

import json
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.runner import RunNotRecorded, sensor_context
from audience_pipeline_tests.conftest import base_config
from audience_pipeline_tests.test_notifications import smtp  # noqa: F401  (a fixture)


def sleep_until(instant: datetime) -> None:
    while datetime.now(UTC) <= instant:
        time.sleep(0.05)


def test_expiry_job_and_its_schedule(mics_env):
    env = mics_env

    def command(user, expires_ms):
        return json.dumps({"operation": "UPDATE", "expiration_duration": 0, "expiration_ts": expires_ms,
                           "user_account_id": user, "segment_technical_name": "short"}) + "\n"

    # an expiry a few seconds ahead; if this machine took longer to apply it, the member was (rightly) left
    # out: try again further ahead, so the outcome never depends on the machine's speed
    ahead = 3
    for attempt in range(6):
        expires = datetime.now(UTC) + timedelta(seconds=ahead)
        record = env.import_file(f"{attempt}.ndjson", command("keep", 0) + command("brief", int(
            expires.timestamp() * 1000)), feed="mics")
        if record.applied_at < expires:
            break
        ahead *= 2
    assert env.members("short") == {"keep", "brief"}
    sleep_until(expires)
    assert env.members("short") == {"keep"}  # the views leave an expired membership out at once

    result = env.runner.defs.resolve_job_def("audience_expiry_job").execute_in_process(instance=env.instance)
    assert result.success
    [(import_id, label, disqualified)] = env.query(
        "SELECT import_id, file_name, disqualified FROM imports WHERE file_name = '(expiry sweep)'")
    assert (label, disqualified) == ("(expiry sweep)", 1)
    [(user, action, event_at)] = env.query(
        "SELECT user_id, action, event_at FROM membership_events WHERE import_id = ?", [import_id])
    assert (user, action) == ("brief", "disqualify")
    assert abs(event_at - expires) < timedelta(milliseconds=1)  # at the membership's own expiry
    # a second run finds nothing more to sweep
    env.runner.defs.resolve_job_def("audience_expiry_job").execute_in_process(instance=env.instance)
    assert env.query("SELECT count(*) FROM imports WHERE file_name = '(expiry sweep)'") == [(1,)]

    schedule = env.runner.defs.resolve_schedule_def("audience_expiry_schedule")
    tick = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    context = dg.build_schedule_context(instance=env.instance, scheduled_execution_time=tick)
    [request] = schedule.evaluate_tick(context).run_requests
    assert schedule.job_name == "audience_expiry_job" and request is not None
    assert schedule.cron_schedule == "5 * * * *"


def test_approve_and_reject_jobs(make_env):
    env = make_env(base_config(gate={"max_removed": 1}))
    env.import_file("g.csv", "a\nb\nc\nd\n")
    held = env.import_file("g.csv", "a\n")
    assert held.status == "held"
    reject = env.runner.defs.resolve_job_def("audience_reject_job")
    assert reject.execute_in_process(instance=env.instance, run_config={
        "ops": {"reject_import": {"config": {"import_id": held.import_id}}}}).success
    assert env.query("SELECT status FROM imports WHERE import_id = ?", [held.import_id]) == [("rejected",)]
    assert env.members("g") == {"a", "b", "c", "d"}

    again = env.import_file("g.csv", "b\n")
    assert again.status == "held"
    approve = env.runner.defs.resolve_job_def("audience_approve_job")
    result = approve.execute_in_process(instance=env.instance, run_config={
        "ops": {"approve_import": {"config": {"import_id": again.import_id}}}})
    assert result.success
    assert env.members("g") == {"b"}
    assert env.query("SELECT status FROM imports WHERE import_id = ?", [again.import_id]) == [("succeeded",)]


def test_feed_silence_sensor_mails_once_per_silent_spell(make_env, smtp):  # noqa: F811
    config = base_config(admins=["crm-admin@example.com"], max_silence_hours=0.0002)  # 0.72 s
    config["notifications"] = {"smtp": smtp.settings}
    env = make_env(config)
    record = env.import_file("s.csv", "a\n")
    sensor = env.runner.defs.resolve_sensor_def("feed_silence_sensor")

    def tick():
        return sensor(dg.build_sensor_context(
            instance=env.instance, definitions=env.runner.defs,
            resources={"audience_workspace": AudienceWorkspace(config_path=str(env.workspace.path))}))

    sleep_until(record.received_at + timedelta(seconds=1))
    assert tick().skip_message == "alerted: repro"
    assert tick().skip_message == "every watched feed delivered in time"  # one e-mail per spell
    [(to, message)] = smtp.messages
    assert to == ["crm-admin@example.com"] and "no file for" in message["Subject"]


def test_the_sensor_retries_a_failed_delivery_up_to_its_cap(env):
    from audience_pipeline.defs.sensors import MAX_ATTEMPTS

    path = env.drop_file("lost.csv", "u1\n")
    sensor = env.runner.defs.resolve_sensor_def("repro_audience_sensor")
    result = sensor(sensor_context(env.workspace, env.instance, env.runner.defs, None))
    [request] = result.run_requests
    env.runner.service.catalog.set_cursor("repro", result.cursor)
    path.unlink()  # listed, then gone before its run could read it
    delivery, source = request.tags["audience_pipeline/delivery"], request.tags["audience_pipeline/source_uri"]
    with pytest.raises(RunNotRecorded):  # run as the feed's poll runs what its sensor asks for
        env.runner.run(request.partition_key, delivery, source,
                       {k: v for k, v in request.tags.items() if v not in (delivery, source)})
    for _ in range(MAX_ATTEMPTS + 2):
        assert env.runner.poll("repro") == []  # each retry fails again before recording an import
    attempts = sorted(int(run.tags.get("audience_pipeline/attempt", "1")) for run in env.instance.get_runs(
        filters=dg.RunsFilter(job_name="audience_import_job")))
    assert attempts == list(range(1, MAX_ATTEMPTS + 1))  # and after the cap, no more runs
