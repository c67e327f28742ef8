"""`audience-pipeline serve` as clients see it: a real server process on loopback, driven by curl (seed 002's
calls), httpx, a raw socket and Chromium; outcomes checked in the analysts' views, the server's upload store
and the Dagster instance's run records."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import duckdb
import httpx
import pytest
import yaml

from audience_pipeline.api.auth import hash_token
from audience_pipeline_tests.conftest import free_port, stop_group

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CRM_TOKEN = "crm-7Hq2-test-token"  # may write mics and repro
OPS_TOKEN = "ops-K81z-test-token"  # may write loymax
DATAMART = "1509"
REPRO_LIMIT = 2000
GONE = "the client went away before the whole body arrived"


def workspace_config() -> dict:
    return {
        "storage": {"lake": "lake", "catalog": "catalog.duckdb", "analytics": "analytics.duckdb"},
        "feeds": {
            "mics": {"format": "mediarithmics", "source": "drop/mics"},
            "repro": {"format": "repro", "source": "drop/repro", "max_file_bytes": REPRO_LIMIT,
                      "max_reject_ratio": 0.5, "gate": {"max_removed": 2}},
            "loymax": {"format": "loymax", "source": "drop/loymax", "max_reject_ratio": 0.5,
                       "profiles": {"removals": {"action": "remove"}}},
        },
        "api": {
            "tokens": {"crm": {"sha256": hash_token(CRM_TOKEN), "feeds": ["mics", "repro"]},
                       "ops": {"sha256": hash_token(OPS_TOKEN), "feeds": ["loymax"]}},
            "datamarts": {int(DATAMART): "mics"},
        },
    }


def make_workspace(root: Path) -> SimpleNamespace:
    ws, home = root / "ws", root / "dagster_home"
    ws.mkdir()
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (ws / "feeds.yaml").write_text(yaml.safe_dump(workspace_config()))
    return SimpleNamespace(ws=ws, home=home, log=root / "server.log")


def start_server(server: SimpleNamespace) -> subprocess.Popen:
    """`audience-pipeline serve` on a free loopback port, in its own process group; returns once it answers."""
    server.port = free_port()
    server.url = f"http://127.0.0.1:{server.port}"
    with open(server.log, "a") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("audience-pipeline")), "serve", "--port", str(server.port),
             "--config", str(server.ws / "feeds.yaml")],
            cwd=server.ws.parent, env={**os.environ, "DAGSTER_HOME": str(server.home)}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(server.url + "/", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            raise AssertionError("the server did not answer: " + server.log.read_text())
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = make_workspace(tmp_path_factory.mktemp("serve"))
    process = start_server(server)
    try:
        yield server
    finally:
        stop_group(process)


def wait_done(server, upload_id: str, token: str = CRM_TOKEN, path: str | None = None) -> dict:
    """Poll the upload's status until its import is over (the server imports on a worker thread)."""
    path = path or f"/api/imports/{upload_id}"
    deadline = time.monotonic() + 600
    while True:
        response = httpx.get(server.url + path, headers={"Authorization": token}, timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if data["status"] not in ("PENDING", "RUNNING"):
            return data
        assert time.monotonic() < deadline, data
        time.sleep(0.5)


def query(server, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(server.ws / "analytics.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def members(server, audience: str) -> set[str]:
    return {r[0] for r in query(server, "SELECT user_id FROM members WHERE audience_name = ?", [audience])}


def uploads_stored(server) -> int:
    con = sqlite3.connect(f"file:{server.ws / 'data' / 'api.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM uploads").fetchone()[0]
    finally:
        con.close()


# Seed 002's two calls, as printed, with the host, token and placeholders filled; the execution's body is
# NDJSON lines, as the seed's note says the data must be.
SEED_CREATE = """curl -X POST \\
  https://api.mediarithmics.com/v1/datamarts/<DATAMART_ID>/document_imports \\
  -H 'Authorization: <YOUR_API_TOKEN>' \\
  -H 'Content-Type: application/json' \\
  -d '{
	"document_type": "USER_SEGMENT",
	"mime_type": "APPLICATION_X_NDJSON",
	"encoding": "utf-8",
	"name": "<YOUR_DOCUMENT_IMPORT_NAME>"
}'"""
SEED_EXECUTE = """curl -X POST \\
  https://api.mediarithmics.com/v1/datamarts/<DATAMART_ID>/document_imports/<DOCUMENT_IMPORT_ID>/executions \\
  -H 'Authorization: <API_TOKEN>' \\
  -H 'Content-Type: application/x-ndjson' \\
  -d '<COMMANDS>'"""
COMMANDS = "\n".join(json.dumps(c) for c in [
    {"operation": "UPDATE", "expiration_duration": 0, "compartment_id": "1", "user_account_id": "acc-1",
     "segment_id": "9001"},
    {"operation": "UPDATE", "expiration_duration": 0, "compartment_id": "1", "user_account_id": "acc-2",
     "segment_id": "9001"},
    {"operation": "UPDATE", "expiration_duration": 0, "compartment_id": "1", "user_account_id": "acc-3",
     "segment_id": "9001"},
    {"operation": "DELETE", "expiration_duration": 0, "compartment_id": "1", "user_account_id": "acc-2",
     "segment_id": "9001"},
])


def curl(server, script: str, **placeholders) -> dict:
    script = script.replace("https://api.mediarithmics.com", server.url)
    for name, value in placeholders.items():
        script = script.replace(f"<{name}>", value)
    done = subprocess.run(["bash", "-c", script.replace("curl ", "curl -sS ", 1)], capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


def test_seed_002_curl_calls_import_the_segment_commands(server, monkeypatch):
    created = curl(server, SEED_CREATE, DATAMART_ID=DATAMART, YOUR_API_TOKEN=CRM_TOKEN,
                   YOUR_DOCUMENT_IMPORT_NAME="crm nightly")
    assert created["status"] == "ok"
    assert created["data"]["document_type"] == "USER_SEGMENT"
    assert created["data"]["mime_type"] == "APPLICATION_X_NDJSON"
    doc_id = created["data"]["id"]

    execution = curl(server, SEED_EXECUTE, DATAMART_ID=DATAMART, DOCUMENT_IMPORT_ID=doc_id, API_TOKEN=CRM_TOKEN,
                     COMMANDS=COMMANDS)
    assert execution["status"] == "ok"
    assert execution["data"]["status"] in ("PENDING", "RUNNING")
    assert execution["data"]["parent_id"] == doc_id

    path = f"/v1/datamarts/{DATAMART}/document_imports/{doc_id}/executions/{execution['data']['id']}"
    done = wait_done(server, execution["data"]["id"], path=path)
    assert done["status"] == "SUCCEEDED" and done["audience_pipeline_status"] == "succeeded", done
    assert done["counts"]["rows"] == 4 and done["rejected_rows"] == 0
    assert done["file_name"] == "crm nightly.ndjson"

    # the commands, applied in order: acc-2 came and went (a user account is <compartment_id>:<user_account_id>)
    assert members(server, "segment_id:9001") == {"1:acc-1", "1:acc-3"}
    (file_name,) = query(server, "SELECT file_name FROM imports WHERE import_id = ?", [done["import_id"]])[0]
    assert file_name == "crm nightly.ndjson"

    # the run is in the workspace's Dagster instance, as a sensor's would be
    monkeypatch.setenv("DAGSTER_HOME", str(server.home))
    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records(filters=dg.RunsFilter(
            tags={"audience_pipeline/upload": execution["data"]["id"]}))
        assert len(records) == 1
        run = records[0].dagster_run
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.run_id == done["run_id"]
        assert run.tags["audience_pipeline/file_name"] == "crm nightly.ndjson"
        assert run.tags["audience_pipeline/origin"] == "api"
        assert CRM_TOKEN not in json.dumps(run.tags)
    assert CRM_TOKEN not in server.log.read_text()


def post_file(server, feed: str, content: bytes, token: str = CRM_TOKEN, headers: dict | None = None,
              **params) -> httpx.Response:
    return httpx.post(f"{server.url}/api/feeds/{feed}/files", params=params, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "text/csv", **(headers or {})})


def test_a_retried_upload_with_the_same_idempotency_key_imports_once(server):
    key = {"Idempotency-Key": "batch-2026-12-01"}
    first = post_file(server, "repro", b"r1\nr2\nr3\n", headers=key, name="retried.csv")
    assert first.status_code == 202, first.text
    upload_id = first.json()["data"]["id"]
    # the client did not see the answer and sends it again, while and after it is imported
    again = post_file(server, "repro", b"r1\nr2\nr3\n", headers=key, name="retried.csv")
    assert again.status_code == 200 and again.json()["data"]["id"] == upload_id
    done = wait_done(server, upload_id)
    assert done["status"] == "SUCCEEDED" and done["counts"]["qualified"] == 3
    late = post_file(server, "repro", b"r1\nr2\nr3\n", headers=key, name="retried.csv")
    assert late.json()["data"]["id"] == upload_id and late.json()["data"]["import_id"] == done["import_id"]
    # the same key for other content is a mistake of the client's, said so
    other = post_file(server, "repro", b"r9\n", headers=key, name="retried.csv")
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]

    assert query(server, "SELECT count(*) FROM imports WHERE file_name = 'retried.csv'") == [(1,)]
    assert members(server, "retried") == {"r1", "r2", "r3"}
    # without a key, the same bytes are a new delivery: reported as skipped, not applied twice
    fresh = post_file(server, "repro", b"r1\nr2\nr3\n", name="retried.csv")
    assert wait_done(server, fresh.json()["data"]["id"])["audience_pipeline_status"] == "skipped"
    assert query(server, "SELECT count(*) FROM membership_events WHERE audience_name = 'retried'") == [(3,)]


def test_the_file_name_is_reduced_to_its_base_name(server):
    response = post_file(server, "repro", b"p1\np2\n", name="../../outside/../paths.csv")
    assert response.status_code == 202, response.text
    done = wait_done(server, response.json()["data"]["id"])
    assert done["file_name"] == "paths.csv" and done["status"] == "SUCCEEDED"
    assert members(server, "paths") == {"p1", "p2"}
    assert not (server.ws.parent / "outside").exists() and not (server.ws / "outside").exists()


def cut_off_upload(server, path: str, headers: dict, sent: bytes, declared: int) -> None:
    """A client that declares ``declared`` bytes, sends ``sent`` and closes the connection."""
    noticed = server.log.read_text().count(GONE)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {declared}",
                *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + sent)
    # wait until the server has seen the connection close in the middle of the body
    deadline = time.monotonic() + 120
    while server.log.read_text().count(GONE) == noticed:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.2)


