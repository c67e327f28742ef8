"""S3 as a drop location, against a real S3 API server on loopback (moto server mode), never a patched client."""

import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from audience_pipeline.cursor import Cursor
from audience_pipeline.polling import poll_feed
from audience_pipeline.runner import sensor_context
from audience_pipeline.sources import SourceRefused
from audience_pipeline_tests.conftest import base_config

BUCKET = "audiences"


def s3_config(endpoint: str, **feed) -> dict:
    config = base_config(source=f"s3://{BUCKET}/drop/", s3={"endpoint_url": endpoint, "region": "us-east-1"})
    config["feeds"]["repro"].update(feed)
    return config


@pytest.fixture(params=["unversioned", "versioned"])
def bucket(request, moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    if request.param == "versioned":
        client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


@pytest.fixture
def plain_bucket(moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


def put(client, name: str, body: str | bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=f"drop/{name}", Body=body.encode() if isinstance(body, str) else body)


def evaluate(env, cursor=None):
    sensor = env.runner.defs.resolve_sensor_def("repro_audience_sensor")
    return sensor(sensor_context(env.workspace, env.instance, env.runner.defs, cursor))


def test_poll_imports_new_versions_and_ignores_the_rest(make_env, moto_s3, bucket):
    env = make_env(s3_config(moto_s3))
    put(bucket, "vip.csv", "u1\nu2\nu3\n")
    put(bucket, "readme.txt", "not a list")
    [first] = env.runner.poll("repro")
    assert (first.status, first.members) == ("succeeded", 3)
    assert first.source_uri == f"s3://{BUCKET}/drop/vip.csv"
    assert env.members("vip") == {"u1", "u2", "u3"}
    assert env.runner.poll("repro") == []  # a re-tick runs nothing

    put(bucket, "vip.csv", "u2\nu3\nu4\n")  # the same key overwritten
    [second] = env.runner.poll("repro")
    assert (second.qualified, second.disqualified) == (1, 1)
    assert env.members("vip") == {"u2", "u3", "u4"}
    if bucket.get_bucket_versioning(Bucket=BUCKET).get("Status") == "Enabled":
        assert second.delivery.startswith("source:vid:")
    else:
        assert second.delivery.startswith("source:etag:")

    put(bucket, "vip.csv", "u2\nu3\nu4\n")  # re-uploaded identical bytes: a delivery, skipped as identical
    [third] = env.runner.poll("repro")
    assert third.status == "skipped"

    put(bucket, "vip_copy.csv", "u2\nu3\nu4\n")  # identical content under a new key: a new audience
    [copy] = env.runner.poll("repro")
    assert copy.status == "succeeded" and env.members("vip_copy") == {"u2", "u3", "u4"}

    bucket.delete_object(Bucket=BUCKET, Key="drop/vip.csv")  # deleted: the audience stays
    assert env.runner.poll("repro") == []
    assert env.members("vip") == {"u2", "u3", "u4"}


def test_objects_in_the_same_second_as_the_cursor_are_not_missed(make_env, moto_s3, bucket):
    """LastModified has whole seconds; with no look-back at all, the cursor's edge set still finds them."""
    env = make_env(s3_config(moto_s3, cursor_lookback_seconds=0, max_runs_per_tick=1))
    # the edge is only exercised when the objects share one LastModified second: put them again until they do
    for _ in range(20):
        for name in ("a.csv", "b.csv", "c.csv"):
            put(bucket, name, f"{name}\n".replace(".csv", "x"))
        stamps = {o["LastModified"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]}
        if len(stamps) == 1:
            break
    assert len(stamps) == 1, stamps
    seen, cursor = [], None
    for _ in range(4):
        result = evaluate(env, cursor)
        seen += [r.partition_key.split(":")[1] for r in (result.run_requests or [])]
        cursor = result.cursor
    # one per tick, each found although it has the high-water mark's own second, and none asked for twice
    assert sorted(seen) == ["a.csv", "b.csv", "c.csv"]


def test_ten_thousand_objects_are_listed_across_pages_and_spread_over_ticks(make_env, moto_s3, plain_bucket):
    env = make_env(s3_config(moto_s3))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: put(plain_bucket, f"bulk/a{i:05d}.csv", f"u{i}\n"), range(10_000)))
    source = env.runner.resource.source("repro")
    result = poll_feed("repro", env.workspace.feed("repro"), source, Cursor())
    assert result.listed == 10_000
    assert len(result.deliveries) == 200 and result.backlog == 9_800
    assert len({d.key for d in result.deliveries}) == 200
    again = poll_feed("repro", env.workspace.feed("repro"), source, result.cursor)
    assert not {d.key for d in again.deliveries} & {d.key for d in result.deliveries}
    assert len(result.cursor.dumps()) < 200 * 120  # the cursor holds the recent edge, not every key


