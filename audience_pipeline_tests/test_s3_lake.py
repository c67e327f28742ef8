"""The lake and raw archive on S3 (moto's server on loopback): encrypted uploads, a bounded local cache,
diffs that read the previous list back from S3, and a bucket any Parquet engine can read on its own."""

import shutil

import boto3
import duckdb

from audience_pipeline.storage.lake import Lake
from audience_pipeline.storage.views import write_analytics
from audience_pipeline_tests.conftest import base_config

LAKE_BUCKET = "audience-lake"


def lake_config(endpoint: str) -> dict:
    config = base_config()
    config["storage"].update(lake=f"s3://{LAKE_BUCKET}/lake", cache="cache",
                             s3={"endpoint_url": endpoint, "region": "us-east-1"})
    return config


def mirror(client, target):
    """Copy the bucket's lake prefix to a folder, as an analyst's sync (or any Parquet engine) would see it."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=LAKE_BUCKET, Prefix="lake/"):
        for item in page.get("Contents", ()):
            path = target / item["Key"].removeprefix("lake/")
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(LAKE_BUCKET, item["Key"], str(path))


def test_s3_lake_round_trip(make_env, moto_s3, tmp_path):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=LAKE_BUCKET)
    env = make_env(lake_config(moto_s3))
    first = env.import_file("s3lake.csv", "u1\nu2\nu3\nbad,row\n")
    assert first.status == "succeeded" and first.members == 3

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix="lake/")["Contents"]}
    member_key = f"lake/members/audience_id=1/version={first.import_id}/data_0.parquet"
    for expected in (f"lake/raw/{first.sha256[:2]}/{first.sha256}", member_key,
                     f"lake/events/import_id={first.import_id}/events.parquet",
                     f"lake/rejected/import_id={first.import_id}/rejected.parquet",
                     f"lake/validated/import_id={first.import_id}/rows.parquet"):
        assert expected in keys
    assert any(k.startswith("lake/catalog/deltas/seq=") for k in keys)
    assert client.head_object(Bucket=LAKE_BUCKET, Key=member_key)["ServerSideEncryption"] == "AES256"

    # the local cache keeps only what the next diff reads
    cache = env.workspace.lake
    cached = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert cached == {member_key.removeprefix("lake/")}

    shutil.rmtree(cache)  # a fresh node: the previous list must come back from S3
    second = env.import_file("s3lake.csv", "u2\nu3\nu4\n")
    assert (second.status, second.qualified, second.disqualified, second.members) == ("succeeded", 1, 1, 3)

    local = tmp_path / "mirror"
    mirror(client, local)
    views = tmp_path / "mirror.duckdb"
    write_analytics(views, Lake(local))
    con = duckdb.connect(str(views), read_only=True)
    assert {r[0] for r in con.execute("SELECT user_id FROM members WHERE audience_name = 's3lake'").fetchall()} == {
        "u2", "u3", "u4"}
    assert con.execute(
        "SELECT action, user_id FROM membership_events WHERE import_id = ? ORDER BY ALL", [second.import_id]
    ).fetchall() == [("disqualify", "u1"), ("qualify", "u4")]
    assert con.execute("SELECT reason FROM rejected_rows").fetchall() == [("separator",)]
    con.close()

    script = env.workspace.analytics.with_suffix(".sql").read_text()
    assert "LOAD httpfs" in script and f"s3://{LAKE_BUCKET}/lake/members/audience_id=[1-9]*/*/*.parquet" in script


def test_kms_encryption_and_a_cache_held_under_cache_max_bytes(make_env, moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=LAKE_BUCKET)
    key_id = boto3.client("kms", endpoint_url=moto_s3, region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
    config = lake_config(moto_s3)
    config["storage"].update(server_side_encryption="aws:kms", kms_key_id=key_id, cache_max_bytes=0)
    env = make_env(config)
    first = env.import_file("kms.csv", "u1\nu2\n")
    assert first.status == "succeeded"
    for item in client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix="lake/")["Contents"]:
        head = client.head_object(Bucket=LAKE_BUCKET, Key=item["Key"])
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith(key_id), item["Key"]
    # a cache of at most 0 bytes keeps no file at all, not even the current list; the next diff fetches it
    cache = env.workspace.lake
    assert [p for p in cache.rglob("*") if p.is_file() and "staging" not in p.parts] == []
    second = env.import_file("kms.csv", "u2\nu3\n")
    # the previous list came back from S3: u1 left and u3 joined (without it every member would qualify again)
    assert (second.status, second.qualified, second.disqualified, second.members) == ("succeeded", 1, 1, 2)
