"""Validated rows + the current member lists -> new member lists and qualify/disqualify events.

All set operations run in DuckDB over Parquet. The outputs are written as unreferenced files (new
version folders, one events file); they become visible only when the catalog commits and re-publishes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from audience_pipeline.duck import copy_to_parquet
from audience_pipeline.model import Semantics
from audience_pipeline.sql import quote_literal
from audience_pipeline.storage.catalog import CurrentVersion, NewVersion
from audience_pipeline.storage.lake import MEMBERS_SCHEMA, Lake

# The last command per (audience, user) in line order decides the outcome of the file for that pair.
FINAL_STATE = """
CREATE OR REPLACE TEMP TABLE final_state AS
SELECT m.audience_id, r.user_id,
       arg_max(r.action, r.source_line) AS action,
       arg_max(r.expires_at, r.source_line) AS expires_at,
       arg_max(r.data_bag, r.source_line) AS data_bag,
       max(r.source_line) AS source_line
FROM read_parquet(?) r JOIN audience_map m ON m.audience_key = r.audience_key
GROUP BY ALL
"""

NEW_MEMBERS_REPLACE = """
CREATE OR REPLACE TEMP TABLE new_members AS
SELECT f.audience_id, f.user_id, coalesce(p.qualified_at, ?::TIMESTAMPTZ) AS qualified_at,
       f.expires_at, f.data_bag, f.source_line
FROM final_state f LEFT JOIN previous p ON p.audience_id = f.audience_id AND p.user_id = f.user_id
WHERE f.action = 'add'
"""

NEW_MEMBERS_INCREMENTAL = """
CREATE OR REPLACE TEMP TABLE new_members AS
SELECT f.audience_id, f.user_id, coalesce(p.qualified_at, ?::TIMESTAMPTZ) AS qualified_at,
       f.expires_at, f.data_bag, f.source_line
FROM final_state f LEFT JOIN previous p ON p.audience_id = f.audience_id AND p.user_id = f.user_id
WHERE f.action = 'add'
UNION ALL
SELECT p.audience_id, p.user_id, p.qualified_at, p.expires_at, p.data_bag, NULL
FROM previous p ANTI JOIN final_state f ON f.audience_id = p.audience_id AND f.user_id = p.user_id
"""

EVENTS = """
SELECT n.audience_id, n.user_id, 'qualify' AS action, ?::TIMESTAMPTZ AS event_at, n.source_line
FROM new_members n ANTI JOIN previous p ON p.audience_id = n.audience_id AND p.user_id = n.user_id
UNION ALL
SELECT p.audience_id, p.user_id, 'disqualify', ?::TIMESTAMPTZ, f.source_line
FROM previous p
ANTI JOIN new_members n ON n.audience_id = p.audience_id AND n.user_id = p.user_id
LEFT JOIN final_state f ON f.audience_id = p.audience_id AND f.user_id = p.user_id
"""

COUNTS = """
SELECT m.audience_id,
       (SELECT count(*) FROM new_members n WHERE n.audience_id = m.audience_id),
       (SELECT count(*) FROM events e WHERE e.audience_id = m.audience_id AND e.action = 'qualify'),
       (SELECT count(*) FROM events e WHERE e.audience_id = m.audience_id AND e.action = 'disqualify')
FROM audience_map m ORDER BY m.audience_id
"""


@dataclass(frozen=True)
class DiffResult:
    versions: list[NewVersion]

    @property
    def qualified(self) -> int:
        return sum(v.qualified for v in self.versions)

    @property
    def disqualified(self) -> int:
        return sum(v.disqualified for v in self.versions)

    @property
    def members(self) -> int:
        return sum(v.member_count for v in self.versions)


def compute_diff(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    import_id: int,
    semantics: Semantics,
    rows_path: Path,
    audience_ids: dict[str, int],
    current: dict[int, CurrentVersion],
    event_at: datetime,
) -> DiffResult:
    """Write the new member list of every audience the file names (as version ``import_id``) and the
    file's events, and return the counts. Re-running it for the same import rewrites the same files."""
    con.execute("CREATE OR REPLACE TEMP TABLE audience_map (audience_key VARCHAR, audience_id BIGINT)")
    con.executemany("INSERT INTO audience_map VALUES (?, ?)", [[k, v] for k, v in audience_ids.items()])

    previous_files = [str(lake.members_file(a, cv.version)) for a, cv in current.items()
                      if lake.members_file(a, cv.version).exists()]
    if previous_files:
        con.execute(
            """CREATE OR REPLACE TEMP TABLE previous AS
               SELECT audience_id::BIGINT AS audience_id, user_id, qualified_at, expires_at, data_bag
               FROM read_parquet(?, hive_partitioning = true)""",
            [previous_files],
        )
    else:
        con.execute(f"CREATE OR REPLACE TEMP TABLE previous (audience_id BIGINT, {MEMBERS_SCHEMA})")

    con.execute(FINAL_STATE, [str(rows_path)])
    new_sql = NEW_MEMBERS_REPLACE if semantics == Semantics.REPLACE else NEW_MEMBERS_INCREMENTAL
    con.execute(new_sql, [event_at])
    con.execute(f"CREATE OR REPLACE TEMP TABLE events AS {EVENTS}", [event_at, event_at])

    staged = lake.staging(f"import_{import_id}_members")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for audience_id in sorted(audience_ids.values()):
        target = staged / f"audience_id={audience_id}" / f"version={import_id}" / "data_0.parquet"
        target.parent.mkdir(parents=True)
        con.execute(
            f"""COPY (SELECT user_id, qualified_at, expires_at, data_bag FROM new_members
                      WHERE audience_id = ?)
                TO {quote_literal(target)} (FORMAT parquet, COMPRESSION zstd)""",
            [audience_id],
        )
    copy_to_parquet(
        con,
        "SELECT audience_id, user_id, action, event_at, source_line FROM events",
        [],
        lake.events(import_id),
    )
    versions = [
        NewVersion(audience_id=a, member_count=n, qualified=q, disqualified=d)
        for a, n, q, d in con.execute(COUNTS).fetchall()
    ]
    for audience_id in sorted(audience_ids.values()):
        lake.publish_dir(staged / f"audience_id={audience_id}" / f"version={import_id}",
                         lake.members_dir(audience_id, import_id))
    shutil.rmtree(staged)
    for table in ("final_state", "new_members", "events", "previous", "audience_map"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    return DiffResult(versions=versions)
