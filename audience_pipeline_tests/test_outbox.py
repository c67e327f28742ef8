"""Downstream change files in both modes, re-read and compared with the analyst views; full lists imported
back through an ODP feed."""

import csv
import gzip
import json

import pytest

from audience_pipeline.config import OutboxConfig
from audience_pipeline.outbox import full_list_name_problem
from audience_pipeline_tests.conftest import base_config, over_both_catalogs
from audience_pipeline_tests.test_notifications import smtp  # noqa: F401 (fixture)

FIELD = "a_high_confidence_identifier"


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def read(path):
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def listed(path) -> set[str]:
    return {r[FIELD] for r in read(path)}


def files(folder) -> list[str]:
    """The outbox's files as ODP sees them: every name, temporary ones included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def odp_import(make_env, path, name="odp_ws"):
    """Import an outbox file through an ODP feed whose id_field is the outbox's identifier_field."""
    config = base_config()
    config["feeds"] = {"odp": {"format": "odp", "source": "drop/odp", "id_field": FIELD}}
    odp = make_env(config, name=name)
    return odp, odp.runner.import_file("odp", path)


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

    # the newest full list is the one file of the audience, at the outbox's root
    assert files(tmp_path / "out_full") == ["promo.csv.gz"]
    full = tmp_path / "out_full" / "promo.csv.gz"
    assert listed(full) == env.members("promo") == {"u2", "u3", "u4"}
    assert {r["action"] for r in read(full)} == {"qualify"}

    # a re-run of a committed import writes nothing twice and fills in a file a crash left out
    full.unlink()
    job = env.runner.defs.resolve_job_def("audience_import_job")
    job.execute_in_process(partition_key=second.partition_key, instance=env.instance)
    assert listed(full) == {"u2", "u3", "u4"}
    assert len(list((tmp_path / "out_changes").iterdir())) == 2

    # a full list file is an ODP import file: it imports back into an ODP feed as the same list
    odp, record = odp_import(make_env, full)
    assert record.status == "succeeded" and odp.members("promo") == {"u2", "u3", "u4"}


def test_full_list_is_named_by_the_audience_and_imports_back_through_odp(make_env, tmp_path):
    """ODP takes the audience id from the file name and diffs each file against its previous import: one file
    per audience, named exactly as its audience_id column (no '_' for ' ', no cut at 60 characters), each list
    overwriting the one before; imported back through an ODP feed, the files give the same members."""
    config = base_config()
    config["outboxes"] = [{"location": str(tmp_path / "out"), "mode": "full_list", "identifier_field": FIELD}]
    env = make_env(config)
    long_name = "Q3 winback " + "x" * 100  # 111 characters
    env.import_file("segment 1.csv", "u1\nu2\nu3\n")
    env.import_file(f"{long_name}.csv", "v1\nv2\n")
    env.import_file("segment 1.csv", "u2\nu3\nu4\n")

    out = tmp_path / "out"
    assert files(out) == sorted([f"{long_name}.csv.gz", "segment 1.csv.gz"])
    for name in ("segment 1", long_name):
        rows = read(out / f"{name}.csv.gz")
        assert {r["audience_id"] for r in rows} == {name}
        assert {r[FIELD] for r in rows} == env.members(name)
    assert listed(out / "segment 1.csv.gz") == {"u2", "u3", "u4"}

    odp, first = odp_import(make_env, out / "segment 1.csv.gz")
    second = odp.runner.import_file("odp", out / f"{long_name}.csv.gz")
    assert (first.status, first.rows_rejected) == (second.status, second.rows_rejected) == ("succeeded", 0)
    assert odp.members("segment 1") == env.members("segment 1") == {"u2", "u3", "u4"}
    assert odp.members(long_name) == env.members(long_name) == {"v1", "v2"}


def test_rerun_of_an_older_import_never_puts_its_list_back(make_env, tmp_path):
    config = base_config()
    config["outboxes"] = [{"location": str(tmp_path / "out"), "mode": "full_list", "identifier_field": FIELD}]
    env = make_env(config)
    older = env.import_file("promo.csv", "u1\nu2\n")
    newer = env.import_file("promo.csv", "u3\nu4\n")
    full = tmp_path / "out" / "promo.csv.gz"
    assert listed(full) == {"u3", "u4"}

    # published again by hand, and re-materialized: the older import's version is no longer current
    assert env.runner.service.publish_outboxes(older) == []
    job = env.runner.defs.resolve_job_def("audience_import_job")
    assert job.execute_in_process(partition_key=older.partition_key, instance=env.instance).success
    assert listed(full) == {"u3", "u4"}

    # even with the file gone, only the current import's re-run brings it back
    full.unlink()
    job.execute_in_process(partition_key=older.partition_key, instance=env.instance)
    assert not full.exists()
    job.execute_in_process(partition_key=newer.partition_key, instance=env.instance)
    assert listed(full) == {"u3", "u4"}


