"""mediarithmics user-segment commands (seed 002): NDJSON or CSV, one command per line.

Each command adds (``UPDATE``) or removes (``DELETE``) one user in one segment, applied in line order
(``incremental``). The user is the first identifier present in the order ``user_account_id`` (qualified by
``compartment_id`` when given, as ``<compartment_id>:<user_account_id>``), ``email_hash``, ``user_agent_id``;
the audience is ``segment_technical_name`` when present, else ``segment_id``.

Expiry: ``expiration_ts`` is epoch **milliseconds**, the unit of every timestamp in the mediarithmics API; a
value below 10^11 (a date before 1973 in ms, but a plausible epoch *seconds* value) is rejected as
``expiration_ts_unit`` rather than silently expiring the membership in 1970. A non-zero ``expiration_ts``
wins over ``expiration_duration`` (it is the explicit instant); ``expiration_duration`` counts minutes from
the import's instant (chosen once when it is applied, so a re-run computes the same expiry); 0 in either
means never.
The CSV form has a header row with the field names of the NDJSON form, in any order.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from audience_pipeline.formats.errors import FileRejected
from audience_pipeline.formats.lines import (
    NUMBERED_LINES,
    REPLACEMENT_CHARACTER,
    write_csv_records,
    write_numbered_lines,
)
from audience_pipeline.model import Semantics
from audience_pipeline.sql import quote_identifier

NAME = "mediarithmics"
FIELDS = (
    "operation", "compartment_id", "user_account_id", "email_hash", "user_agent_id", "segment_id",
    "segment_technical_name", "expiration_duration", "expiration_ts", "data_bag",
)
IDENTIFIER_TYPES = ["user_account_id", "email_hash", "user_agent_id"]
MIN_MILLISECONDS = 100_000_000_000


def _kind(file_name: str, feed) -> str | None:
    if feed is not None and feed.file_type != "auto":
        return feed.file_type
    lower = file_name.lower()
    return "ndjson" if lower.endswith(".ndjson") else "csv" if lower.endswith(".csv") else None


def accepts(file_name: str, feed) -> bool:
    return _kind(file_name, feed) is not None


def semantics(feed) -> Semantics:
    return Semantics.INCREMENTAL


def identifier_types(feed) -> list[str]:
    return IDENTIFIER_TYPES


def decode(raw_path: Path, file_name: str, feed, work_dir: Path) -> Path:
    return raw_path


# Shared by both forms: ``src`` yields one row per line with every field as text (NULL when absent),
# plus source_line, raw and blank.
COMMANDS = """
    WITH src AS ({source}),
    f AS (
        SELECT source_line, raw, blank, bad_json,
               upper(trim(operation)) AS op,
               nullif(trim(compartment_id), '') AS compartment_id,
               nullif(trim(user_account_id), '') AS user_account_id,
               nullif(trim(email_hash), '') AS email_hash,
               nullif(trim(user_agent_id), '') AS user_agent_id,
               nullif(trim(segment_technical_name), '') AS segment_name,
               nullif(trim(segment_id), '') AS segment_id,
               TRY_CAST(trim(expiration_duration) AS BIGINT) AS duration,
               trim(expiration_duration) AS duration_text,
               TRY_CAST(trim(expiration_ts) AS BIGINT) AS expiry_ms,
               nullif(trim(expiration_ts), '') AS expiry_text,
               nullif(data_bag, '') AS data_bag
        FROM src
    )
    SELECT source_line, raw,
           coalesce(segment_name, segment_id) AS audience_key,
           CASE WHEN user_account_id IS NOT NULL THEN 'user_account_id'
                WHEN email_hash IS NOT NULL THEN 'email_hash' ELSE 'user_agent_id' END AS identifier_type,
           CASE WHEN user_account_id IS NOT NULL
                THEN coalesce(compartment_id || ':', '') || user_account_id
                ELSE coalesce(email_hash, user_agent_id) END AS identifier,
           CASE op WHEN 'DELETE' THEN 'remove' ELSE 'add' END AS action,
           CASE WHEN expiry_ms > 0 THEN make_timestamptz(expiry_ms * 1000) END AS expires_at,
           -- a duration counts from the import's instant, chosen when the import is applied (importer)
           CASE WHEN coalesce(expiry_ms, 0) <= 0 AND duration > 0 THEN duration * 60 END AS expires_in,
           data_bag,
           NULL::TIMESTAMPTZ AS observed_at,
           NULL::VARCHAR AS warning,
           CASE
               WHEN blank THEN 'blank_line'
               WHEN bad_json THEN 'invalid_json'
               WHEN contains(raw, $mics_replacement) THEN 'invalid_utf8'
               WHEN op IS NULL OR op NOT IN ('UPDATE', 'DELETE') THEN 'invalid_operation'
               WHEN duration_text IS NULL OR duration_text = '' THEN 'missing_expiration_duration'
               WHEN duration IS NULL OR duration < 0 THEN 'invalid_expiration_duration'
               WHEN expiry_text IS NOT NULL AND (expiry_ms IS NULL OR expiry_ms < 0) THEN 'invalid_expiration_ts'
               WHEN expiry_ms > 0 AND expiry_ms < $mics_min_ms THEN 'expiration_ts_unit'
               WHEN coalesce(user_account_id, email_hash, user_agent_id) IS NULL THEN 'missing_identifier'
               WHEN coalesce(segment_name, segment_id) IS NULL THEN 'missing_segment'
               WHEN data_bag IS NOT NULL AND NOT coalesce(json_valid(data_bag), false) THEN 'invalid_data_bag'
           END AS reject_reason
    FROM f
