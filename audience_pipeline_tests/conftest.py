import os
import urllib.request
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from audience_pipeline.config import load_workspace
from audience_pipeline.runner import Runner

FIXTURES = Path(__file__).parent / "fixtures"


class Env:
    """A workspace in tmp_path with a real, persistent Dagster instance and the analysts' views."""

    def __init__(self, root: Path, instance: dg.DagsterInstance, config: dict):
        self.root = root
        self.instance = instance
        self.drop = root / "drop" / "repro"
        self.drop.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        (root / "feeds.yaml").write_text(yaml.safe_dump(config))
        self.workspace = load_workspace(root / "feeds.yaml")
        self.runner = Runner(self.workspace, instance)

    def drop_file(self, name: str, content: str | bytes) -> Path:
        path = self.drop / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def import_file(self, name: str, content: str | bytes | None = None, feed: str = "repro"):
        path = self.drop_file(name, content) if content is not None else self.drop / name
        return self.runner.import_file(feed, path)

    def query(self, sql: str, params=None) -> list[tuple]:
        """Through the analysts' views, on a separate read-only connection, as an analyst would."""
        con = duckdb.connect(str(self.workspace.analytics), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def members(self, audience: str) -> set[str]:
        return {r[0] for r in self.query("SELECT user_id FROM members WHERE audience_name = ?", [audience])}

    def events(self, audience: str) -> list[tuple]:
        return self.query(
            "SELECT import_id, action, user_id FROM membership_events WHERE audience_name = ? ORDER BY ALL",
            [audience],
        )


def base_config(**feed_overrides) -> dict:
    feed = {"format": "repro", "source": "drop/repro", "max_reject_ratio": 0.5}
    feed.update(feed_overrides)
    return {
        "storage": {"lake": "lake", "catalog": "catalog.duckdb", "analytics": "analytics.duckdb"},
        "feeds": {"repro": feed},
    }


@pytest.fixture
def dagster_instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture
def catalog_location():
    """Where workspaces keep their catalog: None for the default DuckDB file. Modules that run their tests
    over both backends override this fixture (see ``over_both_catalogs``)."""
    return None


def over_both_catalogs(request):
    """Body of a ``catalog_location`` fixture parametrized over ("duckdb", "postgresql")."""
    return request.getfixturevalue("postgres")() if request.param == "postgresql" else None


def _with_catalog(config: dict, location: str | None) -> dict:
    if location is not None:
        config = {**config, "storage": {**config.get("storage", {}), "catalog": location}}
    return config


@pytest.fixture
def env(tmp_path, dagster_instance, catalog_location) -> Env:
    return Env(tmp_path / "ws", dagster_instance, _with_catalog(base_config(), catalog_location))


@pytest.fixture
def make_env(tmp_path, dagster_instance, catalog_location):
    def _make(config: dict, name: str = "ws") -> Env:
        return Env(tmp_path / name, dagster_instance, _with_catalog(config, catalog_location))

    return _make


@pytest.fixture
def mics_env(make_env) -> Env:
    """A workspace with one mediarithmics feed, ``mics``, and its drop folder."""
    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics"}}
    env = make_env(config)
    (env.root / "drop" / "mics").mkdir(parents=True)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    """A real S3 API server (moto's server mode) on loopback, reached by boto3 over HTTP."""
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, across server instances: start every test from an empty store
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    try:
        yield endpoint
    finally:
        server.stop()


def stop_group(process, timeout: float = 20) -> None:
    """Stop a server started with start_new_session=True, and everything it started, by its process group."""
    import signal
    import subprocess

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(autouse=True)
def _keep_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.fixture
def sftp_server(tmp_path, monkeypatch):
    """A real SFTP server (asyncssh) on loopback with a generated host key, password or public-key
    authentication and a chroot; the client side is the project's paramiko source, host key pinned in a
    known_hosts file. ``client_key`` is the OpenSSH text of the one key the server accepts."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import asyncssh

    root = tmp_path / "sftp_root"
    (root / "uploads").mkdir(parents=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    port = free_port()
    password = "pw-Attentive-7f3a"
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    accepted = client_key.export_public_key("openssh")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True

        def password_auth_supported(self):
            return True

        def validate_password(self, username, supplied):
            return username == "attentive" and supplied == password

        def public_key_auth_supported(self):
            return True

        def validate_public_key(self, username, key):
            return username == "attentive" and key.export_public_key("openssh") == accepted

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        return await asyncssh.listen(
            "127.0.0.1", port, server_host_keys=[host_key], server_factory=Server,
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root)),
        )

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key('openssh').decode().strip()}\n")
    monkeypatch.setenv("ATTENTIVE_SFTP_PASSWORD", password)
    try:
        yield SimpleNamespace(root=root, uploads=root / "uploads", port=port, known_hosts=known_hosts,
                              password=password, location=f"sftp://attentive@127.0.0.1:{port}/uploads",
                              client_key=client_key.export_private_key("openssh").decode())
    finally:
        # asyncio servers are not thread-safe: closing from the test thread races the loop's own wake-ups.
        async def stop():
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install -y postgresql (see .ci/run)")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback in a temporary data directory (Debian's binaries). initdb refuses
    to run as root, so as root the cluster belongs to the ``postgres`` account the package creates.
    Yields a function giving the URL of a fresh, empty database."""
    import itertools
    import shutil
    import subprocess
    import tempfile

    import psycopg

    pg_bin = _pg_bin()
    # pytest's temp folders are private to root; the server account needs a folder of its own
    base = Path(tempfile.mkdtemp(prefix="audience-pipeline-pg-"))
    data = base / "data"
    data.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "server.log"),
                    "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
                    "start"], check=True, capture_output=True)
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    counter = itertools.count()

    def new_database() -> str:
        name = f"db{next(counter)}"
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
