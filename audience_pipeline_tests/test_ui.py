"""The Dagster UI as users see it: a real webserver on a temp instance, opened in headless Chromium."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import duckdb
import pytest

from audience_pipeline.defs.audiences import audience_partition_key
from audience_pipeline.keys import partition_key
from audience_pipeline_tests.conftest import free_port, stop_group

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


def demo_facts(ws: Path) -> dict:
    """What the demo's imports did, read from the analysts' views: the truth the UI must show."""
    con = duckdb.connect(str(ws / "data" / "analytics.duckdb"), read_only=True)
    try:
        versions = con.execute(
            "SELECT feed, audience_name, audience_id, import_id, member_count FROM audience_versions "
            "ORDER BY audience_id, version").fetchall()
        held = con.execute("SELECT import_id, feed, file_name, sha256, error, audience_names FROM imports "
                           "WHERE status = 'held'").fetchall()
    finally:
        con.close()
    histories: dict[tuple, list[tuple[int, int]]] = {}
    for feed, name, audience_id, import_id, members in versions:
        histories.setdefault((feed, name, audience_id), []).append((import_id, members))
    # an audience with the most imports, and audiences whose newest commit left less than half its members
    longest = max(histories, key=lambda a: len(histories[a]))
    dropped = [a for a, h in histories.items() if len(h) > 1 and h[-1][1] < 0.5 * h[-2][1]]
    kept = [a for a, h in histories.items() if len(h) > 1 and a not in dropped]
    [(import_id, feed, file_name, sha256, reason, [audience])] = held
    return {
        "history": (audience_partition_key(*longest), longest[1], histories[longest]),
        "dropped": audience_partition_key(*dropped[0]),
        "kept": audience_partition_key(*kept[0]),
        "held": {"import_id": import_id, "file": file_name, "reason": reason,
                 "partition_key": partition_key(feed, file_name, sha256),
                 "audience": next(audience_partition_key(*a) for a in histories if a[:2] == (feed, audience))},
    }


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The demo's imports (`audience-pipeline init` and `demo`, as `make demo` runs them), then the UI."""
    tmp_path = tmp_path_factory.mktemp("ui")
    ws = tmp_path / "ws"
    env = {**os.environ, "DAGSTER_HOME": str(ws), "AUDIENCE_PIPELINE_CONFIG": str(ws / "feeds.yaml")}
    cli = [sys.executable, "-m", "audience_pipeline"]
    subprocess.run([*cli, "init", str(ws)], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "demo"], cwd=ws, env=env, check=True, capture_output=True)
    facts = demo_facts(ws)
    port = free_port()
    log = open(tmp_path / "webserver.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-webserver")), "-h", "127.0.0.1", "-p", str(port),
         "-w", str(ws / "workspace.yaml")],
        cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/server_info", 120)
        yield {"url": f"http://127.0.0.1:{port}", **facts}
    finally:
        stop_group(server)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = chromium.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        # the "Join the Dagster community" pop-up opens at some moment after the first page loads, over
        # whatever the test is about to click: whenever it is up, it is skipped first
        page.add_locator_handler(page.locator(".dagster-backdrop"), lambda _backdrop: dismiss_popups(page))
        try:
            yield page
        finally:
            chromium.close()


