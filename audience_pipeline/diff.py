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

from audience_pipeline import faults
from audience_pipeline.duck import copy_to_parquet
from audience_pipeline.sql import quote_identifier, quote_literal
from audience_pipeline.storage.catalog import CurrentVersion, NewVersion
from audience_pipeline.storage.lake import MEMBERS_SCHEMA, Lake

# The last command per (audience, user) in line order decides the outcome of the file for that pair. When
# every row is a plain add without attributes (Repro), one max() replaces the arg_max() aggregates,
# which halves this step on 16M rows.
FINAL_STATE = """
CREATE OR REPLACE TEMP TABLE final_state AS
SELECT m.audience_id, r.user_id,
       arg_max(r.action, r.source_line) AS action,
       arg_max(r.expires_at, r.source_line) AS expires_at,
       arg_max(r.data_bag, r.source_line) AS data_bag,
       max(r.source_line) AS source_line
FROM read_parquet($rows) r JOIN audience_map m ON m.audience_key = r.audience_key
GROUP BY ALL
"""

FINAL_STATE_ADDS_ONLY = """
CREATE OR REPLACE TEMP TABLE final_state AS
SELECT m.audience_id, r.user_id, 'add' AS action, NULL::TIMESTAMPTZ AS expires_at, NULL::VARCHAR AS data_bag,
       max(r.source_line) AS source_line
FROM read_parquet($rows) r JOIN audience_map m ON m.audience_key = r.audience_key
GROUP BY ALL
"""

HAS_ATTRIBUTES = """
SELECT count(*) FILTER (WHERE action <> 'add' OR expires_at IS NOT NULL OR data_bag IS NOT NULL) > 0
FROM read_parquet($rows)
"""

# One full outer join of the file's final state with the previous lists gives, per (audience, user),
# membership before and after; the new lists and the events are all filters of it.
#   was_member  in the previous list and not expired at the import's time
#   lapsed      in the previous list but expired by then: it left at its expires_at (event at that instant)
#   is_member   the file adds it (with an expiry still ahead), or leaves it untouched where untouched members
#               stay (an incremental file, or another part of the same dated list)
TRANSITIONS = """
CREATE OR REPLACE TEMP TABLE transitions AS
SELECT audience_id, user_id, was_member, lapsed, lapsed_at, source_line, expires_at, data_bag,
       CASE WHEN touched THEN action = 'add' AND coalesce(expires_at > $event_at, true)
            ELSE keep_untouched AND NOT lapsed END AS is_member,
       CASE WHEN was_member THEN qualified_at ELSE $event_at::TIMESTAMPTZ END AS qualified_at,
       touched AND action = 'remove' AND NOT was_member AS noop
FROM (
    SELECT coalesce(f.audience_id, p.audience_id) AS audience_id,
           coalesce(f.user_id, p.user_id) AS user_id,
           f.user_id IS NOT NULL AS touched,
           f.action,
           p.user_id IS NOT NULL AND coalesce(p.expires_at > $event_at, true) AS was_member,
           p.user_id IS NOT NULL AND coalesce(p.expires_at <= $event_at, false) AS lapsed,
           p.expires_at AS lapsed_at,
           p.qualified_at,
           CASE WHEN f.user_id IS NOT NULL THEN f.expires_at ELSE p.expires_at END AS expires_at,
           CASE WHEN f.user_id IS NOT NULL THEN f.data_bag ELSE p.data_bag END AS data_bag,
           f.source_line,
           m.keep_untouched
    FROM final_state f FULL OUTER JOIN previous p ON p.audience_id = f.audience_id AND p.user_id = f.user_id
    JOIN audience_map m ON m.audience_id = coalesce(f.audience_id, p.audience_id)
)
"""

# A lapsed member that the file adds again left at its expiry and comes back now: two events at two
# instants, the only case with more than one event per (import, audience, user).
EVENTS = """
SELECT audience_id, user_id, 'disqualify' AS action, lapsed_at AS event_at, NULL::BIGINT AS source_line
FROM transitions WHERE lapsed
UNION ALL
SELECT audience_id, user_id, CASE WHEN is_member THEN 'qualify' ELSE 'disqualify' END, $event_at::TIMESTAMPTZ,
       source_line
FROM transitions WHERE is_member <> was_member
"""

COUNTS = """
SELECT m.audience_id,
       count(t.user_id) FILTER (WHERE t.is_member),
       count(t.user_id) FILTER (WHERE t.is_member AND NOT t.was_member),
       count(t.user_id) FILTER (WHERE (t.was_member AND NOT t.is_member) OR t.lapsed),
       count(t.user_id) FILTER (WHERE t.noop),
       min(t.expires_at) FILTER (WHERE t.is_member)
FROM audience_map m LEFT JOIN transitions t ON t.audience_id = m.audience_id
GROUP BY m.audience_id ORDER BY m.audience_id
"""


