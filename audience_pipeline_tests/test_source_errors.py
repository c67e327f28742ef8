"""An unreadable drop location says so: a refusal (host key, login, credentials, a missing bucket or folder)
fails the tick as SourceRefused and e-mails the feed's admins once per incident; an unreachable server fails
it as SourceTransient. Real servers on loopback throughout: asyncssh SFTP, moto S3, aiosmtpd SMTP."""

import subprocess
import sys
from pathlib import Path

import asyncssh
import boto3
import pytest
from botocore.config import Config

from audience_pipeline.runner import sensor_context
from audience_pipeline.sources import S3DropSource, SourceError, SourceRefused, SourceTransient
from audience_pipeline_tests.conftest import base_config, free_port
from audience_pipeline_tests.test_notifications import smtp  # noqa: F401 (fixture)

SEGMENT = "sirendenim_subscriber_segment_20201125.csv"
ADMINS = ["crm-admin@example.com", "oncall@example.com"]


def sftp_config(server, location: str | None = None, smtp_settings: dict | None = None, **sftp) -> dict:
    config = base_config()
    options = {"known_hosts": str(server.known_hosts), "password_env": "ATTENTIVE_SFTP_PASSWORD",
               "quiet_period_seconds": 0, "timeout_seconds": 5, **sftp}
    config["feeds"] = {"att": {"format": "attentive", "source": location or server.location,
                               "customer_domain": "sirendenim", "admins": ADMINS, "sftp": options}}
    if smtp_settings is not None:
        config["notifications"] = {"smtp": smtp_settings}
    return config


def evaluate(env, feed: str = "att"):
    sensor = env.runner.defs.resolve_sensor_def(f"{feed}_audience_sensor")
    return sensor(sensor_context(env.workspace, env.instance, env.runner.defs, None))


def other_host_key(path: Path, host: str) -> Path:
    """A known_hosts file that pins ``host`` to a key the server does not have."""
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()
    path.write_text(f"{host} {key}\n")
    return path


def test_a_changed_host_key_fails_the_tick_as_refused(make_env, sftp_server, tmp_path):
    wrong = other_host_key(tmp_path / "wrong_known_hosts", f"[127.0.0.1]:{sftp_server.port}")
    (sftp_server.uploads / SEGMENT).write_text("2125550100, seg\n")
    env = make_env(sftp_config(sftp_server, known_hosts=str(wrong)))
    with pytest.raises(SourceRefused, match="host key mismatch") as info:
        evaluate(env)
    assert sftp_server.password not in str(info.value)
    # the CLI's poll evaluates the same sensor: the original class comes out of Runner.poll, unwrapped
    with pytest.raises(SourceRefused, match="host key mismatch") as info:
        env.runner.poll("att")
    assert type(info.value) is SourceRefused
    assert env.query("SELECT count(*) FROM imports") == [(0,)]


def test_a_host_missing_from_known_hosts_is_refused(make_env, sftp_server, tmp_path):
    other = other_host_key(tmp_path / "other_known_hosts", "[sftp.example.com]:22")
    env = make_env(sftp_config(sftp_server, known_hosts=str(other)))
    with pytest.raises(SourceRefused, match="unknown host key"):
        evaluate(env)


def test_cli_poll_with_a_changed_host_key_says_so(make_env, sftp_server, tmp_path):
    wrong = other_host_key(tmp_path / "wrong_known_hosts", f"[127.0.0.1]:{sftp_server.port}")
    env = make_env(sftp_config(sftp_server, known_hosts=str(wrong)))
    cli = Path(sys.executable).with_name("audience-pipeline")
    dagster_home = tmp_path / "cli_dagster_home"
    dagster_home.mkdir()
    done = subprocess.run(
        [str(cli), "poll", "--config", str(env.workspace.path)], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "400", "DAGSTER_HOME": str(dagster_home),
             "ATTENTIVE_SFTP_PASSWORD": sftp_server.password},
    )
    assert "no new files" not in done.stdout
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "host key mismatch" in done.stderr


def test_a_refused_login_is_refused(make_env, sftp_server, monkeypatch):
    monkeypatch.setenv("WRONG_SFTP_PASSWORD", "wrong-" + sftp_server.password)
    env = make_env(sftp_config(sftp_server, password_env="WRONG_SFTP_PASSWORD"))
    with pytest.raises(SourceRefused, match="login refused") as info:
        evaluate(env)
    assert "Authentication" in str(info.value) and sftp_server.password not in str(info.value)