def artifacts_dir(tmp_path: Path) -> Path:
    artifacts = Path(os.environ.get("AUDIENCE_PIPELINE_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def dismiss_popups(page) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for label in ("Dismiss", "No thanks", "Not now", "Skip", "Close"):
        button = page.get_by_role("button", name=label)
        if button.count():
            # the backdrop's locator handler may close the pop-up between the count and the click: then
            # there is nothing left to click, and the test's own assertions say whether the page is right
            with contextlib.suppress(PlaywrightTimeout):
                button.first.click(timeout=5_000)
    page.keyboard.press("Escape")


def open_page(page, url: str, ready: str) -> None:
    """Open ``url`` and wait for the text ``ready``, then close the "Join the Dagster community" pop-up."""
    page.goto(url)
    page.wait_for_selector(f"text={ready}")
    dismiss_popups(page)


def check_partition(page, ui: dict, check: str, partition: str) -> str:
    """The audience check's panel for one partition (status badge, description and metadata), as text."""
    open_page(page, f"{ui['url']}/assets/audience?view=checks&checkDetail={check}", check)
    page.get_by_text("Partitions", exact=True).last.click()
    page.locator(f"text={partition} >> visible=true").last.click()
    panel = page.locator("div", has=page.get_by_text("Latest execution", exact=True)).filter(
        has=page.get_by_text(partition, exact=True)).last
    page.get_by_text("View all historical executions").wait_for()
    return panel.inner_text()


def test_ui_shows_assets_partitions_metadata_and_sensor(ui, browser, tmp_path):
    page, url, artifacts = browser, ui["url"], artifacts_dir(tmp_path)
    open_page(page, f"{url}/locations/{LOCATION}/asset-groups/audience_import/lineage", "membership_diff")
    for asset in ("raw_audience_file", "validated_audience_file", "membership_diff"):
        page.wait_for_selector(f"text={asset}")
    page.screenshot(path=str(artifacts / "asset_graph.png"), full_page=True)

    open_page(page, f"{url}/assets/membership_diff?view=partitions", "Partitions")
    for feed in ("repro", "odp", "mediarithmics", "attentive", "loymax"):  # every format of the demo
        page.wait_for_selector(f"text={feed}:")
    page.screenshot(path=str(artifacts / "partitions.png"), full_page=True)

    open_page(page, f"{url}/assets/membership_diff?view=events", "Events")
    for label in ("qualified", "disqualified", "members", "rejected", "unmatched"):
        page.get_by_text(label, exact=True).first.wait_for()
    page.screenshot(path=str(artifacts / "materialization_metadata.png"), full_page=True)

    open_page(page, f"{url}/locations/{LOCATION}/sensors/repro_audience_sensor", "repro_audience_sensor")
    page.wait_for_selector("text=Polls the")
    page.screenshot(path=str(artifacts / "sensor.png"), full_page=True)
    assert (artifacts / "sensor.png").stat().st_size > 10_000


def test_an_audience_shows_its_member_counts_over_several_imports(ui, browser, tmp_path):
    from playwright.sync_api import expect

    page, artifacts = browser, artifacts_dir(tmp_path)
    key, name, expected = ui["history"]
    assert len(expected) >= 3
    open_page(page, f"{ui['url']}/assets/audience?view=events&partitions%5B0%5D={quote(key)}", key)
    events = page.locator(f"span:text-is('{key}')")  # the event list; the selected event links its partition
    expect(events).to_have_count(len(expected))  # the audience's imports, and no event of another audience
    seen = []
    for i in range(events.count()):
        events.nth(i).click()
        description = page.get_by_text(re.compile(rf"^{re.escape(name)} after import \d+$"))
        description.wait_for()
        row = page.locator("tr", has=page.get_by_text("members", exact=True)).first
        seen.append((int(description.inner_text().rsplit(" ", 1)[1]), int(row.inner_text().split()[-1])))
    assert sorted(seen) == expected
    events.first.click()
    page.get_by_text(f"{name} after import {expected[-1][0]}", exact=True).wait_for()
    page.screenshot(path=str(artifacts / "audience-history.png"))


def test_the_held_import_shows_with_its_reason(ui, browser, tmp_path):
    page, held = browser, ui["held"]
    open_page(page, f"{ui['url']}/assets/membership_diff?view=events&partitions%5B0%5D={quote(held['partition_key'])}",
              "Events")
    page.get_by_text(held["reason"], exact=True).first.wait_for()  # the reason, in the import's metadata
    status = page.locator("tr", has=page.get_by_text("status", exact=True)).first
    assert status.inner_text().split()[-1] == "held"

    panel = check_partition(page, ui, "not_held_by_removal_gate", held["audience"])
    page.screenshot(path=str(artifacts_dir(tmp_path) / "held_import_check.png"))
    assert "Failed" in panel and held["reason"] in panel
    assert f"import {held['import_id']} ({held['file']})" in panel


def test_a_failed_check_shows_on_the_audience_it_concerns(ui, browser, tmp_path):
    page = browser
    panel = check_partition(page, ui, "no_sudden_list_drop", ui["dropped"])
    page.screenshot(path=str(artifacts_dir(tmp_path) / "failed_check.png"))
    assert "Failed" in panel and "kept_share" in panel
    passed = check_partition(page, ui, "no_sudden_list_drop", ui["kept"])
    assert "Failed" not in passed and "Passed" in passed
