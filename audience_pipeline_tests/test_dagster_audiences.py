"""Audiences and feeds in Dagster, through real imports on a real instance: one `audience` partition per
audience with its history, checks per audience, table schemas that match the files, owners, freshness of
each feed, S3 URIs of an S3 lake, and the run-failure alert for every job."""

import json
import time
from datetime import UTC, datetime, timedelta

import boto3
import dagster as dg
import duckdb

from audience_pipeline.defs.audiences import (
    MEMBERS_SCHEMA,
    VALIDATED_SCHEMA,
    audience_partition_key,
    feed_asset_key,
    feed_specs,
)
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline_tests.conftest import base_config
from audience_pipeline_tests.test_notifications import smtp  # noqa: F401  (a fixture)
from audience_pipeline_tests.test_s3_lake import LAKE_BUCKET, lake_config

AUDIENCE = dg.AssetKey("audience")


def history(env, key: str) -> list[dict]:
    """The partition's materializations, oldest first, as {metadata key: value}."""
    records = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=AUDIENCE, asset_partitions=[key]), limit=100).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in reversed(records)]


def check_results(env, check: str, key: str) -> list[tuple[bool, str | None]]:
    """Evaluations of the audience check on one partition, oldest first: (passed, description)."""
    return [(e.passed, e.description) for e in evaluations(env, AUDIENCE, check) if e.partition == key]


def evaluations(env, asset: dg.AssetKey, check: str) -> list[dg.AssetCheckEvaluation]:
    records = env.instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(asset, check), limit=1000)
    return [r.event.dagster_event.event_specific_data for r in reversed(records) if r.event is not None]


def parquet(path: str) -> duckdb.DuckDBPyConnection:
    """The file's own columns: without hive_partitioning, DuckDB would add those of its folders' names."""
    return duckdb.connect().execute("SELECT * FROM read_parquet(?, hive_partitioning = false)", [path])


def audience_key(env, name: str, feed: str = "repro") -> str:
    return audience_partition_key(feed, name, env.runner.service.catalog.find_audience(feed, name))


def test_each_commit_materializes_its_audience_partition(make_env):
    env = make_env(base_config(gate={"max_removed_share": 0.5}))
    env.import_file("vip.csv", "u1\nu2\nu3\nu4\n")
    env.import_file("news.csv", "n1\n")
    env.import_file("vip.csv", "u1\nu2\nu3\nu4\nu5\nu6\n")
    env.import_file("vip.csv", "u1\nu2\nu3\nu4\nu5\nu6\n")  # the same list: skipped, no commit
    third = env.import_file("vip.csv", "u2\nu3\nu4\nu5\nu6\n")
    vip, news = audience_key(env, "vip"), audience_key(env, "news")
    assert set(env.instance.get_dynamic_partitions("audiences")) == {vip, news}
    assert [(h["import_id"], h["members"], h["qualified"], h["disqualified"]) for h in history(env, vip)] == [
        (1, 4, 4, 0), (3, 6, 2, 0), (5, 5, 0, 1)]
    assert [h["members"] for h in history(env, news)] == [1]
    latest = history(env, vip)[-1]
    assert latest["dagster/partition_row_count"] == len(env.members("vip")) == 5
    members = parquet(latest["members_path"])
    assert [d[0] for d in members.description] == [c.name for c in MEMBERS_SCHEMA.columns]
    assert {r[0] for r in members.fetchall()} == env.members("vip")
    assert third.import_id == latest["import_id"]


def test_an_audience_partition_key_is_short_stable_and_unique():
    long_name = "Ü" * 20 + "x" * 980  # 1,000 characters, as a vendor may name a segment
    key = audience_partition_key("loymax", long_name, 123456)
    assert len(key) <= 60 and key.startswith("loymax:") and key.endswith(":123456")
    assert audience_partition_key("loymax", long_name, 123457) != key
    assert audience_partition_key("loymax", long_name, 123456) == key


def test_a_file_of_several_audiences_reports_each_on_its_own_partition(mics_env):
    env = mics_env

    def command(user, segment):
        return json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": user,
                           "segment_technical_name": segment}) + "\n"

    path = env.root / "drop" / "mics" / "batch.ndjson"
    path.write_text(command("a", "s1") + command("b", "s1") + command("c", "s2"))
    env.runner.import_file("mics", path)
    assert [h["members"] for h in history(env, audience_key(env, "s1", "mics"))] == [2]
    assert [h["members"] for h in history(env, audience_key(env, "s2", "mics"))] == [1]


