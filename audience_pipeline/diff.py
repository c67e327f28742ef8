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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audience_pipeline import faults
from audience_pipeline.duck import arrow_utc, copy_to_parquet, read_ahead
from audience_pipeline.storage.catalog import CurrentVersion, NewVersion
from audience_pipeline.storage.lake import Lake

# The file's last command per (audience, user) (line order decides), then one full outer join with the
# previous lists gives, per pair, what the file says and what was there before. arg_max_null, not arg_max:
# a last command without an expiry clears it (arg_max skips NULLs and would keep an earlier command's).
# At 16M IDs under a 1 GB memory limit this takes 5.5 s where one aggregation over the union of both sides
# took 8.5 s (DuckDB 2.0): the join's states are fixed-width and the previous lists stream past its build
# side. The hash table is built on the smaller side, so incremental commands against a big audience hold no
# state per previous member. Data bags are joined in afterwards by the line of the last command, and when
# every row of the file is a plain add (Repro), constants stand in for the commands.
FINAL_STATE = """
SELECT m.audience_id, r.user_id, {file_state}, max(r.source_line) AS source_line
FROM read_parquet($rows) r JOIN audience_map m ON m.audience_key = r.audience_key
GROUP BY m.audience_id, r.user_id
"""
FINAL_STATE_COMMANDS = """arg_max_null(r.action = 'add', r.source_line) AS is_add,
       arg_max_null({file_expiry}, r.source_line) AS expires_at"""
JOINED = """
SELECT coalesce(f.audience_id, p.audience_id) AS audience_id, coalesce(f.user_id, p.user_id) AS user_id,
       f.user_id IS NOT NULL AS touched, f.is_add, f.expires_at, f.source_line,
       p.user_id IS NOT NULL AS in_previous, p.qualified_at AS previous_qualified_at,
       {previous_expiry} AS previous_expires_at
FROM ({final_state}) f FULL OUTER JOIN {previous} p ON p.audience_id = f.audience_id AND p.user_id = f.user_id
"""
# A relative expiry (mediarithmics' expiration_duration) counts from the import's instant.
RELATIVE_EXPIRY = "coalesce(r.expires_at, $event_at::TIMESTAMPTZ + to_seconds(r.expires_in))"
PLAIN_ADDS = "true AS is_add, NULL::TIMESTAMPTZ AS expires_at"

FILE_BAGS = """LEFT JOIN (SELECT m.audience_id, r.user_id, r.source_line, r.data_bag
                          FROM read_parquet($rows) r JOIN audience_map m ON m.audience_key = r.audience_key
                          WHERE r.data_bag IS NOT NULL) fb
                 ON fb.audience_id = g.audience_id AND fb.user_id = g.user_id AND fb.source_line = g.source_line"""
PREVIOUS_BAGS = """LEFT JOIN (SELECT audience_id, user_id, data_bag FROM {previous} WHERE data_bag IS NOT NULL) pb
                     ON pb.audience_id = g.audience_id AND pb.user_id = g.user_id"""

PREVIOUS_FILES = """(SELECT audience_id::BIGINT AS audience_id, user_id, qualified_at, expires_at, data_bag
                     FROM read_parquet($previous_files, hive_partitioning = true))"""
NO_PREVIOUS = """(SELECT NULL::BIGINT AS audience_id, NULL::VARCHAR AS user_id, NULL::TIMESTAMPTZ AS qualified_at,
                         NULL::TIMESTAMPTZ AS expires_at, NULL::VARCHAR AS data_bag WHERE false)"""
# (commands other than plain adds or with an expiry, data bags) in the file, and (expiries, bags) before it
FILE_ATTRIBUTES = """
SELECT count(*) FILTER (WHERE action <> 'add' OR expires_at IS NOT NULL) > 0, count(data_bag) > 0
FROM read_parquet($rows)
"""
PREVIOUS_ATTRIBUTES = "SELECT count(expires_at) > 0, count(data_bag) > 0 FROM read_parquet($previous_files)"

# Per (audience, user), membership before and after; the new lists and the events are all filters of it.
#   was_member  in the previous list and not expired at the import's time
#   lapsed      in the previous list but expired by then: it left at its expires_at (event at that instant)
#   is_member   the file adds it (with an expiry still ahead), or leaves it untouched where untouched members
#               stay (an incremental file, or another part of the same dated list)
TRANSITIONS = """
SELECT *, is_member <> was_member OR lapsed OR noop AS changed
FROM (
    SELECT audience_id, user_id, touched, was_member, lapsed, lapsed_at, source_line, expires_at, data_bag,
           CASE WHEN touched THEN is_add AND coalesce(expires_at > $event_at, true)
                ELSE keep_untouched AND NOT lapsed END AS is_member,
           CASE WHEN was_member THEN qualified_at ELSE $event_at::TIMESTAMPTZ END AS qualified_at,
           touched AND NOT is_add AND NOT was_member AS noop
    FROM (
        SELECT g.audience_id, g.user_id, g.touched, g.is_add, g.source_line,
               g.in_previous AND coalesce(g.previous_expires_at > $event_at, true) AS was_member,
               g.in_previous AND coalesce(g.previous_expires_at <= $event_at, false) AS lapsed,
               g.previous_expires_at AS lapsed_at,
               g.previous_qualified_at AS qualified_at,
               CASE WHEN g.touched THEN g.expires_at ELSE g.previous_expires_at END AS expires_at,
               CASE WHEN g.touched THEN {file_bag} ELSE {previous_bag} END AS data_bag,
               m.keep_untouched
        FROM ({merged}) g JOIN audience_map m ON m.audience_id = g.audience_id {bag_joins}
    )
)
"""

