"""E-mail to feed admins through a real SMTP server on loopback (aiosmtpd, STARTTLS and AUTH)."""

import datetime as dt
import ssl
from email import message_from_bytes, policy

import dagster as dg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from audience_pipeline_tests.conftest import base_config, free_port, over_both_catalogs

SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-Secret-91"


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


@pytest.fixture
def smtp(tmp_path, monkeypatch):
    """A real SMTP server requiring STARTTLS and a login, with a self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)

    class Inbox:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=policy.default)))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
        return AuthResult(success=ok)

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="localhost", port=port, tls_context=tls, require_starttls=True,
                            auth_required=True, authenticator=authenticator)
    controller.start()
    monkeypatch.setenv("SMTP_USER", SMTP_USER)
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    inbox.settings = {"host": "localhost", "port": port, "starttls": True, "ca_file": str(cert_file),
                      "sender": "pipeline@example.com", "username_env": "SMTP_USER", "password_env": "SMTP_PASSWORD"}
    try:
        yield inbox
    finally:
        controller.stop()


@pytest.fixture
def notified(make_env, smtp):
    config = base_config(admins=["crm-admin@example.com", "oncall@example.com"], max_silence_hours=0.0002,
                         gate={"max_removed": 1, "max_removed_share": 0.5})
    config["notifications"] = {"smtp": smtp.settings}
    return make_env(config)


def test_failed_import_sends_one_email(notified, smtp):
    notified.import_file("list.csv", "a\nb\nc\n")
    failed = notified.import_file("list.csv", b"")
    assert failed.status == "failed"
    [(to, message)] = smtp.messages
    assert to == ["crm-admin@example.com", "oncall@example.com"]
    assert message["Subject"] == f"[audience_pipeline] repro: import {failed.import_id} of list.csv failed"
    assert "Reason:    list.csv: empty file" in message.get_content()
    # re-running the failed partition re-reports it: no second e-mail
    job = notified.runner.defs.resolve_job_def("audience_import_job")
    job.execute_in_process(partition_key=failed.partition_key, instance=notified.instance, raise_on_error=False)
    assert len(smtp.messages) == 1
    assert SMTP_PASSWORD not in message.as_string()


def test_held_import_email_says_how_to_approve(notified, smtp):
    notified.import_file("big.csv", "a\nb\nc\nd\n")
    held = notified.import_file("big.csv", "a\n")
    assert held.status == "held"
    [(_, message)] = smtp.messages
    assert "is held for approval" in message["Subject"]
    body = message.get_content()
    assert f"audience-pipeline approve {held.import_id}" in body and "disqualify 3 members" in body


def test_run_failure_sensor_covers_crashes_without_doubling(notified, smtp):
    notified.import_file("x.csv", "a\n")
    # a run whose source vanished: our code raises before the import exists, so nothing was reported
    job = notified.runner.defs.resolve_job_def("audience_import_job")
    notified.instance.add_dynamic_partitions("audience_files", ["repro:gone.csv:00000000"])
    result = job.execute_in_process(
        partition_key="repro:gone.csv:00000000", instance=notified.instance, raise_on_error=False,
        tags={"audience_pipeline/delivery": "cli:lost", "audience_pipeline/source_uri": "file:///nonexistent/gone.csv"})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    sensor = notified.runner.defs.resolve_sensor_def("import_run_failure_sensor")
    from audience_pipeline.defs.resources import AudienceWorkspace

    def evaluate():
        context = dg.build_run_status_sensor_context(
            sensor_name="import_run_failure_sensor", dagster_event=failure, dagster_instance=notified.instance,
            dagster_run=result.dagster_run,
            resources={"audience_workspace": AudienceWorkspace(config_path=str(notified.workspace.path))},
        ).for_run_failure()
        sensor(context)

    evaluate()
    evaluate()  # a second evaluation of the same failure sends nothing more
    [(_, message)] = smtp.messages
    assert f"import run {result.run_id} failed" in message["Subject"]
    assert "no longer exists" in message.get_content()


def test_a_silent_feed_alerts_once_per_spell(notified, smtp):
    record = notified.import_file("s.csv", "a\n")
    notifier = notified.runner.service.notifier
    # max_silence_hours is 0.72 s here; instants relative to the delivery keep a slow machine out of it
    last = record.received_at
    assert not notifier.silence("repro", last + dt.timedelta(seconds=0.5))
    assert notifier.silence("repro", last + dt.timedelta(seconds=1.0))
    assert not notifier.silence("repro", last + dt.timedelta(seconds=1.5))
    [(_, message)] = smtp.messages
    assert "no file for" in message["Subject"]
