"""The analysts' views are a public interface: their columns and types are pinned here, and the README's view
table must list exactly these columns, in this order (one source of truth, checked both ways)."""

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from audience_pipeline_tests.conftest import base_config

README = Path(__file__).resolve().parent.parent / "README.md"

# view (or table macro call) -> [(column, DuckDB type)]
CONTRACT = {
    "audiences": [
        ("audience_id", "BIGINT"), ("name", "VARCHAR"), ("feed", "VARCHAR"), ("status", "VARCHAR"),
        ("member_count", "BIGINT"), ("created_at", "TIMESTAMP WITH TIME ZONE"),
        ("updated_at", "TIMESTAMP WITH TIME ZONE"), ("version", "BIGINT"),
    ],
    "members": [
        ("audience_id", "BIGINT"), ("audience_name", "VARCHAR"), ("user_id", "VARCHAR"),
        ("qualified_at", "TIMESTAMP WITH TIME ZONE"), ("expires_at", "TIMESTAMP WITH TIME ZONE"),
        ("data_bag", "VARCHAR"),
    ],
    "membership_events": [
        ("audience_id", "BIGINT"), ("audience_name", "VARCHAR"), ("user_id", "VARCHAR"), ("action", "VARCHAR"),
        ("import_id", "BIGINT"), ("event_at", "TIMESTAMP WITH TIME ZONE"), ("source_file", "VARCHAR"),
        ("source_line", "BIGINT"), ("observed_at", "TIMESTAMP WITH TIME ZONE"),
    ],
    "imports": [
        ("import_id", "BIGINT"), ("feed", "VARCHAR"), ("source_uri", "VARCHAR"), ("file_name", "VARCHAR"),
        ("sha256", "VARCHAR"), ("status", "VARCHAR"), ("rows_total", "BIGINT"), ("rows_valid", "BIGINT"),
        ("rows_rejected", "BIGINT"), ("duplicates", "BIGINT"), ("unmatched", "BIGINT"), ("qualified", "BIGINT"),
        ("disqualified", "BIGINT"), ("error", "VARCHAR"), ("received_at", "TIMESTAMP WITH TIME ZONE"),
        ("finished_at", "TIMESTAMP WITH TIME ZONE"), ("size_bytes", "BIGINT"), ("semantics", "VARCHAR"),
        ("members", "BIGINT"), ("noops", "BIGINT"), ("warnings", "BIGINT"), ("audience_names", "VARCHAR[]"),
        ("users_sha256", "VARCHAR"), ("run_id", "VARCHAR"), ("ineligible", "BIGINT"), ("resolved_by", "VARCHAR"),
    ],
    "rejected_rows": [("import_id", "BIGINT"), ("line_number", "BIGINT"), ("reason", "VARCHAR"), ("raw", "VARCHAR")],
    "user_audiences": [
        ("user_id", "VARCHAR"), ("audience_id", "BIGINT"), ("audience_name", "VARCHAR"),
        ("qualified_at", "TIMESTAMP WITH TIME ZONE"),
    ],
    "audience_versions": [
        ("audience_id", "BIGINT"), ("audience_name", "VARCHAR"), ("feed", "VARCHAR"), ("version", "BIGINT"),
        ("import_id", "BIGINT"), ("sha256", "VARCHAR"), ("member_count", "BIGINT"), ("qualified", "BIGINT"),
        ("disqualified", "BIGINT"), ("valid_from", "TIMESTAMP WITH TIME ZONE"),
        ("valid_to", "TIMESTAMP WITH TIME ZONE"), ("list_time", "TIMESTAMP WITH TIME ZONE"), ("status", "VARCHAR"),
    ],
    "members_as_of('r', now())": [("user_id", "VARCHAR")],
    "user_audiences_as_of('a', now())": [
        ("feed", "VARCHAR"), ("audience_name", "VARCHAR"), ("audience_id", "BIGINT"),
        ("qualified_at", "TIMESTAMP WITH TIME ZONE"), ("expires_at", "TIMESTAMP WITH TIME ZONE"),
    ],
}


def _without_parentheses(text: str) -> str:
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def readme_views() -> dict[str, list[str]]:
    """The README's view table: view or macro name -> the columns it lists, in order."""
    section = README.read_text().split("## For analysts", 1)[1].split("\n## ", 1)[0]
    views = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([a-z_]+)(?:\(.*?\))?` \| (.*) \|$", line)
        if not match:
            continue
        name, cell = match.groups()
        cell = _without_parentheses(cell)
        if cell.startswith("table macro:"):
            cell = cell.removeprefix("table macro:").split(" of every", 1)[0]
        elif cell.startswith("macro:"):
            continue
        views[name] = [c.strip() for c in cell.split(",") if c.strip()]
    return views


def test_views_have_the_pinned_columns_and_types(env):
    env.import_file("r.csv", "a\nb\n")
    for view, expected in CONTRACT.items():
        described = env.query(f"DESCRIBE SELECT * FROM {view}")
        assert [(row[0], row[1]) for row in described] == expected, view


def test_the_readme_lists_exactly_the_views_columns():
    listed = readme_views()
    pinned = {view.split("(")[0]: [c for c, _ in columns] for view, columns in CONTRACT.items()}
    assert listed == pinned


def test_the_views_values_where_they_come_from(make_env):
    config = base_config()
    config["feeds"]["mics"] = {"format": "mediarithmics", "source": "drop/mics"}
    env = make_env(config)
    first = env.import_file("r.csv", "a\nb\n")
    second = env.import_file("r.csv", "b\n\nc\n")

    assert env.query("SELECT user_id, action, import_id, source_file, source_line FROM membership_events "
                     "WHERE audience_name = 'r' ORDER BY import_id, user_id") == [
        ("a", "qualify", first.import_id, "r.csv", 1), ("b", "qualify", first.import_id, "r.csv", 2),
        ("a", "disqualify", second.import_id, "r.csv", None), ("c", "qualify", second.import_id, "r.csv", 3)]
    assert env.query("SELECT user_id, qualified_at FROM members WHERE audience_name = 'r' ORDER BY 1") == [
        ("b", first.applied_at), ("c", second.applied_at)]
    assert env.query("SELECT created_at, updated_at FROM audiences WHERE name = 'r'") == [
        (first.applied_at, second.applied_at)]
    for received_at, finished_at in env.query("SELECT received_at, finished_at FROM imports"):
        assert finished_at is not None and finished_at >= received_at
    assert env.query("SELECT audience_name, qualified_at FROM user_audiences WHERE user_id = 'b'") == [
        ("r", first.applied_at)]

    # members_as_of leaves out a membership whose expiry has passed at the instant asked for
    expires = datetime.now(UTC) + timedelta(days=1)
    env.import_file("e.ndjson", json.dumps({
        "operation": "UPDATE", "expiration_duration": 0, "expiration_ts": int(expires.timestamp() * 1000),
        "user_account_id": "u1", "segment_technical_name": "exp"}) + "\n", feed="mics")
    before = expires - timedelta(hours=1)
    after = expires + timedelta(hours=1)
    assert env.query("SELECT user_id FROM members_as_of('exp', ?)", [before]) == [("u1",)]
    assert env.query("SELECT user_id FROM members_as_of('exp', ?)", [after]) == []
