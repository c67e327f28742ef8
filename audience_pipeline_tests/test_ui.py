"""The Dagster UI as users see it: a real webserver on a temp instance, opened in headless Chromium."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from audience_pipeline_tests.conftest import base_config, free_port, stop_group

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOCATION = "audience_pipeline.definitions"


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture
def ui(tmp_path):
    ws, home = tmp_path / "ws", tmp_path / "home"
    (ws / "drop" / "repro").mkdir(parents=True)
    home.mkdir()
    (ws / "feeds.yaml").write_text(yaml.safe_dump(base_config()))
    (ws / "workspace.yaml").write_text(f"load_from:\n  - python_module: {LOCATION}\n")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "AUDIENCE_PIPELINE_CONFIG": str(ws / "feeds.yaml")}
    cli = [sys.executable, "-m", "audience_pipeline"]
    for name, content in (("vip.csv", "u1\nu2\nu3\n"), ("vip.csv", "u2\nu3\nu4\nu5\n"), ("news.csv", "n1\n")):
        path = ws / "drop" / "repro" / name
        path.write_text(content)
        subprocess.run([*cli, "import", str(path), "--feed", "repro"], env=env, check=True, capture_output=True)
    port = free_port()
    log = open(tmp_path / "webserver.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-webserver")), "-h", "127.0.0.1", "-p", str(port),
         "-w", str(ws / "workspace.yaml")],
        cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/server_info", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)
        log.close()


def dismiss_popups(page) -> None:
    for label in ("Dismiss", "No thanks", "Not now", "Skip", "Close"):
        button = page.get_by_role("button", name=label)
        if button.count():
            button.first.click()
    page.keyboard.press("Escape")


def test_ui_shows_assets_partitions_metadata_and_sensor(ui, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("AUDIENCE_PIPELINE_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{ui}/asset-groups/audience_import")
            page.wait_for_selector("text=membership_diff")
            dismiss_popups(page)
            for asset in ("raw_audience_file", "validated_audience_file", "membership_diff"):
                page.wait_for_selector(f"text={asset}")
            page.screenshot(path=str(artifacts / "asset_graph.png"), full_page=True)

            page.goto(f"{ui}/assets/membership_diff?view=partitions")
            dismiss_popups(page)
            page.wait_for_selector("text=repro:vip.csv:")
            page.wait_for_selector("text=repro:news.csv:")
            page.screenshot(path=str(artifacts / "partitions.png"), full_page=True)

            page.goto(f"{ui}/assets/membership_diff?view=events")
            dismiss_popups(page)
            for label in ("qualified", "disqualified", "members", "rejected", "unmatched"):
                page.get_by_text(label, exact=True).first.wait_for()
            page.screenshot(path=str(artifacts / "materialization_metadata.png"), full_page=True)

            page.goto(f"{ui}/locations/{LOCATION}/sensors/repro_audience_sensor")
            dismiss_popups(page)
            page.wait_for_selector("text=repro_audience_sensor")
            page.wait_for_selector("text=Polls the")
            page.screenshot(path=str(artifacts / "sensor.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts / "sensor.png").stat().st_size > 10_000
