"""Downstream change files in both modes, re-read and compared with the analyst views."""

import csv
import gzip

from audience_pipeline_tests.conftest import base_config


def read(path):
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def test_changes_and_full_list_outboxes(make_env, tmp_path):
    config = base_config()
    field = "a_high_confidence_identifier"
    config["outboxes"] = [
        {"location": str(tmp_path / "out_changes"), "mode": "changes", "identifier_field": field},
        {"location": str(tmp_path / "out_full"), "mode": "full_list", "identifier_field": field},
    ]
    env = make_env(config)
    first = env.import_file("promo.csv", "u1\nu2\nu3\n")
    second = env.import_file("promo.csv", "u2\nu3\nu4\n")

    changes = sorted((tmp_path / "out_changes").iterdir())
    assert [p.name for p in changes] == [f"{first.import_id:012d}_promo.changes.csv.gz",
                                        f"{second.import_id:012d}_promo.changes.csv.gz"]
    rows = read(changes[1])
    assert list(rows[0]) == ["type", "action", "a_high_confidence_identifier", "audience_id", "ts"]
    got = {(r["action"], r["a_high_confidence_identifier"]) for r in rows}
    expected = set(env.query("SELECT action, user_id FROM membership_events WHERE import_id = ?", [second.import_id]))
    assert got == expected == {("qualify", "u4"), ("disqualify", "u1")}
    assert {r["type"] for r in rows} == {"passthrough"} and {r["audience_id"] for r in rows} == {"promo"}

    full = tmp_path / "out_full" / f"{second.import_id:012d}" / "promo.csv.gz"
    members = {r["a_high_confidence_identifier"] for r in read(full)}
    assert members == env.members("promo") == {"u2", "u3", "u4"}
    assert {r["action"] for r in read(full)} == {"qualify"}

    # a re-run of a committed import writes nothing twice and fills in a file a crash left out
    full.unlink()
    job = env.runner.defs.resolve_job_def("audience_import_job")
    job.execute_in_process(partition_key=second.partition_key, instance=env.instance)
    assert {r["a_high_confidence_identifier"] for r in read(full)} == {"u2", "u3", "u4"}
    assert len(list((tmp_path / "out_changes").iterdir())) == 2

    # a full list file is an ODP import file: it imports back into an ODP feed as the same list
    odp_config = base_config()
    odp_config["feeds"] = {"odp": {"format": "odp", "source": "drop/odp", "id_field": "a_high_confidence_identifier"}}
    odp = make_env(odp_config, name="odp_ws")
    record = odp.runner.import_file("odp", full)
    assert record.status == "succeeded" and odp.members("promo") == {"u2", "u3", "u4"}


def test_outbox_on_s3(make_env, moto_s3):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="downstream")
    config = base_config()
    config["outboxes"] = [{"location": "s3://downstream/odp/", "mode": "full_list",
                           "s3": {"endpoint_url": moto_s3, "region": "us-east-1"}}]
    env = make_env(config)
    record = env.import_file("s3out.csv", "x1\nx2\n")
    key = f"odp/{record.import_id:012d}/s3out.csv.gz"
    body = client.get_object(Bucket="downstream", Key=key)["Body"].read()
    assert {r["user_id"] for r in csv.DictReader(gzip.decompress(body).decode().splitlines())} == {"x1", "x2"}
