"""Transient faults: an S3 server whose connections are cut mid-download (a real proxy on loopback in front
of moto's server). Downloads are retried with backoff; past the attempts the run fails with the reason,
nothing is recorded, and the next poll asks for the file again."""

import socket
import threading

import boto3
import dagster as dg
import pytest

from audience_pipeline_tests.conftest import base_config

CUT_AFTER = 200_000  # bytes a connection may carry back while cutting is on (listings and HEADs are smaller)


class CuttingProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.cuts_left = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, downstream):
        sent = 0
        try:
            while data := src.recv(65536):
                sent += len(data)
                if downstream and sent > CUT_AFTER:
                    with self.lock:
                        cut = self.cuts_left > 0
                        if cut:
                            self.cuts_left -= 1
                            self.cuts += 1
                    if cut:
                        dst.sendall(data[: len(data) // 2])
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self):
        self.server.close()


@pytest.fixture
def proxied(make_env, moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="flaky")
    body = "".join(f"user{i:010d}\n" for i in range(100_000)).encode()  # 1.5 MB
    client.put_object(Bucket="flaky", Key="in/flaky.csv", Body=body)
    proxy = CuttingProxy(int(moto_s3.rsplit(":", 1)[1]))
    config = base_config(source="s3://flaky/in/", download_attempts=3, retry_backoff_seconds=0.1,
                         s3={"endpoint_url": f"http://127.0.0.1:{proxy.port}", "region": "us-east-1"})
    env = make_env(config)
    yield env, proxy
    proxy.close()


def test_a_cut_download_is_retried(proxied):
    env, proxy = proxied
    proxy.cuts_left = 2
    [record] = env.runner.poll("repro")
    assert record.status == "succeeded" and record.members == 100_000
    assert proxy.cuts == 2


def test_past_the_attempts_the_run_fails_and_the_next_poll_retries(proxied):
    env, proxy = proxied
    proxy.cuts_left = 1000
    assert env.runner.poll("repro") == []
    [problem] = env.runner.unrecorded
    assert "broke off" in str(problem) and "gave up after 3 attempts" in str(problem)
    assert problem.retry_later  # the CLI exits 75: try again later
    assert env.query("SELECT count(*) FROM imports") == [(0,)]  # nothing half-recorded
    env.runner.unrecorded.clear()
    proxy.cuts_left = 0
    [record] = env.runner.poll("repro")  # the cursor moved on, but the failed delivery is asked again
    assert record.status == "succeeded" and record.members == 100_000
    assert env.runner.poll("repro") == []


def test_a_retried_dry_run_stays_a_dry_run(make_env, moto_s3):
    """The sensor's retry carries every tag of the run it retries: a dryrun/ delivery whose first run failed
    is diffed again, never applied."""
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="flaky")
    body = "".join(f"user{i:010d}\n" for i in range(100_000)).encode()  # long enough to be cut
    client.put_object(Bucket="flaky", Key="in/dryrun/trial.csv", Body=body)
    proxy = CuttingProxy(int(moto_s3.rsplit(":", 1)[1]))
    try:
        env = make_env(base_config(source="s3://flaky/in/", download_attempts=1, retry_backoff_seconds=0.1,
                                   s3={"endpoint_url": f"http://127.0.0.1:{proxy.port}", "region": "us-east-1"}))
        proxy.cuts_left = 1000
        assert env.runner.poll("repro") == []
        [problem] = env.runner.unrecorded
        env.runner.unrecorded.clear()
        proxy.cuts_left = 0
        [record] = env.runner.poll("repro")
        assert record.status == "dry_run" and record.qualified == 100_000
        assert env.members("trial") == set()
        [retry] = env.instance.get_runs(filters=dg.RunsFilter(tags={"audience_pipeline/attempt": "2"}))
        assert retry.tags["audience_pipeline/dry_run"] == "true"
    finally:
        proxy.close()
