"""The analysts' DuckDB file: views over the lake and the published catalog, nothing else.

Runs never open this file: it holds no data, only view definitions with absolute paths, so it works
from any working directory and an analyst may keep ``duckdb -readonly`` sessions open indefinitely.
It is written once (into a temporary file, then renamed into place) and again only on request.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from audience_pipeline.sql import quote_literal
from audience_pipeline.storage import chunks
from audience_pipeline.storage.lake import Lake
from audience_pipeline.storage.publishing import state_sql

# Raised whenever a view's columns change: an analytics file of another version is rewritten (by rename, so
# sessions holding the old one keep it) the next time the workspace is prepared.
VIEWS_VERSION = 4


def _scan(sources: list[str], union_by_name: bool = False) -> str:
    """A scan of the real partitions first and the empty placeholder last.

    DuckDB estimates a multi-file scan's size from its first file. With the placeholder first, every
    members scan looked empty, so the join with the snapshot built its hash table on the members (all
    rows of all versions) and no file was pruned: `members_as_of` read all 30 versions of a 16M list.
    Listed after the real files, the scan looks as big as it is, the snapshot side is built, and the
    join's dynamic filter on (audience_id, version) leaves DuckDB one folder to read.
    """
    listed = ", ".join(quote_literal(s) for s in sources)
    union = ", union_by_name = true" if union_by_name else ""
    return f"read_parquet([{listed}], hive_partitioning = true, allow_empty = true{union})"


def view_statements(lake: Lake) -> list[str]:
    base_glob, deltas_glob = quote_literal(lake.base_glob), quote_literal(lake.deltas_glob)
    # The newest delta and the base it applies to are the whole state (storage.publishing). Both numbers come
    # from one listing of the file names (no file is opened), taken once per query (MATERIALIZED): two listings
    # could straddle a compaction and pair a delta with another base. The filters on the hive columns prune
    # every other file from the scans; the delta, small, is read once.
    pick = (f"SELECT max(seq) AS seq, arg_max(base, seq) AS base FROM ("
            f"SELECT regexp_extract(file, 'seq=([0-9]+)', 1)::BIGINT AS seq, "
            f"regexp_extract(file, 'base=([0-9]+)', 1)::BIGINT AS base FROM glob({deltas_glob}))")
    delta = (f"SELECT * EXCLUDE (base) FROM read_parquet({deltas_glob}, hive_partitioning = true) "
             f"WHERE seq = (SELECT seq FROM pick)")
    base = f"(SELECT * FROM read_parquet({base_glob}, hive_partitioning = true) WHERE seq = (SELECT base FROM pick))"
    snapshot = (f"(WITH pick AS MATERIALIZED ({pick}), delta AS MATERIALIZED ({delta}) "
                f"SELECT * FROM {state_sql(base, 'delta')})")
    members = _scan(lake.members_sources)
    rejected = chunks.view_source(lake, "rejected", _scan(lake.rejected_sources), union_by_name=False)
    # observed_at came with views version 2
    events = chunks.view_source(lake, "events", _scan(lake.events_sources, union_by_name=True), union_by_name=True)
    # An audience is (feed, name): the optional third argument keeps two feeds' audiences of one name apart.
    # A name answers for the feed's newest audience of that name: the live one, where a deleted name was reused
    # (the deleted audience stays queryable by audience_id in audience_versions).
    as_of = f"""
            SELECT m.user_id
            FROM {members} m
            JOIN (SELECT audience_id, version
                  FROM (SELECT *, max(audience_id) OVER (PARTITION BY feed) AS newest FROM {snapshot}
                        WHERE record = 'version' AND audience_name = name AND (feed_name IS NULL OR feed = feed_name))
                  WHERE audience_id = newest
                    AND valid_from <= ts::TIMESTAMPTZ AND (valid_to IS NULL OR valid_to > ts::TIMESTAMPTZ)) v
              ON m.audience_id = v.audience_id AND m.version = v.version
            WHERE m.expires_at IS NULL OR m.expires_at > ts::TIMESTAMPTZ"""
    # Every audience a user is in at an instant (Loymax's customer profile), from the lists valid then.
    user_as_of = f"""
            SELECT v.feed, v.audience_name, v.audience_id, m.qualified_at, m.expires_at
            FROM {members} m
            JOIN (SELECT audience_id, version, audience_name, feed FROM {snapshot}
                  WHERE record = 'version'
                    AND valid_from <= ts::TIMESTAMPTZ AND (valid_to IS NULL OR valid_to > ts::TIMESTAMPTZ)) v
              ON m.audience_id = v.audience_id AND m.version = v.version
            WHERE m.user_id = uid AND (m.expires_at IS NULL OR m.expires_at > ts::TIMESTAMPTZ)"""
    return [
        "SET TimeZone = 'UTC'",
        f"CREATE MACRO views_version() AS {VIEWS_VERSION}",
        f"CREATE VIEW audience_versions AS SELECT audience_id, audience_name, feed, version, import_id, sha256,"
        f" member_count, qualified, disqualified, valid_from, valid_to, list_time, audience_status AS status"
        f" FROM {snapshot}"
        f" WHERE record = 'version'",
        f"""CREATE VIEW imports AS
            SELECT import_id, feed, source_uri, file_name, sha256, status, rows_total, rows_valid, rows_rejected,
                   duplicates, unmatched, qualified, disqualified, error, received_at, finished_at,
                   size_bytes, semantics, members, noops, warnings, audiences AS audience_names, users_sha256, run_id,
                   ineligible, resolved_by
            FROM {snapshot} WHERE record = 'import'""",
        f"""CREATE VIEW audiences AS
            SELECT audience_id,
                   any_value(audience_name) AS name,
                   any_value(feed) AS feed,
                   any_value(audience_status) AS status,
                   max(member_count) FILTER (WHERE valid_to IS NULL) AS member_count,
                   min(valid_from) AS created_at,
                   max(valid_from) AS updated_at,
                   max(version) FILTER (WHERE valid_to IS NULL) AS version
            FROM {snapshot} WHERE record = 'version'
            GROUP BY audience_id""",
        f"""CREATE VIEW members AS
            SELECT v.audience_id, v.audience_name, m.user_id, m.qualified_at, m.expires_at, m.data_bag
            FROM {members} m
            JOIN (SELECT audience_id, version, audience_name FROM {snapshot}
                  WHERE record = 'version' AND valid_to IS NULL) v
              ON m.audience_id = v.audience_id AND m.version = v.version
            WHERE m.expires_at IS NULL OR m.expires_at > now()""",
        f"""CREATE VIEW membership_events AS
            SELECT e.audience_id, v.audience_name, e.user_id, e.action, e.import_id, e.event_at,
                   i.file_name AS source_file, e.source_line, e.observed_at
            FROM {events} e
            JOIN (SELECT import_id, file_name FROM {snapshot}
                  WHERE record = 'import' AND status = 'succeeded') i ON i.import_id = e.import_id
            JOIN (SELECT audience_id, import_id, audience_name FROM {snapshot} WHERE record = 'version') v
              ON v.audience_id = e.audience_id AND v.import_id = e.import_id""",
        f"""CREATE VIEW rejected_rows AS
            SELECT r.import_id, r.line_number, r.reason, r.raw
            FROM {rejected} r
            SEMI JOIN (SELECT import_id FROM {snapshot} WHERE record = 'import') i ON i.import_id = r.import_id""",
        """CREATE VIEW user_audiences AS
            SELECT user_id, audience_id, audience_name, qualified_at FROM members""",
        f"CREATE MACRO members_as_of(name, ts, feed_name := NULL) AS TABLE {as_of}",
        f"CREATE MACRO user_audiences_as_of(uid, ts) AS TABLE {user_as_of}",
    ]


S3_PREAMBLE = """-- Views over an S3 lake, for DuckDB with the httpfs extension (INSTALL needs network access to
-- DuckDB's extension host). Credentials come from the standard AWS chain.
INSTALL httpfs;
LOAD httpfs;
CREATE OR REPLACE SECRET audience_lake (TYPE s3, PROVIDER credential_chain);
"""


def analytics_script(lake: Lake) -> str:
    """The views as a SQL script, for an S3 lake that this machine's DuckDB cannot open itself."""
    statements = view_statements(lake)[1:]
    return S3_PREAMBLE + "".join(f"{' '.join(s.split())};\n" for s in statements)


def _version(path: Path) -> int | None:
    """The views version of an analytics file (read-only, so an analyst's open session does not block it)."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        return con.execute("SELECT views_version()").fetchone()[0]
    except duckdb.Error:
        return None  # written before views had a version
    finally:
        con.close()


def write_analytics(path: Path, lake: Lake, replace: bool = False) -> bool:
    """Create the views file; returns False when it exists and ``replace`` was not asked for."""
    if path.exists() and not replace and _version(path) == VIEWS_VERSION:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        for statement in view_statements(lake)[1:]:
            con.execute(statement)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    os.replace(tmp, path)
    return True
