"""Credentials never appear in logs, run metadata, events, exceptions or the activity log."""

import logging

import boto3
import pytest

from audience_pipeline.sources import SourceRefused
from audience_pipeline_tests.conftest import base_config
from audience_pipeline_tests.test_notifications import SMTP_PASSWORD, smtp  # noqa: F401 (fixture)

AWS_SECRET = "aws-SECRET-value-7d1e0c"


def test_no_secret_leaks_anywhere(make_env, moto_s3, sftp_server, smtp, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    caplog.set_level(logging.DEBUG)
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="drop")
    client.put_object(Bucket="drop", Key="in/s3aud.csv", Body=b"a\nb\n")
    client.put_object(Bucket="drop", Key="in/broken.csv", Body=b"")
    (sftp_server.uploads / "sirendenim_subscriber_segment_20201125.csv").write_text("2125550100, seg\n")
    config = base_config()
    config["notifications"] = {"smtp": smtp.settings}
    config["feeds"] = {
        "s3feed": {"format": "repro", "source": "s3://drop/in/", "admins": ["ops@example.com"],
                   "s3": {"endpoint_url": moto_s3, "region": "us-east-1"}},
        "att": {"format": "attentive", "source": sftp_server.location, "customer_domain": "sirendenim",
                "sftp": {"known_hosts": str(sftp_server.known_hosts), "password_env": "ATTENTIVE_SFTP_PASSWORD",
                         "quiet_period_seconds": 0}},
        "att_badpw": {"format": "attentive", "source": sftp_server.location, "customer_domain": "sirendenim",
                      "sftp": {"known_hosts": str(sftp_server.known_hosts), "password_env": "WRONG_SFTP_PASSWORD"}},
    }
    monkeypatch.setenv("WRONG_SFTP_PASSWORD", "wrong-" + sftp_server.password)
    env = make_env(config)
    records = env.runner.poll("s3feed") + env.runner.poll("att")
    assert sorted(r.status for r in records) == ["failed", "succeeded", "succeeded"]
    assert len(smtp.messages) == 1  # the failed import's e-mail went out through the authenticated server
    sensor = env.runner.defs.resolve_sensor_def("att_badpw_audience_sensor")
    from audience_pipeline.runner import sensor_context

    with pytest.raises(SourceRefused, match="Authentication") as refused:
        sensor(sensor_context(env.workspace, env.instance, env.runner.defs, None))

    secrets = [AWS_SECRET, sftp_server.password, SMTP_PASSWORD]
    texts = [str(refused.value), caplog.text]
    for run in env.instance.get_runs():
        texts.append(str(run.tags))
        texts.extend(str(event) for event in env.instance.all_logs(run.run_id))
    texts.append(str(env.query("SELECT * FROM imports")))
    texts.append(str(env.query("SELECT * FROM rejected_rows")))
    texts.extend(message.as_string() for _, message in smtp.messages)
    everything = "\n".join(texts)
    assert "s3aud.csv" in everything and "broken.csv" in everything  # the search really covers the runs
    for secret in secrets:
        assert secret not in everything
