"""The analysts' views are a public interface: their columns and types are pinned here, and the README's view
table must list exactly these columns, in this order (one source of truth, checked both ways)."""

import re
from pathlib import Path

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