def test_an_emptied_prefix_is_an_anomaly_not_a_deletion(make_env, moto_s3, bucket):
    env = make_env(s3_config(moto_s3))
    for i in range(12):
        put(bucket, f"aud{i}.csv", f"u{i}\n")
    source = env.runner.resource.source("repro")
    feed = env.workspace.feed("repro")
    first = poll_feed("repro", feed, source, Cursor())
    for d in first.deliveries[:1]:
        env.runner.run(d.partition_key, d.delivery, d.source_uri)
    for i in range(12):
        bucket.delete_object(Bucket=BUCKET, Key=f"drop/aud{i}.csv")
    emptied = poll_feed("repro", feed, source, first.cursor)
    assert emptied.deliveries == [] and emptied.listed == 0
    assert "listed 0 objects, down from 12" in emptied.anomaly
    assert env.members("aud0") == {"u0"}


def test_a_version_replaced_after_listing_fails_clearly_and_the_next_tick_imports_it(make_env, moto_s3, bucket):
    env = make_env(s3_config(moto_s3))
    put(bucket, "late.csv", "u1\n")
    result = evaluate(env)
    [request] = result.run_requests
    time.sleep(1.1)  # a new LastModified second, so the rewrite is a new version on both bucket kinds
    put(bucket, "late.csv", "u1\nu2\n")
    record = env.runner.run(request.partition_key, request.tags["audience_pipeline/delivery"],
                            request.tags["audience_pipeline/source_uri"])
    versioned = request.tags["audience_pipeline/delivery"].startswith("source:vid:")
    if versioned:  # the listed version still exists and is read exactly
        assert record.status == "succeeded" and env.members("late") == {"u1"}
    else:
        assert record.status == "failed" and "replaced after it was listed" in record.error
    [next_request] = evaluate(env, result.cursor).run_requests
    final = env.runner.run(next_request.partition_key, next_request.tags["audience_pipeline/delivery"],
                           next_request.tags["audience_pipeline/source_uri"])
    assert final.status == "succeeded" and env.members("late") == {"u1", "u2"}


def test_a_large_object_is_streamed(make_env, moto_s3, bucket):
    env = make_env(s3_config(moto_s3))
    body = "".join(f"user{i:026d}\n" for i in range(1_500_000)).encode()  # ~46 MB
    put(bucket, "large.csv", body)
    [record] = env.runner.poll("repro")
    assert (record.status, record.members, record.size_bytes) == ("succeeded", 1_500_000, len(body))
    assert env.query("SELECT count(*) FROM members WHERE audience_name = 'large'")[0][0] == 1_500_000


def test_a_deleted_bucket_fails_the_tick(make_env, moto_s3, bucket):
    env = make_env(s3_config(moto_s3))
    bucket.delete_bucket(Bucket=BUCKET)
    with pytest.raises(SourceRefused, match="NoSuchBucket"):
        evaluate(env)


def test_a_dry_run_prefix_on_s3_diffs_and_changes_nothing(make_env, moto_s3, plain_bucket):
    env = make_env(s3_config(moto_s3))
    put(plain_bucket, "d.csv", "a\nb\nc\n")
    [applied] = env.runner.poll("repro")
    assert applied.status == "succeeded" and env.members("d") == {"a", "b", "c"}
    put(plain_bucket, "dryrun/d.csv", "c\nz\n")
    [trial] = env.runner.poll("repro")
    assert (trial.status, trial.qualified, trial.disqualified) == ("dry_run", 1, 2)
    assert env.members("d") == {"a", "b", "c"}
    assert env.query("SELECT count(*) FROM membership_events WHERE audience_name = 'd'") == [(3,)]