def test_checks_stay_failed_on_their_audience_until_it_recovers(make_env):
    env = make_env(base_config(gate={"max_removed_share": 0.5}))
    env.import_file("vip.csv", "u1\nu2\nu3\nu4\n")
    env.import_file("news.csv", "n1\nn2\n")
    held = env.import_file("vip.csv", "u1\n")
    vip, news = audience_key(env, "vip"), audience_key(env, "news")
    assert held.status == "held"
    assert check_results(env, "not_held_by_removal_gate", vip)[-1] == (
        False, f"import {held.import_id} (vip.csv) {held.error}")
    env.import_file("news.csv", "n1\nn2\nn3\n")  # another audience's commit changes nothing of vip's
    assert check_results(env, "not_held_by_removal_gate", vip)[-1][0] is False
    assert check_results(env, "no_sudden_list_drop", news)[-1][0] is True

    approved = env.runner.decide(held.import_id, approve=True)
    assert approved.status == "succeeded"
    assert check_results(env, "not_held_by_removal_gate", vip)[-1][0] is True
    assert check_results(env, "no_sudden_list_drop", vip)[-1][0] is False  # 4 -> 1
    assert history(env, vip)[-1]["members"] == 1
    env.import_file("news.csv", "n1\n")  # held: still nothing about vip
    assert check_results(env, "no_sudden_list_drop", vip)[-1][0] is False
    env.import_file("vip.csv", "u1\nu2\n")
    assert check_results(env, "no_sudden_list_drop", vip)[-1][0] is True


def test_a_rejected_import_clears_the_gate_check(make_env):
    env = make_env(base_config(gate={"max_removed": 1}))
    env.import_file("g.csv", "a\nb\nc\n")
    held = env.import_file("g.csv", "a\n")
    env.runner.decide(held.import_id, approve=False)
    assert [passed for passed, _ in check_results(env, "not_held_by_removal_gate", audience_key(env, "g"))] == [
        True, False, True]
    assert env.members("g") == {"a", "b", "c"}


def test_column_schemas_match_the_files_and_row_counts_the_rows(env):
    record = env.import_file("s.csv", "a\nb\nb\nbad,row\n")
    events = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("validated_audience_file"),
                              asset_partitions=[record.partition_key]), limit=1).records
    metadata = events[0].asset_materialization.metadata
    rows = parquet(metadata["rows_path"].value)
    assert [d[0] for d in rows.description] == [c.name for c in VALIDATED_SCHEMA.columns]
    assert metadata["dagster/partition_row_count"].value == len(rows.fetchall()) == record.rows_valid
    assert metadata["dagster/column_schema"].value == VALIDATED_SCHEMA
    repo = env.runner.defs.get_repository_def()
    assert repo.assets_defs_by_key[AUDIENCE].metadata_by_key[AUDIENCE]["dagster/column_schema"] == MEMBERS_SCHEMA


def feed_spec(env) -> dg.AssetSpec:
    return next(s for s in env.runner.defs.assets if isinstance(s, dg.AssetSpec) and s.key == feed_asset_key("repro"))


def test_feeds_are_assets_with_owners_freshness_and_deliveries(make_env, smtp):  # noqa: F811
    config = base_config(admins=["crm-admin@example.com", "not an address"], max_silence_hours=0.0002)
    config["notifications"] = {"smtp": smtp.settings}
    env = make_env(config)
    spec = feed_spec(env)
    assert spec.owners == ["crm-admin@example.com"]  # the admins Dagster accepts as owners
    assert spec.freshness_policy is None  # Dagster refuses windows under a minute: the check alone watches
    daily = make_env(base_config(max_silence_hours=24), name="daily")
    assert feed_spec(daily).freshness_policy.fail_window.to_timedelta() == timedelta(hours=24)
    record = env.import_file("f.csv", "a\n")
    deliveries = env.instance.fetch_materializations(feed_asset_key("repro"), limit=10).records
    assert [d.asset_materialization.metadata["import_id"].value for d in deliveries] == [record.import_id]

    # max_silence_hours is 0.72 s: the feed is silent once a second has passed since the delivery
    while (datetime.now(UTC) - record.received_at).total_seconds() <= 1.0:
        time.sleep(0.05)
    sensor = env.runner.defs.resolve_sensor_def("feed_silence_sensor")
    sensor(dg.build_sensor_context(instance=env.instance, resources={
        "audience_workspace": AudienceWorkspace(config_path=str(env.workspace.path))}))
    [silence] = evaluations(env, feed_asset_key("repro"), "delivered_within_max_silence")
    assert not silence.passed
    assert silence.metadata["last_delivery"].value == record.received_at.isoformat()
    [(_, message)] = smtp.messages  # the e-mail beside it
    assert "no file for" in message["Subject"]