"""


def _ndjson_source() -> str:
    # Each line is parsed on its own, so one broken line is one rejected row, not a failed file. A field
    # may be a JSON string or a bare number; data_bag is an escaped JSON string (an object is accepted too).
    fields = ",\n".join(f"CASE WHEN ok THEN j->>'{f}' END AS {quote_identifier(f)}" for f in FIELDS)
    return f"""
        SELECT source_line, line AS raw, line IS NULL OR trim(line) = '' AS blank,
               NOT (line IS NULL OR trim(line) = '') AND NOT ok AS bad_json, {fields}
        FROM (SELECT *, CASE WHEN ok THEN line::JSON END AS j
              FROM (SELECT source_line, line, overflow,
                           overflow IS NULL AND coalesce(json_valid(line), false)
                               AND starts_with(ltrim(line), '{{') AS ok
                    FROM ({NUMBERED_LINES})))
    """


def _csv_source(columns: list[str]) -> str:
    fields = ",\n".join(
        (quote_identifier(f) if f in columns else "NULL::VARCHAR") + f" AS {quote_identifier(f)}" for f in FIELDS
    )
    return f"""SELECT source_line, raw, all_null AS blank, false AS bad_json, {fields}
               FROM read_parquet($records_path)"""


def parse_query(text_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    kind = _kind(file_name, feed)
    params = {"mics_replacement": REPLACEMENT_CHARACTER, "mics_min_ms": MIN_MILLISECONDS}
    if kind == "ndjson":
        with open(text_path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            raise FileRejected(f"{file_name}: a JSON array, not NDJSON: mediarithmics segment files hold one "
                               "JSON object per line, not separated by commas")
        params |= write_numbered_lines(text_path, work_dir / "lines.parquet")
        return COMMANDS.format(source=_ndjson_source()), params
    try:
        records, columns = write_csv_records(text_path, work_dir / "records.parquet")
    except pl.exceptions.PolarsError as exc:
        raise FileRejected(f"{file_name}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in ("operation", "expiration_duration") if c not in columns]
    if missing:
        raise FileRejected(f"{file_name}: header (line 1) lacks the column(s) {', '.join(missing)}")
    return COMMANDS.format(source=_csv_source(columns)), params | records