# A lapsed member that the file adds again left at its expiry and comes back now: two events at two
# instants, the only case with more than one event per (import, audience, user). A qualify event carries the
# time its row says it became true (ODP's ts, Attentive's date), where the file gives one.
EVENTS = """
SELECT audience_id, user_id, 'disqualify' AS action, lapsed_at AS event_at, NULL::BIGINT AS source_line,
       NULL::TIMESTAMPTZ AS observed_at
FROM read_parquet($changes) WHERE lapsed
UNION ALL
SELECT c.audience_id, c.user_id, CASE WHEN c.is_member THEN 'qualify' ELSE 'disqualify' END,
       $event_at::TIMESTAMPTZ, c.source_line, {observed}
FROM read_parquet($changes) c {observed_join} WHERE c.is_member <> c.was_member
"""
OBSERVED_JOIN = """LEFT JOIN (SELECT DISTINCT ON (source_line) source_line, observed_at FROM read_parquet($rows)
                             WHERE observed_at IS NOT NULL) o ON o.source_line = c.source_line"""

CHANGE_COUNTS = """
SELECT audience_id,
       count(*) FILTER (WHERE is_member AND NOT was_member),
       count(*) FILTER (WHERE (was_member AND NOT is_member) OR lapsed),
       count(*) FILTER (WHERE noop)
FROM read_parquet($changes) GROUP BY audience_id
"""

MEMBER_COLUMNS = ["user_id", "qualified_at", "expires_at", "data_bag"]
MEMBERS_PARQUET = {
    "compression": "zstd", "compression_level": 1,
    "use_dictionary": ["qualified_at", "expires_at", "data_bag"],
    "column_encoding": {"user_id": "DELTA_LENGTH_BYTE_ARRAY"},
}
TRANSITIONS_BATCH_ROWS = 1 << 17


@dataclass
class _Tally:
    members: int = 0
    next_expiry: datetime | None = None


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
    params = {"rows": str(rows_path)}
    # fetchall, not fetchone: an unfinished result would block the streamed query below
    [(file_commands, file_bags)] = con.execute(FILE_ATTRIBUTES, params).fetchall()
    # rows validated before expires_in existed (an import held across the upgrade) have none
    columns = {c for c, *_ in con.execute("DESCRIBE SELECT * FROM read_parquet($rows)", params).fetchall()}
    relative = "expires_in" in columns and con.execute(
        "SELECT count(expires_in) > 0 FROM read_parquet($rows)", params).fetchall()[0][0]
    file_expiry = RELATIVE_EXPIRY if relative else "r.expires_at"
    file_commands = file_commands or relative
    previous_expiries = previous_bags = False
    if previous_files:
        params["previous_files"] = previous_files
        [(previous_expiries, previous_bags)] = con.execute(PREVIOUS_ATTRIBUTES,
                                                           {"previous_files": previous_files}).fetchall()
    previous = PREVIOUS_FILES if previous_files else NO_PREVIOUS
    state = FINAL_STATE_COMMANDS.format(file_expiry=file_expiry) if file_commands else PLAIN_ADDS
    merged = JOINED.format(final_state=FINAL_STATE.format(file_state=state), previous=previous,
                           previous_expiry="p.expires_at" if previous_expiries else "NULL")
    transitions = TRANSITIONS.format(
        merged=merged,
        file_bag="fb.data_bag" if file_bags else "NULL::VARCHAR",
        previous_bag="pb.data_bag" if previous_bags else "NULL::VARCHAR",
        bag_joins=(FILE_BAGS if file_bags else "") + " " + (PREVIOUS_BAGS.format(previous=previous)
                                                             if previous_bags else ""),
    )
    faults.point("diff.final_state")
    staged = lake.staging(f"import_{import_id}_members")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    changes = staged / "changes.parquet"
    # Several audiences come out one after the other, so each members file is written in one go.
    order = " ORDER BY audience_id" if len(audience_ids) > 1 else ""
    bound = {k: v for k, v in (params | {"event_at": event_at}).items() if f"${k}" in transitions}
    tallies, pairs = _write_transitions(con, transitions + order, bound, staged, import_id, audience_ids, changes)
    faults.point("diff.transitions")
    faults.point("diff.members_written")
    [(observed,)] = con.execute("SELECT count(observed_at) > 0 FROM read_parquet($rows)",
                                {"rows": str(rows_path)}).fetchall()
    events = EVENTS.format(observed="CASE WHEN c.is_member THEN o.observed_at END" if observed
                           else "NULL::TIMESTAMPTZ", observed_join=OBSERVED_JOIN if observed else "")
    copy_to_parquet(con, events, {"event_at": event_at, "changes": str(changes),
                                  **({"rows": str(rows_path)} if observed else {})}, lake.events(import_id))
    faults.point("diff.events_written")
    changed = {a: (q, d, n) for a, q, d, n in con.execute(CHANGE_COUNTS, {"changes": str(changes)}).fetchall()}
    times = list_times(con, rows_path)
    keys = {v: k for k, v in audience_ids.items()}
    versions = []
    for audience_id in sorted(audience_ids.values()):
        qualified, disqualified, _ = changed.get(audience_id, (0, 0, 0))
        tally = tallies[audience_id]
        versions.append(NewVersion(audience_id=audience_id, member_count=tally.members, qualified=qualified,
                                   disqualified=disqualified, next_expiry=tally.next_expiry,
                                   list_time=times.get(keys[audience_id])))
    noops = sum(n for _, _, n in changed.values())
    for audience_id in sorted(audience_ids.values()):
        lake.move_into_place(staged / f"audience_id={audience_id}" / f"version={import_id}",
                             lake.members_dir(audience_id, import_id))
        lake.publish_tree(lake.members_dir(audience_id, import_id))
    lake.publish(lake.events(import_id))
    faults.point("diff.moved_into_place")
    shutil.rmtree(staged)
    con.execute("DROP TABLE IF EXISTS audience_map")
    return DiffResult(versions=versions, pairs=pairs, noops=noops)