def test_an_s3_lake_reports_s3_uris(make_env, moto_s3):
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=LAKE_BUCKET)
    env = make_env(lake_config(moto_s3))
    record = env.import_file("s3.csv", "a\nb\n")
    raw = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_audience_file"), asset_partitions=[record.partition_key]),
        limit=1).records[0].asset_materialization.metadata
    assert raw["raw_path"].value == f"s3://audience-lake/lake/raw/{record.sha256[:2]}/{record.sha256}"
    [latest] = history(env, audience_key(env, "s3"))
    assert latest["members_path"] == f"s3://audience-lake/lake/members/audience_id=1/version={latest['version']}/data_0.parquet"


def test_a_failed_run_of_any_job_alerts_the_admins(make_env, smtp):  # noqa: F811
    config = base_config(admins=["crm-admin@example.com"])
    config["notifications"] = {"smtp": smtp.settings}
    env = make_env(config)
    record = env.import_file("a.csv", "a\n")  # succeeded: not held, so approving it fails the run
    job = env.runner.defs.resolve_job_def("audience_approve_job")
    result = job.execute_in_process(instance=env.instance, raise_on_error=False, run_config={
        "ops": {"approve_import": {"config": {"import_id": record.import_id}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    sensor = env.runner.defs.resolve_sensor_def("import_run_failure_sensor")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=env.instance,
        dagster_run=result.dagster_run,
        resources={"audience_workspace": AudienceWorkspace(config_path=str(env.workspace.path))},
    ).for_run_failure()
    sensor(context)
    sensor(context)  # once per run
    [(recipients, message)] = smtp.messages
    assert recipients == ["crm-admin@example.com"]
    assert f"audience_approve_job run {result.run_id} failed" in message["Subject"]
    assert f"import {record.import_id} is succeeded, not held" in message.get_content()


def test_materializing_an_audience_by_hand_re_reports_it(make_env):
    from audience_pipeline.defs.audiences import audience

    env = make_env(base_config(gate={"max_removed_share": 0.5}))
    env.import_file("vip.csv", "u1\nu2\nu3\nu4\n")
    held = env.import_file("vip.csv", "u1\n")
    key = audience_key(env, "vip")
    result = dg.materialize([audience], partition_key=key, instance=env.instance, resources={
        "audience_workspace": AudienceWorkspace(config_path=str(env.workspace.path))})
    [materialization] = result.asset_materializations_for_node("audience")
    assert materialization.metadata["members"].value == 4 and materialization.metadata["import_id"].value == 1
    gate = {e.check_name: e for e in result.get_asset_check_evaluations()}["not_held_by_removal_gate"]
    assert not gate.passed and held.error in gate.description
    assert env.members("vip") == {"u1", "u2", "u3", "u4"}  # nothing changed


def test_the_silence_check_runs_on_demand(make_env):
    env = make_env(base_config(max_silence_hours=24))
    env.import_file("f.csv", "a\n")
    [checks] = env.runner.defs.asset_checks
    result = dg.materialize([*feed_specs(env.workspace), checks], selection=dg.AssetSelection.all_asset_checks(),
                            instance=env.instance,
                            resources={"audience_workspace": AudienceWorkspace(config_path=str(env.workspace.path))})
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.asset_key == feed_asset_key("repro") and evaluation.passed


def test_deleting_an_audience_reports_its_last_commit(env):
    env.import_file("gone.csv", "a\nb\n")
    key = audience_key(env, "gone")
    job = env.runner.defs.resolve_job_def("audience_delete_job")
    assert job.execute_in_process(instance=env.instance, run_config={
        "ops": {"delete_audience": {"config": {"feed": "repro", "name": "gone"}}}}).success
    assert [(h["members"], h["disqualified"]) for h in history(env, key)] == [(2, 0), (0, 2)]
    assert check_results(env, "no_sudden_list_drop", key)[-1] == (True, "the audience was deleted")