def test_bad_requests_are_refused_with_the_reason_and_import_nothing(server):
    before_uploads = uploads_stored(server)
    before_imports = query(server, "SELECT count(*) FROM imports")
    mics = f"{server.url}/v1/datamarts/{DATAMART}/document_imports"
    spec = {"document_type": "USER_SEGMENT", "mime_type": "APPLICATION_X_NDJSON", "encoding": "utf-8", "name": "x"}

    no_token = httpx.post(mics, json=spec)
    assert no_token.status_code == 401 and no_token.json() == {"status": "error", "error": (
        "a valid token is required: Authorization: <token> or Authorization: Bearer <token>")}
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(mics, json=spec, headers={"Authorization": "not-the-token"}).status_code == 401
    assert httpx.post(mics, json=spec, headers={"Authorization": f"Bearer {CRM_TOKEN}x"}).status_code == 401

    other_feed = post_file(server, "loymax", b"1\n", name="a.csv")
    assert other_feed.status_code == 403 and "may not write feed 'loymax'" in other_feed.json()["error"]
    # the datamart's feed is outside the ops token's scope
    assert httpx.post(mics, json=spec, headers={"Authorization": OPS_TOKEN}).status_code == 403

    unknown = httpx.post(f"{server.url}/v1/datamarts/77/document_imports", json=spec,
                         headers={"Authorization": CRM_TOKEN})
    assert unknown.status_code == 404 and "no datamart 77" in unknown.json()["error"]
    wrong_mime = httpx.post(mics, json={**spec, "mime_type": "APPLICATION_JSON"}, headers={"Authorization": CRM_TOKEN})
    assert wrong_mime.status_code == 400
    assert wrong_mime.json()["error"] == ("mime_type 'APPLICATION_JSON' is not supported: APPLICATION_X_NDJSON or "
                                          "TEXT_CSV")
    wrong_type = httpx.post(mics, json={**spec, "document_type": "USER_ACTIVITY"}, headers={"Authorization": CRM_TOKEN})
    assert wrong_type.status_code == 400 and "only USER_SEGMENT" in wrong_type.json()["error"]

    created = httpx.post(mics, json=spec, headers={"Authorization": CRM_TOKEN})
    assert created.status_code == 201
    executions = f"{mics}/{created.json()['data']['id']}/executions"
    as_csv = httpx.post(executions, content=b"operation\n", headers={"Authorization": CRM_TOKEN,
                                                                    "Content-Type": "text/csv"})
    assert as_csv.status_code == 415 and "APPLICATION_X_NDJSON" in as_csv.json()["error"]
    assert httpx.post(f"{mics}/999/executions", content=b"{}\n", headers={
        "Authorization": CRM_TOKEN, "Content-Type": "application/x-ndjson"}).status_code == 404

    # over max_file_bytes: refused from Content-Length, and while streaming a body that does not declare it
    oversize = post_file(server, "repro", b"u\n" * REPRO_LIMIT, name="big.csv")
    assert oversize.status_code == 413 and f"limit of {REPRO_LIMIT} bytes" in oversize.json()["error"]

    def chunks():
        for _ in range(REPRO_LIMIT):
            yield b"u\n"

    streamed = post_file(server, "repro", chunks(), name="big.csv")
    assert streamed.status_code == 413

    for name in ("..", "../", "dir/..", ""):
        bad_name = post_file(server, "repro", b"u1\n", name=name)
        assert bad_name.status_code == 400, name
    assert "names no file" in post_file(server, "repro", b"u1\n", name="../..").json()["error"]
    assert post_file(server, "repro", b"u1\n", name="x.csv",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert post_file(server, "repro", b"", name="empty.csv").status_code == 400

    not_loymax = post_file(server, "repro", b"u1\n", name="x.csv", audience="vip")
    assert not_loymax.status_code == 400 and "only for a Loymax feed in mode single" in not_loymax.json()["error"]
    assert post_file(server, "loymax", b"1\n", OPS_TOKEN, name="x.csv", audience="a/b").status_code == 400
    no_profile = post_file(server, "loymax", b"1\n", OPS_TOKEN, name="x.csv", profile="nope")
    assert no_profile.status_code == 400 and "no profile named 'nope'" in no_profile.json()["error"]
    not_taken = post_file(server, "loymax", b"1\n", OPS_TOKEN, name="x.xlsx")
    assert not_taken.status_code == 400 and "does not take a file named 'x.xlsx'" in not_taken.json()["error"]

    cut_off_upload(server, "/api/feeds/repro/files?name=cut.csv",
                   {"Authorization": CRM_TOKEN, "Content-Type": "text/csv"}, b"c1\nc2\n", 1000)
    cut_off_upload(server, f"/v1/datamarts/{DATAMART}/document_imports/{created.json()['data']['id']}/executions",
                   {"Authorization": CRM_TOKEN, "Content-Type": "application/x-ndjson"},
                   b'{"operation": "UPDATE", "user_account_id": "c1", "segment_id": "1"}\n', 5000)

    assert uploads_stored(server) == before_uploads
    assert query(server, "SELECT count(*) FROM imports") == before_imports
    assert members(server, "cut") == set() and members(server, "big") == set()
    assert list((server.ws / "lake" / "staging" / "uploads").iterdir()) == []


def hidden(html: str, name: str) -> str:
    marker = f'name={name} value="'
    return html.split(marker, 1)[1].split('"', 1)[0]


def test_page_sign_in_and_forms_need_their_csrf_token(server):
    before = uploads_stored(server)
    with httpx.Client(base_url=server.url, timeout=60) as browser:
        sign_in_page = browser.get("/")
        login_cookie = sign_in_page.headers["set-cookie"]
        assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
        csrf = hidden(sign_in_page.text, "csrf")
        # a sign-in form posted from elsewhere carries no matching cookie
        assert httpx.post(server.url + "/signin", data={"token": OPS_TOKEN, "csrf": csrf}).status_code == 403
        wrong = browser.post("/signin", data={"token": "nope", "csrf": csrf})
        assert wrong.status_code == 303 and "session" not in wrong.headers.get("set-cookie", "")
        signed_in = browser.post("/signin", data={"token": OPS_TOKEN, "csrf": csrf})
        assert signed_in.status_code == 303
        session_cookie = signed_in.headers["set-cookie"]
        assert session_cookie.startswith("audience_pipeline_session=")
        assert "HttpOnly" in session_cookie and "SameSite=strict" in session_cookie
        assert OPS_TOKEN not in session_cookie
        form = browser.get("/").text
        assert "loymax (loymax), profile removals" in form and "repro" not in form

        files = {"file": ("forged.csv", b"1;\n2;\n", "text/csv")}
        forged = browser.post("/upload", data={"csrf": "guess", "target": "loymax"}, files=files)
        assert forged.status_code == 403 and "did not come from this page" in forged.text
        outside = browser.post("/upload", data={"csrf": hidden(form, "csrf"), "target": "repro"}, files=files)
        assert outside.status_code == 403 and "may not write feed" in outside.text
        not_signed_in = httpx.post(server.url + "/upload", data={"csrf": hidden(form, "csrf"), "target": "loymax"},
                                   files=files)
        assert not_signed_in.status_code == 401
    assert uploads_stored(server) == before


def test_an_operator_uploads_a_loymax_file_in_the_browser_and_sees_the_members_it_added(server, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("AUDIENCE_PIPELINE_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    content = b"101;\n102;\n103\n104;extra;x\n"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(120_000)
        try:
            page.goto(server.url + "/")
            page.fill("#token", "wrong-token")
            page.click("button[type=submit]")
            page.get_by_text("That token is not valid.").wait_for()
            page.fill("#token", OPS_TOKEN)
            page.click("button[type=submit]")
            page.get_by_text("signed in as ops").wait_for()
            page.select_option("#target", "loymax")
            page.fill("#audience", "Newsletter")
            page.set_input_files("#file", {"name": "export.csv", "mimeType": "text/csv", "buffer": content})
            page.screenshot(path=str(artifacts / "serve_upload_form.png"), full_page=True)
            page.get_by_role("button", name="Upload").click()
            page.wait_for_selector("#status.ok")
            page.wait_for_selector("#added")
            page.screenshot(path=str(artifacts / "serve_upload_outcome.png"), full_page=True)
            assert page.inner_text("#status") == "succeeded"
            added = page.inner_text("#added")
            rejects = page.inner_text("#rejects")
            counts = page.inner_text("#counts")
        finally:
            browser.close()
    for user in ("101", "102", "103"):
        assert f"Newsletter\t{user}" in added
    assert "104" not in added
    assert "4\textra_column\t104;extra;x" in rejects
    assert "qualified\t3" in counts and "rejected\t1" in counts
    assert members(server, "Newsletter") == {"101", "102", "103"}
    # the audience chosen on the page names the delivered file, as Loymax mode 1 reads it
    assert query(server, "SELECT DISTINCT source_file FROM membership_events WHERE audience_name = 'Newsletter'") \
        == [("Newsletter.csv",)]


def test_failed_and_held_imports_report_why(server):
    bad = post_file(server, "repro", b"ok1\nb,c\nd,e\nf,g\n", name="mostly_bad.csv")
    failed = wait_done(server, bad.json()["data"]["id"])
    assert failed["status"] == "FAILED" and failed["audience_pipeline_status"] == "failed", json.dumps(failed)
    # refused as a whole: no counts, and the reason names the lines
    assert failed["error"] == ("mostly_bad.csv: 3 of 4 rows rejected (75.0%), over the feed's max_reject_ratio of "
                               "50.0% (line 2: separator, line 3: separator, line 4: separator)")
    assert failed["counts"]["rows"] is None and failed["rejected_rows"] is None

    first = post_file(server, "repro", b"h1\nh2\nh3\nh4\n", name="gated.csv")
    assert wait_done(server, first.json()["data"]["id"])["status"] == "SUCCEEDED"
    second = post_file(server, "repro", b"h1\n", name="gated.csv")
    held = wait_done(server, second.json()["data"]["id"])
    assert held["status"] == "HELD" and held["audience_pipeline_status"] == "held"
    assert held["error"] == "held: would remove 3 of 4 members of 'gated' (75%), over the removal gate (more than 2)"
    assert held["counts"]["disqualified"] == 3
    assert members(server, "gated") == {"h1", "h2", "h3", "h4"}


def test_api_configuration_is_checked(tmp_path):
    from audience_pipeline.config import ConfigError, load_workspace

    def load(api: dict):
        config = {**workspace_config(), "api": api}
        (tmp_path / "feeds.yaml").write_text(yaml.safe_dump(config))
        return load_workspace(tmp_path / "feeds.yaml")

    assert load({"datamarts": {1509: "mics"}}).config.api.datamarts == {"1509": "mics"}
    with pytest.raises(ConfigError, match=r"api.datamarts.7: feed 'repro' is repro"):
        load({"datamarts": {7: "repro"}})
    with pytest.raises(ConfigError, match=r"api.tokens.crm: no feed named 'nope'"):
        load({"tokens": {"crm": {"sha256": hash_token("t"), "feeds": ["nope"]}}})
    with pytest.raises(ConfigError, match=r"api.tokens.crm.sha256"):
        load({"tokens": {"crm": {"sha256": "the-token-itself", "feeds": ["mics"]}}})


def test_token_hash_prints_the_sha256_of_a_new_or_given_token():
    cli = [str(Path(sys.executable).with_name("audience-pipeline")), "token-hash"]
    given = subprocess.run([*cli, "s3cret"], capture_output=True, text=True, check=True).stdout
    assert given.strip() == f"sha256: {hash_token('s3cret')}"
    made = subprocess.run(cli, capture_output=True, text=True, check=True).stdout.splitlines()
    token = made[0].removeprefix("token:").strip()
    assert len(token) >= 40 and made[-1] == f"sha256: {hash_token(token)}"


def test_an_upload_cut_off_by_a_killed_server_is_imported_once_by_the_next(tmp_path, monkeypatch):
    server = make_workspace(tmp_path)
    paused = tmp_path / "paused"
    paused.mkdir()
    # the first server stops for good inside its run (the run has started; the import has staged the file)
    monkeypatch.setenv("AUDIENCE_PIPELINE_PAUSE_AT", "receive.staged")
    monkeypatch.setenv("AUDIENCE_PIPELINE_PAUSE_DIR", str(paused))
    process = start_server(server)
    try:
        ids = b"".join(b"k%d\n" % n for n in range(100))
        upload_id = post_file(server, "repro", ids, name="restart.csv").json()["data"]["id"]
        while not any(paused.glob("*.paused")):  # a hang ends at pytest's timeout
            assert process.poll() is None, "the server stopped before its run reached the pause point"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    monkeypatch.delenv("AUDIENCE_PIPELINE_PAUSE_AT")
    monkeypatch.setenv("DAGSTER_HOME", str(server.home))
    # a stop can also fall between a run's creation and its start, which leaves the run 'not started'
    with dg.DagsterInstance.get() as instance:
        [cut_off] = [r.dagster_run for r in instance.get_run_records(
            filters=dg.RunsFilter(tags={"audience_pipeline/upload": upload_id}))]
        assert cut_off.status == dg.DagsterRunStatus.STARTED
        instance.add_run(cut_off._replace(run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED))
    process = start_server(server)
    try:
        done = wait_done(server, upload_id)
    finally:
        stop_group(process)
    assert done["status"] == "SUCCEEDED" and done["counts"]["qualified"] == 100, done
    assert query(server, "SELECT count(*) FROM imports WHERE file_name = 'restart.csv'") == [(1,)]
    assert query(server, "SELECT count(*) FROM membership_events WHERE audience_name = 'restart'") == [(100,)]
    assert len(members(server, "restart")) == 100
    assert list((server.ws / "lake" / "staging" / "uploads").iterdir()) == []
    # the Dagster UI tells what happened: both cut-off runs failed, the next succeeded
    with dg.DagsterInstance.get() as instance:
        runs = [r.dagster_run for r in instance.get_run_records(
            filters=dg.RunsFilter(tags={"audience_pipeline/upload": upload_id}), ascending=True)]
    assert runs[-1].status == dg.DagsterRunStatus.SUCCESS and runs[-1].run_id == done["run_id"]
    assert [run.status for run in runs[:-1]] == [dg.DagsterRunStatus.FAILURE] * 2