def _write_transitions(con: duckdb.DuckDBPyConnection, sql: str, params: dict, staged: Path, import_id: int,
                       audience_ids: dict[str, int], changes: Path) -> tuple[dict[int, _Tally], int]:
    """Stream the transitions once: members go to each audience's new list, changed rows (events, no-ops) to
    ``changes``. Materializing them instead (16.8M rows at 16M IDs) spilled to disk and was read back twice.
    Returns, per audience, its member count and next expiry, and the number of (audience, user) pairs the
    file named."""
    reader = con.sql(sql, params=params).to_arrow_reader(TRANSITIONS_BATCH_ROWS)
    members_schema = pa.schema([arrow_utc(reader.schema.field(c)) for c in MEMBER_COLUMNS])
    changes_schema = pa.schema([arrow_utc(f) for f in reader.schema])
    tallies = {a: _Tally() for a in audience_ids.values()}
    pairs = 0
    writer, writing = None, None
    with pq.ParquetWriter(changes, changes_schema, compression="zstd", compression_level=1) as changes_out:
        try:
            for batch in read_ahead(reader):
                pairs += pc.sum(batch.column("touched")).as_py() or 0
                changed = batch.filter(batch.column("changed"))
                if changed.num_rows:
                    changes_out.write_batch(changed.cast(changes_schema))
                members = batch.filter(batch.column("is_member"))
                for audience_id, part in _by_audience(members):
                    if audience_id != writing:
                        if writer is not None:
                            writer.close()
                        writer, writing = pq.ParquetWriter(_members_target(staged, audience_id, import_id),
                                                           members_schema, **MEMBERS_PARQUET), audience_id
                    writer.write_batch(part.select(MEMBER_COLUMNS).cast(members_schema))
                    tally = tallies[audience_id]
                    tally.members += part.num_rows
                    expiry = pc.min(part.column("expires_at")).as_py()
                    if expiry is not None and (tally.next_expiry is None or expiry < tally.next_expiry):
                        tally.next_expiry = expiry
        finally:
            if writer is not None:
                writer.close()
    for audience_id, tally in tallies.items():
        if tally.members == 0:  # an emptied audience still gets its (empty) list
            pq.ParquetWriter(_members_target(staged, audience_id, import_id), members_schema,
                             **MEMBERS_PARQUET).close()
    return tallies, pairs


def _by_audience(batch: pa.RecordBatch):
    """(audience_id, rows) of a batch, in the order the audiences come (the stream is sorted by audience)."""
    if batch.num_rows == 0:
        return
    ids = batch.column("audience_id")
    bounds = pc.min_max(ids)
    if bounds["min"] == bounds["max"]:
        yield bounds["min"].as_py(), batch
        return
    for audience_id in pc.unique(ids).to_pylist():
        yield audience_id, batch.filter(pc.equal(ids, audience_id))


def _members_target(staged: Path, audience_id: int, import_id: int) -> Path:
    target = staged / f"audience_id={audience_id}" / f"version={import_id}" / "data_0.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
