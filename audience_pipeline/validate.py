"""Raw file -> validated file: canonical rows in Parquet, rejected rows with line and reason, counts.

Everything row-level runs inside DuckDB; Python only sees counts and the first few rejects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audience_pipeline.config import FeedConfig
from audience_pipeline.duck import arrow_utc, copy_to_parquet
from audience_pipeline.formats import FileRejected, get_format
from audience_pipeline.model import (
    NOT_COUNTED_REJECTS,
    REJECT_CONTROL,
    REJECT_IDENTIFIER_CONFLICT,
    REJECT_INELIGIBLE,
    REJECT_INVALID_EMAIL,
    REJECT_INVALID_PHONE,
    REJECT_PATTERN,
    REJECT_TOO_LONG,
    REJECT_TOO_SHORT,
    REJECT_UNMATCHED,
    check_canonical_contract,
)
from audience_pipeline.users import UsersRegistry, identifier_kind, normalization_sql

SNIFF_BYTES = 64 * 1024
SPLIT_BATCH_ROWS = 1 << 17
CANONICAL_COLUMNS = ["audience_key", "identifier_type", "identifier", "user_id", "action", "expires_at",
                     "expires_in", "data_bag", "observed_at", "warning", "source_line"]
# Writing the rows is the slowest part of validation (one thread). A dictionary only where values repeat, and
# IDs as delta-length byte arrays: 4M rows in 0.76 s and 125 MB, against 1.14 s and 148 MB with the defaults.
ROWS_PARQUET = {
    "compression": "zstd", "compression_level": 1,
    "use_dictionary": ["audience_key", "identifier_type", "action", "warning"],
    "column_encoding": {"identifier": "DELTA_LENGTH_BYTE_ARRAY", "user_id": "DELTA_LENGTH_BYTE_ARRAY"},
}
CONTROL_CHARACTERS = r"[\x00-\x08\x0B-\x1F\x7F]"
# Audience names are data (stored and shown verbatim; paths use audience ids), within reason.
MAX_AUDIENCE_NAME = 1000


@dataclass(frozen=True)
class ValidationResult:
    rows_path: Path
    rejected_path: Path
    rows_total: int
    rows_valid: int
    rows_rejected: int
    unmatched: int
    warnings: int
    audiences: tuple[str, ...]
    # with a registry: resolved but not eligible for the feed (not counted toward max_reject_ratio)
    ineligible: int = 0
    # with a registry: accepted rows per identifier type that resolved them
    resolved_by: dict[str, int] = field(default_factory=dict)
    # registry values of the lookups used that failed to normalize (they match nothing; `registry check`)
    registry_invalid: int = 0


def precheck(raw_path: Path, file_name: str, feed: FeedConfig) -> None:
    """Whole-file refusals that need no parsing: empty, too large."""
    size = raw_path.stat().st_size
    if size == 0:
        raise FileRejected(f"{file_name}: empty file")
    if size > feed.max_file_bytes:
        raise FileRejected(f"{file_name}: {size} bytes is over the feed's limit of {feed.max_file_bytes} bytes")


def precheck_text(text_path: Path, file_name: str) -> None:
    """The file as text (after decompression): not empty, not binary."""
    if text_path.stat().st_size == 0:
        raise FileRejected(f"{file_name}: empty file")
    with open(text_path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if head.startswith(b"\x1f\x8b"):
        raise FileRejected(f"{file_name}: gzip-compressed, but this format expects plain text")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise FileRejected(f"{file_name}: binary content (NUL byte at line {line}), not a text file")


def _parse_error(file_name: str, exc: Exception) -> FileRejected:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return FileRejected(f"{file_name}: cannot be read: {first}")


def _split_rows(con: duckdb.DuckDBPyConnection, classified: str, params: dict, rows_path: Path,
                rejected_path: Path, work_dir: Path) -> None:
    """Write the valid rows to ``rows_path`` and the rejected ones to ``rejected_path``, from one read.

    DuckDB cannot send one query to two files, and a second pass redoes the parsing, the checks and the
    registry lookup (a 20M-user join); materializing the classified rows instead spills at 16M rows. So the
    query streams out as Arrow batches and each batch is split in two by a vectorized filter. Not through
    ``read_ahead`` (the diff's): here it gained nothing at 16M rows, and with a registry, whose lookup is held
    while the rows stream, it raised the import's peak from 1.45 to 1.51 GB.
    """
    reader = con.sql(classified, params=params).to_arrow_reader(SPLIT_BATCH_ROWS)
    rows_schema = pa.schema([arrow_utc(reader.schema.field(c)) for c in CANONICAL_COLUMNS])
    rejects_schema = pa.schema([reader.schema.field("source_line").with_name("line_number"),
                                reader.schema.field("reason"), reader.schema.field("raw")])
    rows_tmp = rows_path.with_name(f".{rows_path.name}.{os.getpid()}.tmp")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    unsorted = work_dir / "rejected_unsorted.parquet"
    with (pq.ParquetWriter(rows_tmp, rows_schema, **ROWS_PARQUET) as rows_out,
          pq.ParquetWriter(unsorted, rejects_schema, compression="zstd", compression_level=1) as rejects_out):
        for batch in reader:
            valid = pc.is_null(batch.column("reason"))
            rows = batch.filter(valid).select(CANONICAL_COLUMNS)
            if rows.num_rows:
                rows_out.write_batch(rows.cast(rows_schema))
            rejects = batch.filter(pc.invert(valid)).select(["source_line", "reason", "raw"])
            if rejects.num_rows:
                rejects_out.write_batch(rejects.rename_columns(rejects_schema.names))
    os.replace(rows_tmp, rows_path)
    # rejects are few; sorted by line they read as the file does (a registry join does not keep line order)
    copy_to_parquet(con, "SELECT * FROM read_parquet(?) ORDER BY line_number", [str(unsorted)], rejected_path)
    unsorted.unlink()


# With a registry, a row's identifier (or, when the format lists them in ``candidates``, each identifier of its
# line in priority order) is looked up; the first that resolves wins and becomes the row's identifier. Rows are
# keyed by source_line: a format that lists candidates gives one row per line.
SINGLE_RESOLUTION = """
    WITH c AS ({checks}),
    k AS (SELECT c.* REPLACE (CASE WHEN c.reason IS NULL AND NOT list_contains($hashed_types, c.identifier_type)
                                   THEN {normalized} ELSE c.identifier END AS identifier)
          FROM c)
    SELECT k.*, u.user_id,
           coalesce(k.reason, CASE WHEN k.identifier IS NULL THEN $r_not_normal
                                   WHEN u.user_id IS NULL THEN $r_unmatched
                                   WHEN NOT u.eligible THEN $r_ineligible END) AS final_reason
    FROM k
    LEFT JOIN ({lookup}) u
      ON u.identifier_type = k.identifier_type AND u.identifier = k.identifier AND k.reason IS NULL
"""
CANDIDATES_RESOLUTION = """
    WITH c AS ({checks}),
    listed AS (SELECT source_line, unnest(candidates) AS candidate, generate_subscripts(candidates, 1) AS pos
               FROM c WHERE reason IS NULL),
    k AS (SELECT source_line, pos, candidate.identifier_type AS identifier_type,
                 CASE WHEN list_contains($hashed_types, candidate.identifier_type)
                      THEN lower(candidate.identifier) ELSE {normalized} END AS identifier
          FROM listed WHERE candidate.identifier IS NOT NULL),
    hits AS (SELECT k.source_line, k.pos, k.identifier_type, k.identifier, u.user_id, u.eligible
             FROM k JOIN ({lookup}) u ON u.identifier_type = k.identifier_type AND u.identifier = k.identifier),
    best AS (SELECT source_line, arg_min(user_id, pos) AS user_id, arg_min(eligible, pos) AS eligible,
                    arg_min(identifier_type, pos) AS identifier_type, arg_min(identifier, pos) AS identifier,
                    count(DISTINCT user_id) AS users
             FROM hits GROUP BY source_line)
    SELECT c.* REPLACE (coalesce(b.identifier_type, c.identifier_type) AS identifier_type,
                        coalesce(b.identifier, c.identifier) AS identifier),
           b.user_id,
           coalesce(c.reason, CASE WHEN b.user_id IS NULL THEN $r_unmatched
                                   WHEN b.users > 1 THEN $r_conflict
                                   WHEN NOT b.eligible THEN $r_ineligible END) AS final_reason
    FROM c LEFT JOIN best b ON b.source_line = c.source_line AND c.reason IS NULL
"""


def _resolution_sql(checks_sql: str, lookup_sql: str, feed: FeedConfig, candidates: bool) -> tuple[str, dict]:
    """The checked rows with their user (or the reason they have none) through the registry's lookup."""
    # Attentive's parser already gave its identifiers the registry's form (E.164, lower-cased e-mails).
    kind = "plain" if feed.format == "attentive" else identifier_kind(feed)
    column = "candidate.identifier" if candidates else "c.identifier"
    normalized, params = normalization_sql(kind, column, feed.default_region.upper())
    # a plain identifier stays as the format gave it
    normalized = column if kind == "plain" else f"({normalized}).identifier"
    template = CANDIDATES_RESOLUTION if candidates else SINGLE_RESOLUTION
    params |= {"r_unmatched": REJECT_UNMATCHED, "r_ineligible": REJECT_INELIGIBLE}
    if candidates:
        params["r_conflict"] = REJECT_IDENTIFIER_CONFLICT
    else:
        params["r_not_normal"] = {"phone": REJECT_INVALID_PHONE, "email": REJECT_INVALID_EMAIL}.get(kind,
                                                                                                   REJECT_UNMATCHED)
    return template.format(checks=checks_sql, normalized=normalized, lookup=lookup_sql), params


def validate_file(
    con: duckdb.DuckDBPyConnection,
    raw_path: Path,
    file_name: str,
    feed: FeedConfig,
    users: UsersRegistry | None,
    rows_path: Path,
    rejected_path: Path,
    work_dir: Path,
    received_at: datetime,
) -> ValidationResult:
    precheck(raw_path, file_name, feed)
    fmt = get_format(feed.format)
    work_dir.mkdir(parents=True, exist_ok=True)
    text_path = fmt.decode(raw_path, file_name, feed, work_dir)
    precheck_text(text_path, file_name)
    mappings = {t: feed.registry_mapping(t) for t in fmt.identifier_types(feed)}
    hashed_types = sorted(t for t, m in mappings.items() if m.hash)
    try:
        parse_sql, parse_params = fmt.parse_query(text_path, file_name, feed, work_dir, received_at)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise FileRejected(f"{file_name}: cannot be read as text: {str(exc).splitlines()[0]}") from exc

    rules = feed.ids
    checks_sql = f"""
        SELECT p.* REPLACE (CASE WHEN list_contains($hashed_types, p.identifier_type) THEN lower(p.identifier)
                                 ELSE p.identifier END AS identifier),
               coalesce(
            p.reject_reason,
            CASE
                WHEN p.audience_key IS NULL OR trim(p.audience_key) = '' THEN 'missing_audience'
                WHEN regexp_matches(p.audience_key, $control_chars) THEN 'audience_name_control_character'
                WHEN length(p.audience_key) > $max_audience_name THEN 'audience_name_too_long'
                WHEN regexp_matches(p.identifier, $control_chars) THEN $r_control
                WHEN length(p.identifier) < $min_length THEN $r_too_short
                WHEN length(p.identifier) > $max_length THEN $r_too_long
                WHEN $pattern::VARCHAR IS NOT NULL AND NOT regexp_full_match(p.identifier, $pattern::VARCHAR)
                    THEN $r_pattern
            END) AS reason
        FROM ({parse_sql}) p
    """
    params = parse_params | {
        "control_chars": CONTROL_CHARACTERS, "r_control": REJECT_CONTROL,
        "min_length": rules.min_length, "r_too_short": REJECT_TOO_SHORT,
        "max_length": rules.max_length, "r_too_long": REJECT_TOO_LONG,
        "pattern": rules.pattern, "r_pattern": REJECT_PATTERN, "hashed_types": hashed_types,
        "max_audience_name": MAX_AUDIENCE_NAME,
    }
    registry_invalid = 0
    if users is not None:
        # lookups are built once per registry version, beside the work folders (the lake's staging)
        lookup_sql, lookup_params, registry_invalid = users.lookup_query(con, feed, mappings, work_dir.parent)
        columns = {d[0] for d in con.execute(f"SELECT * FROM ({parse_sql}) LIMIT 0", parse_params).description}
        resolved_sql, resolution_params = _resolution_sql(checks_sql, lookup_sql, feed, "candidates" in columns)
        params = params | lookup_params | resolution_params
    else:
        # a format whose identifiers have several types keeps the type in the user id (formats/__init__.py)
        user_id = fmt.user_id_sql(feed) if hasattr(fmt, "user_id_sql") else "identifier"
        resolved_sql = f"""
            SELECT c.*, CASE WHEN c.reason IS NULL THEN {user_id} END AS user_id, c.reason AS final_reason
            FROM ({checks_sql}) c
        """
    classified = f"""
        SELECT audience_key, identifier_type, identifier, user_id, action, expires_at, expires_in, data_bag,
               observed_at, warning, source_line::BIGINT AS source_line, final_reason AS reason, raw
        FROM ({resolved_sql})"""
    try:
        _split_rows(con, classified, params, rows_path, rejected_path, work_dir)
    except (duckdb.Error, OSError, pa.ArrowException) as exc:
        raise _parse_error(file_name, exc) from exc
    valid, warnings = con.execute("SELECT count(*), count(warning) FROM read_parquet(?)",
                                  [str(rows_path)]).fetchone()
    rejected, unmatched, ineligible, counted = con.execute(
        """SELECT count(*), count(*) FILTER (WHERE reason = ?), count(*) FILTER (WHERE reason = ?),
                  count(*) FILTER (WHERE NOT list_contains(?, reason))
           FROM read_parquet(?)""",
        [REJECT_UNMATCHED, REJECT_INELIGIBLE, list(NOT_COUNTED_REJECTS), str(rejected_path)],
    ).fetchone()
    resolved_by = {} if users is None else dict(con.execute(
        "SELECT identifier_type, count(*) FROM read_parquet(?) GROUP BY 1 ORDER BY 1", [str(rows_path)]).fetchall())
    total = valid + rejected
    examined = valid + counted
    named = {r[0] for r in con.execute("SELECT DISTINCT audience_key FROM read_parquet(?)",
                                       [str(rows_path)]).fetchall()}
    if hasattr(fmt, "file_audiences"):
        named.update(fmt.file_audiences(file_name, feed))
    audiences = tuple(sorted(named))
    if examined and counted / examined > feed.max_reject_ratio:
        examples = con.execute(
            """SELECT line_number, reason FROM read_parquet(?)
               WHERE NOT list_contains(?, reason) ORDER BY line_number LIMIT 3""",
            [str(rejected_path), list(NOT_COUNTED_REJECTS)],
        ).fetchall()
        shown = ", ".join(f"line {line}: {reason}" for line, reason in examples)
        raise FileRejected(
            f"{file_name}: {counted} of {examined} rows rejected ({counted / examined:.1%}), over the feed's "
            f"max_reject_ratio of {feed.max_reject_ratio:.1%} ({shown})"
        )
    if total == 0 or (valid == 0 and rejected == total and unmatched + ineligible == 0 and counted == 0):
        raise FileRejected(f"{file_name}: no identifiers (only blank lines)")
    check_canonical_contract(rows_path)
    return ValidationResult(
        rows_path=rows_path,
        rejected_path=rejected_path,
        rows_total=total,
        rows_valid=valid,
        rows_rejected=rejected,
        unmatched=unmatched,
        warnings=warnings,
        audiences=audiences,
        ineligible=ineligible,
        resolved_by=resolved_by,
        registry_invalid=registry_invalid,
    )
