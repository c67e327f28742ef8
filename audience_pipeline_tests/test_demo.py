"""`audience-pipeline demo` (make demo) in a fresh workspace written by `init`: the staged deliveries of all five
formats land step by step, and the analyst views show the members, disqualifies, rejected rows and the held
import they should. A second run imports nothing."""

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "audience_pipeline" / "template"


def cli(cwd: Path, *args):
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "250"})


def query(ws: Path, sql: str):
    con = duckdb.connect(str(ws / "data" / "analytics.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def members(ws: Path) -> dict[tuple[str, str], set[str]]:
    """(feed, audience) -> its current user ids."""
    found: dict[tuple[str, str], set[str]] = {}
    for feed, audience, user in query(
            ws, "SELECT a.feed, m.audience_name, m.user_id FROM members m JOIN audiences a USING (audience_id)"):
        found.setdefault((feed, audience), set()).add(user)
    return found


EXPECTED_MEMBERS = {
    ("repro", "spring_campaign"): {"qwpeoifjadlskf", "asdfghjklqwert", "zxcvbnmasdfghj", "yuiophjklbnmqw"},
    ("repro", "vip_customers"): {"qwpeoifjadlskf", "zxocjvasdfoiji", "azxcpoqnadslpx", "mnbvcxzlkjhgfd",
                                 "poiuytrewqasdf", "lkjhgfdsamnbvc"},
    # the second list dropped two e-mails and added one
    ("odp", "newsletter_engaged"): {"qwpeoifjadlskf", "zxocjvasdfoiji", "azxcpoqnadslpx", "mnbvcxzlkjhgfd",
                                    "asdfghjklqwert"},
    # its third list is held by the gate, so the first one still applies
    ("odp", "winback_q4"): {"asdfghjklqwert", "zxcvbnmasdfghj", "yuiophjklbnmqw", "ghjkqwerzxcvbn",
                            "rtyufghjvbnmas"},
    # segment 9002 is high_intent through the segments map; DELETEs of the second and third files applied
    ("mediarithmics", "high_intent"): {"zxocjvasdfoiji", "ghjkqwerzxcvbn", "wertsdfgxcvbqa"},
    # two of them resolved through the sha256 of their registry e-mail (email_hash only)
    ("mediarithmics", "cart_abandoners"): {"poiuytrewqasdf", "lkjhgfdsamnbvc", "zxcvbnmasdfghj", "yuiophjklbnmqw",
                                           "rtyufghjvbnmas", "wertsdfgxcvbqa"},
    # phones in five spellings resolved to the registry's E.164 numbers; the 1 Dec file replaced VIP SMS only
    ("attentive", "VIP SMS"): {"qwpeoifjadlskf"},
    ("attentive", "Flash Sale"): {"poiuytrewqasdf", "lkjhgfdsamnbvc", "asdfghjklqwert"},
    # loyalty cards resolved through the registry; remove/gold_tier.csv took two out
    ("loymax", "gold_tier"): {"qwpeoifjadlskf", "azxcpoqnadslpx", "asdfghjklqwert"},
    ("loymax", "Coffee Club"): {"zxocjvasdfoiji", "mnbvcxzlkjhgfd", "lkjhgfdsamnbvc"},
    ("loymax", "Book Lovers"): {"zxcvbnmasdfghj", "ghjkqwerzxcvbn"},
}

EXPECTED_DISQUALIFIED = {
    ("newsletter_engaged", "poiuytrewqasdf", "newsletter_engaged.csv.gz"),
    ("newsletter_engaged", "lkjhgfdsamnbvc", "newsletter_engaged.csv.gz"),
    ("high_intent", "azxcpoqnadslpx", "segments_20261201.ndjson"),
    ("high_intent", "mnbvcxzlkjhgfd", "segments_20261201.ndjson"),
    ("high_intent", "qwpeoifjadlskf", "segments_20261202.ndjson"),
    ("VIP SMS", "zxocjvasdfoiji", "acmeshop_subscriber_segment_20261201.csv"),
    ("VIP SMS", "azxcpoqnadslpx", "acmeshop_subscriber_segment_20261201.csv"),
    ("VIP SMS", "mnbvcxzlkjhgfd", "acmeshop_subscriber_segment_20261201.csv"),
    ("gold_tier", "poiuytrewqasdf", "gold_tier.csv"),
    ("gold_tier", "yuiophjklbnmqw", "gold_tier.csv"),
}

EXPECTED_REJECTS = {
    ("spring_campaign.csv", 3, "blank_line"),
    ("spring_campaign.csv", 6, "separator"),
    ("spring_campaign.csv", 7, "unmatched"),
    ("segments_20261202.ndjson", 2, "invalid_json"),
    ("segments_20261202.ndjson", 3, "invalid_operation"),
    ("segments_20261202.ndjson", 4, "missing_expiration_duration"),
    ("segments_20261202.ndjson", 5, "unmatched"),
}


def test_demo_delivers_all_five_formats_in_order_and_a_second_run_imports_nothing(tmp_path):
    ws = tmp_path / "ws"
    assert cli(tmp_path, "init", str(ws)).returncode == 0

    first = cli(ws, "demo")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = [line.split(":")[0] for line in first.stdout.splitlines() if line.startswith("delivery ")]
    assert steps == ["delivery 1-first-delivery", "delivery 2-second-delivery", "delivery 3-third-delivery"]
    assert "audience-pipeline approve 14" in first.stdout and "make dev" in first.stdout

    assert members(ws) == EXPECTED_MEMBERS

    disqualified = query(ws, "SELECT audience_name, user_id, source_file FROM membership_events "
                             "WHERE action = 'disqualify'")
    assert set(disqualified) == EXPECTED_DISQUALIFIED and len(disqualified) == len(EXPECTED_DISQUALIFIED)
    # the removals came from the later deliveries, after the lists they change (imports apply in order)
    uris = query(ws, "SELECT source_uri, import_id FROM imports")
    imported = {uri.split("/data/drop/", 1)[1]: import_id for uri, import_id in uris}
    assert imported["loymax/remove/gold_tier.csv"] > imported["loymax/gold_tier.csv"]
    assert imported["attentive/acmeshop_subscriber_segment_20261201.csv"] > imported[
        "attentive/acmeshop_subscriber_segment_20261130.csv"]

    rejects = query(ws, "SELECT i.file_name, r.line_number, r.reason FROM rejected_rows r JOIN imports i "
                        "USING (import_id)")
    assert set(rejects) == EXPECTED_REJECTS and len(rejects) == len(EXPECTED_REJECTS)

    held = query(ws, "SELECT import_id, feed, file_name, disqualified, error FROM imports WHERE status = 'held'")
    assert len(held) == 1
    import_id, feed, file_name, disqualified_count, reason = held[0]
    assert (import_id, feed, file_name, disqualified_count) == (14, "odp", "winback_q4.csv.gz", 4)
    assert "would remove 4 of 5 members of 'winback_q4'" in reason and "removal gate" in reason
    statuses = query(ws, "SELECT status, count(*) FROM imports GROUP BY ALL")
    assert dict(statuses) == {"succeeded": 13, "held": 1}

    events = query(ws, "SELECT * FROM membership_events ORDER BY ALL")
    second = cli(ws, "demo")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing new to import" in second.stdout and "delivery " not in second.stdout
    assert query(ws, "SELECT count(*) FROM imports") == [(14,)]
    assert query(ws, "SELECT * FROM membership_events ORDER BY ALL") == events
    assert "audience-pipeline approve 14" in second.stdout  # still waiting for an operator

    # `make clean` drops what was imported, not the drop folders: the next demo plays the three steps again,
    # in order, rather than importing the leftover files of every step at once
    for generated in ("lake", "dagster"):
        shutil.rmtree(ws / "data" / generated)
    for database in (ws / "data").glob("*.duckdb"):
        database.unlink()
    again = cli(ws, "demo")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "delivery 3-third-delivery" in again.stdout
    assert members(ws) == EXPECTED_MEMBERS
    assert dict(query(ws, "SELECT status, count(*) FROM imports GROUP BY ALL")) == {"succeeded": 13, "held": 1}


def test_the_repository_workspace_is_the_template():
    """`make demo` (the repository's feeds.yaml and data/) and `init DIR` (the template) show the same demo."""
    assert (ROOT / "feeds.yaml").read_bytes() == (TEMPLATE / "feeds.yaml").read_bytes()
    sample = sorted(p.relative_to(TEMPLATE) for p in (TEMPLATE / "data").rglob("*") if p.is_file())
    assert len(sample) > 10
    for path in sample:
        assert (ROOT / path).read_bytes() == (TEMPLATE / path).read_bytes(), path