def test_a_private_key_from_the_environment_logs_in(make_env, sftp_server, monkeypatch, tmp_path):
    """private_key_env holds the key itself (OpenSSH text) or the path of a key file; no password is set."""
    key_file = tmp_path / "id_ed25519"
    key_file.write_text(sftp_server.client_key)
    monkeypatch.setenv("ATTENTIVE_SFTP_KEY", sftp_server.client_key)
    monkeypatch.setenv("ATTENTIVE_SFTP_KEY_FILE", str(key_file))
    monkeypatch.delenv("ATTENTIVE_SFTP_PASSWORD")
    (sftp_server.uploads / SEGMENT).write_text("2125550100, seg\n")
    for variable in ("ATTENTIVE_SFTP_KEY", "ATTENTIVE_SFTP_KEY_FILE"):
        env = make_env(sftp_config(sftp_server, password_env=None, private_key_env=variable), name=variable)
        [record] = env.runner.poll("att")
        assert record.status == "succeeded" and env.members("seg") == {"+12125550100"}, variable
    # a key the server does not accept is a refused login, not "no new files"
    monkeypatch.setenv("OTHER_SFTP_KEY", asyncssh.generate_private_key("ssh-ed25519").export_private_key(
        "openssh").decode())
    env = make_env(sftp_config(sftp_server, password_env=None, private_key_env="OTHER_SFTP_KEY"), name="other")
    with pytest.raises(SourceRefused, match="login refused"):
        evaluate(env)


def test_an_unset_credential_variable_is_refused(make_env, sftp_server, monkeypatch):
    monkeypatch.delenv("UNSET_SFTP_PASSWORD", raising=False)
    env = make_env(sftp_config(sftp_server, password_env="UNSET_SFTP_PASSWORD"))
    with pytest.raises(SourceRefused, match="UNSET_SFTP_PASSWORD is not set"):
        evaluate(env)


def test_a_missing_sftp_folder_is_refused(make_env, sftp_server):
    env = make_env(sftp_config(sftp_server, location=f"sftp://attentive@127.0.0.1:{sftp_server.port}/nowhere"))
    with pytest.raises(SourceRefused, match="does not exist"):
        evaluate(env)


def test_a_server_that_is_down_is_transient_and_not_mailed(make_env, sftp_server, smtp):  # noqa: F811
    down = free_port()  # bound and released: nobody listens on it
    (sftp_server.known_hosts).write_text(
        sftp_server.known_hosts.read_text().replace(f"]:{sftp_server.port} ", f"]:{down} "))
    env = make_env(sftp_config(sftp_server, location=f"sftp://attentive@127.0.0.1:{down}/uploads",
                               smtp_settings=smtp.settings))
    with pytest.raises(SourceTransient, match="cannot connect") as info:
        env.runner.poll("att")
    assert not isinstance(info.value, SourceRefused)
    assert smtp.messages == []  # retrying later may succeed: nobody is woken up for it


def test_a_refusal_is_mailed_once_per_incident(make_env, sftp_server, smtp, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ATT_PASSWORD", "wrong-" + sftp_server.password)
    env = make_env(sftp_config(sftp_server, password_env="ATT_PASSWORD", smtp_settings=smtp.settings))

    for _ in range(2):  # two refused ticks: one incident, one e-mail
        with pytest.raises(SourceRefused):
            evaluate(env)
    [(to, message)] = smtp.messages
    assert to == ADMINS
    assert message["Subject"] == "[audience_pipeline] att: the drop location refuses access"
    body = message.get_content()
    assert "login refused" in body and sftp_server.location in body
    assert sftp_server.password not in message.as_string()

    monkeypatch.setenv("ATT_PASSWORD", sftp_server.password)  # someone fixes the credential
    result = evaluate(env)
    assert result.skip_reason is not None  # read fine, nothing new: the incident is over
    assert len(smtp.messages) == 1

    monkeypatch.setenv("ATT_PASSWORD", "rotated-" + sftp_server.password)  # and it breaks again
    with pytest.raises(SourceRefused):
        env.runner.poll("att")
    with pytest.raises(SourceRefused):
        env.runner.poll("att")
    assert len(smtp.messages) == 2
    assert "login refused" in smtp.messages[1][1].get_content()


def test_a_missing_bucket_is_refused(make_env, moto_s3):
    config = base_config(source="s3://no-such-bucket/drop/", s3={"endpoint_url": moto_s3, "region": "us-east-1"})
    env = make_env(config)
    with pytest.raises(SourceRefused, match="NoSuchBucket"):
        evaluate(env, "repro")


def test_an_s3_endpoint_nobody_listens_on_is_transient(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}),
    )
    source = S3DropSource(client, "s3://drop/in/")
    with pytest.raises(SourceTransient, match="EndpointConnectionError"):
        list(source.list())
    with pytest.raises(SourceTransient):
        source.fingerprint("a.csv")


def test_a_missing_local_folder_is_refused(env):
    env.drop.rename(env.drop.with_name("gone"))
    with pytest.raises(SourceRefused, match="drop folder .* does not exist"):
        evaluate(env, "repro")


def test_a_bad_scheme_is_a_plain_source_error(make_env):
    env = make_env(base_config(source="ftp://example.com/drop"))
    with pytest.raises(SourceError) as info:
        evaluate(env, "repro")
    assert type(info.value) is SourceError