def test_outbox_on_s3(make_env, moto_s3, tmp_path):
    """ODP's upload example uses --sse: every object is encrypted with the outbox's own setting (AES256 by
    default), never the lake's (a KMS key of ours would leave the files unreadable to ODP)."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="downstream")
    config = base_config()
    config["storage"] |= {"server_side_encryption": "aws:kms", "kms_key_id": "lake-only-key"}
    config["outboxes"] = [{"location": "s3://downstream/odp/", "mode": "full_list", "identifier_field": FIELD,
                           "s3": {"endpoint_url": moto_s3, "region": "us-east-1"}}]
    env = make_env(config)
    env.import_file("s3 out.csv", "x1\nx2\nx3\n")
    env.import_file("s3 out.csv", "x1\nx2\n")

    listing = client.list_objects_v2(Bucket="downstream")
    assert [o["Key"] for o in listing["Contents"]] == ["odp/s3 out.csv.gz"]
    head = client.head_object(Bucket="downstream", Key="odp/s3 out.csv.gz")
    assert head["ServerSideEncryption"] == "AES256" and "SSEKMSKeyId" not in head
    downloaded = tmp_path / "s3 out.csv.gz"
    client.download_file("downstream", "odp/s3 out.csv.gz", str(downloaded))
    odp, record = odp_import(make_env, downloaded)
    assert record.status == "succeeded" and odp.members("s3 out") == env.members("s3 out") == {"x1", "x2"}


def test_unwritable_audience_name_is_a_warning_and_an_email(make_env, tmp_path, smtp):  # noqa: F811
    """No altered name (ODP would read another audience): the audience gets no file, the import stays
    succeeded, and the reason is in the activity log and in the admins' e-mail."""
    config = base_config()
    config["notifications"] = {"smtp": smtp.settings}
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "admins": ["crm@example.com"]}}
    config["outboxes"] = [{"location": str(tmp_path / "out"), "mode": "full_list"}]
    env = make_env(config)
    too_long = "z" * 250
    lines = [{"operation": "UPDATE", "expiration_duration": 0, "user_account_id": user,
              "segment_technical_name": segment}
             for user, segment in (("u1", "ok"), ("u2", "eu/fr"), ("u3", ".."), ("u4", too_long))]
    record = env.import_file("batch.ndjson", "".join(json.dumps(line) + "\n" for line in lines), feed="mics")

    assert record.status == "succeeded" and env.members("eu/fr") == {"u2"}
    assert files(tmp_path / "out") == ["ok.csv.gz"]
    [(status, error)] = env.query("SELECT status, error FROM imports WHERE import_id = ?", [record.import_id])
    assert status == "succeeded"
    assert "no full list of audience 'eu/fr': it contains '/'" in error
    assert "no full list of audience '..': '..' names a folder" in error
    assert "the file name would be 257 bytes, over the 255" in error
    assert error.startswith("warning: outbox ")

    [(to, message)] = smtp.messages
    assert to == ["crm@example.com"]
    assert f"import {record.import_id} of batch.ndjson left outbox files unwritten" in message["Subject"]
    assert "'eu/fr': it contains '/'" in message.get_content()

    # a re-run records and sends nothing twice
    job = env.runner.defs.resolve_job_def("audience_import_job")
    job.execute_in_process(partition_key=record.partition_key, instance=env.instance)
    [(again,)] = env.query("SELECT error FROM imports WHERE import_id = ?", [record.import_id])
    assert again == error and len(smtp.messages) == 1


@pytest.mark.parametrize(("name", "location", "reason"), [
    ("a\x00b", "out", "the control character '\\x00'"),
    ("tab\there", "out", "the control character '\\t'"),
    (".", "out", "'.' names a folder"),
    ("", "out", "the name is empty"),
    (" padded", "out", "it begins or ends with white space"),
    ("é" * 124, "out", None),  # 248 bytes + '.csv.gz': a file name of exactly 255 bytes
    ("é" * 125, "out", "the file name would be 257 bytes, over the 255"),
    ("k" * 200, "s3://bucket/" + "p/" * 400, None),  # a key of 1007 bytes
    ("k" * 200, "s3://bucket/" + "p/" * 410, "the S3 key would be 1027 bytes, over the 1024"),
])
def test_full_list_name_problems(name, location, reason):
    problem = full_list_name_problem(OutboxConfig(location=location, mode="full_list"), name)
    assert problem == reason if reason is None else reason in problem


def test_outbox_kms_key_needs_kms_encryption():
    with pytest.raises(ValueError, match="kms_key_id needs server_side_encryption: aws:kms"):
        OutboxConfig(location="s3://b/p/", mode="full_list", kms_key_id="k")
    assert OutboxConfig(location="s3://b/p/", mode="full_list").server_side_encryption == "AES256"