@dataclass(frozen=True)
class DiffResult:
    versions: list[NewVersion]
    pairs: int  # distinct (audience, user) pairs in the file: valid rows minus this are duplicates
    noops: int  # removals of users who were not members

    @property
    def qualified(self) -> int:
        return sum(v.qualified for v in self.versions)

    @property
    def disqualified(self) -> int:
        return sum(v.disqualified for v in self.versions)

    @property
    def members(self) -> int:
        return sum(v.member_count for v in self.versions)


def list_times(con: duckdb.DuckDBPyConnection, rows_path: Path) -> dict[str, datetime]:
    """Per audience, the newest time the file says its rows were true (ODP's ``ts``), where given."""
    rows = con.execute(
        "SELECT audience_key, max(observed_at) FROM read_parquet(?) WHERE observed_at IS NOT NULL GROUP BY 1",
        [str(rows_path)],
    ).fetchall()
    return dict(rows)


def compute_diff(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    import_id: int,
    keep_untouched: dict[int, bool],
    rows_path: Path,
    audience_ids: dict[str, int],
    current: dict[int, CurrentVersion],
    event_at: datetime,
) -> DiffResult:
    """Write the new member list of every audience the file names (as version ``import_id``) and the
    file's events, and return the counts. ``keep_untouched`` says, per audience, whether members the file
    does not mention stay (incremental) or leave (a full list). Re-running it rewrites the same files."""
    con.execute("CREATE OR REPLACE TEMP TABLE audience_map "
                "(audience_key VARCHAR, audience_id BIGINT, keep_untouched BOOLEAN)")
    if audience_ids:
        con.executemany("INSERT INTO audience_map VALUES (?, ?, ?)",
                        [[k, v, keep_untouched[v]] for k, v in audience_ids.items()])

    previous_files = [str(lake.members_file(a, cv.version)) for a, cv in current.items()
                      if lake.fetch(lake.members_file(a, cv.version))]
    if previous_files:
        con.execute(
            """CREATE OR REPLACE TEMP TABLE previous AS
               SELECT audience_id::BIGINT AS audience_id, user_id, qualified_at, expires_at, data_bag
               FROM read_parquet(?, hive_partitioning = true)""",
            [previous_files],
        )
    else:
        con.execute(f"CREATE OR REPLACE TEMP TABLE previous (audience_id BIGINT, {MEMBERS_SCHEMA})")

    params = {"rows": str(rows_path)}
    (has_attributes,) = con.execute(HAS_ATTRIBUTES, params).fetchone()
    con.execute(FINAL_STATE if has_attributes else FINAL_STATE_ADDS_ONLY, params)
    faults.point("diff.final_state")
    (pairs,) = con.execute("SELECT count(*) FROM final_state").fetchone()
    con.execute(TRANSITIONS, {"event_at": event_at})
    faults.point("diff.transitions")

    staged = lake.staging(f"import_{import_id}_members")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for audience_id in sorted(audience_ids.values()):
        target = staged / f"audience_id={audience_id}" / f"version={import_id}" / "data_0.parquet"
        target.parent.mkdir(parents=True)
        con.execute(
            f"""COPY (SELECT user_id, qualified_at, expires_at, data_bag FROM transitions
                      WHERE audience_id = ? AND is_member)
                TO {quote_literal(target)} (FORMAT parquet, COMPRESSION zstd)""",
            [audience_id],
        )
    faults.point("diff.members_written")
    copy_to_parquet(con, EVENTS, {"event_at": event_at}, lake.events(import_id))
    faults.point("diff.events_written")
    counts = con.execute(COUNTS).fetchall()
    times = list_times(con, rows_path)
    keys = {v: k for k, v in audience_ids.items()}
    versions = [
        NewVersion(audience_id=a, member_count=n, qualified=q, disqualified=d, next_expiry=e,
                   list_time=times.get(keys[a]))
        for a, n, q, d, _, e in counts
    ]
    for audience_id in sorted(audience_ids.values()):
        lake.move_into_place(staged / f"audience_id={audience_id}" / f"version={import_id}",
                             lake.members_dir(audience_id, import_id))
        lake.publish_tree(lake.members_dir(audience_id, import_id))
    lake.publish(lake.events(import_id))
    faults.point("diff.moved_into_place")
    shutil.rmtree(staged)
    for table in ("final_state", "transitions", "previous", "audience_map"):
        con.execute(f"DROP TABLE IF EXISTS {quote_identifier(table)}")
    return DiffResult(versions=versions, pairs=pairs, noops=sum(row[4] for row in counts))
