r"""mediarithmics user-segment commands (seed 002): NDJSON or CSV, one command per line.

Each command adds (``UPDATE``) or removes (``DELETE``) one user in one segment, applied in line order
(``incremental``).

The user: every identifier present on the line, in the order ``user_account_id`` (qualified by
``compartment_id`` when given, as ``<compartment_id>:<user_account_id>``), ``email_hash``, ``user_agent_id``,
is a registry candidate (``candidates``); the first is ``identifier_type``/``identifier``. Without a users
registry the user id keeps the type (``user_id_sql``): the feed's ``primary_identifier_type`` (default
``user_account_id``) is bare, any other type is ``<type>:<value>``, and a bare value that could be read as
one of those (it starts with ``<a type name>:`` or with the escape ``\``) gets a ``\`` in front. A user id
starting with ``\`` is a bare value, one starting with ``<a type name>:`` is that type, anything else is
bare, so no two (type, value) pairs give one user id, a compartment named like a type included.

The segment: with the feed's ``segments:`` map (``segment_id,technical_name``, CSV or Parquet, one name per
id and one id per name), a line naming a segment by id, by technical name or by both resolves to the audience
named by its technical name; an id and a name that the map does not pair are ``segment_mismatch``. A name is
the audience as written; an id the map does not know (or any id without a map) is the audience
``segment_id:<id>``, never merged with a technical name, and a technical name starting with ``segment_id:``
is rejected (``segment_name_reserved``) so that it cannot pass for one.

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
from audience_pipeline.sql import quote_identifier, quote_literal

NAME = "mediarithmics"
FIELDS = (
    "operation", "compartment_id", "user_account_id", "email_hash", "user_agent_id", "segment_id",
    "segment_technical_name", "expiration_duration", "expiration_ts", "data_bag",
)
IDENTIFIER_TYPES = ["user_account_id", "email_hash", "user_agent_id"]
MIN_MILLISECONDS = 100_000_000_000
# An audience named by a segment id the segments map does not know; technical names may not start so.
SEGMENT_ID_PREFIX = "segment_id:"
# Marks a bare (primary-type) user id that would otherwise read as "<type>:..." or as escaped.
USER_ID_ESCAPE = "\\"
MAP_COLUMNS = ("segment_id", "technical_name")
NO_SEGMENTS = "SELECT NULL::VARCHAR AS map_id, NULL::VARCHAR AS map_name LIMIT 0"
SEGMENTS = "SELECT segment_id AS map_id, technical_name AS map_name FROM read_parquet($mics_segments_path)"


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


def user_id_sql(feed) -> str:
    """The user id of a row when no registry is used: the identifier, with its type unless it is the
    feed's primary type (see the module docstring for why this is collision-free)."""
    escape = quote_literal(USER_ID_ESCAPE)
    ambiguous = " OR ".join(f"starts_with(identifier, {quote_literal(p)})"
                            for p in (USER_ID_ESCAPE, *(f"{t}:" for t in IDENTIFIER_TYPES)))
    return f"""CASE WHEN identifier_type = {quote_literal(feed.primary_identifier_type)}
                    THEN CASE WHEN {ambiguous} THEN {escape} || identifier ELSE identifier END
                    ELSE identifier_type || ':' || identifier END"""


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
    ),
    seg AS ({segments}),
    -- the map pairs each id with one name and each name with one id, so neither join adds rows
    r AS (
        SELECT f.*, by_id.map_name AS id_name, by_name.map_id AS name_id,
               coalesce(f.compartment_id || ':', '') || f.user_account_id AS account
        FROM f
        LEFT JOIN seg by_id ON by_id.map_id = f.segment_id
        LEFT JOIN seg by_name ON by_name.map_name = f.segment_name
    )
    SELECT source_line, raw,
           coalesce(segment_name, id_name, $mics_id_prefix || segment_id) AS audience_key,
           CASE WHEN account IS NOT NULL THEN 'user_account_id'
                WHEN email_hash IS NOT NULL THEN 'email_hash' ELSE 'user_agent_id' END AS identifier_type,
           coalesce(account, email_hash, user_agent_id) AS identifier,
           list_filter([
               CASE WHEN account IS NOT NULL
                    THEN struct_pack(identifier_type := 'user_account_id', identifier := account) END,
               CASE WHEN email_hash IS NOT NULL
                    THEN struct_pack(identifier_type := 'email_hash', identifier := email_hash) END,
               CASE WHEN user_agent_id IS NOT NULL
                    THEN struct_pack(identifier_type := 'user_agent_id', identifier := user_agent_id) END
           ], lambda c: c IS NOT NULL) AS candidates,
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
               WHEN starts_with(segment_name, $mics_id_prefix) THEN 'segment_name_reserved'
               WHEN (id_name IS NOT NULL AND id_name IS DISTINCT FROM segment_name AND segment_name IS NOT NULL)
                    OR (name_id IS NOT NULL AND name_id IS DISTINCT FROM segment_id AND segment_id IS NOT NULL)
                   THEN 'segment_mismatch'
               WHEN data_bag IS NOT NULL AND NOT coalesce(json_valid(data_bag), false) THEN 'invalid_data_bag'
           END AS reject_reason
    FROM r
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


def _segment_map(feed, file_name: str, work_dir: Path) -> Path:
    """The feed's segments map, checked, as distinct (segment_id, technical_name) pairs in Parquet.

    A map that cannot be trusted refuses the file: resolving segments through it would misfile commands."""
    path = Path(feed.segments)
    where = f"{file_name}: the segments map {path}"
    parquet = path.suffix.lower() == ".parquet"
    try:
        frame = pl.read_parquet(path) if parquet else pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise FileRejected(f"{where} cannot be read: {str(exc).splitlines()[0]}") from None
    frame = frame.rename({c: c.strip() for c in frame.columns})
    missing = [c for c in MAP_COLUMNS if c not in frame.columns]
    if missing:
        raise FileRejected(f"{where} lacks the column(s) {', '.join(missing)} (it has: {', '.join(frame.columns)})")
    # line numbers count the CSV header as line 1; a Parquet map has rows, numbered from 1
    unit, first = ("row", 1) if parquet else ("line", 2)
    try:
        frame = frame.select(
            (pl.int_range(pl.len()) + first).alias("at"),
            *(pl.col(c).cast(pl.String).str.strip_chars().replace("", None).alias(c) for c in MAP_COLUMNS),
        )
    except pl.exceptions.PolarsError as exc:
        raise FileRejected(f"{where}: its columns cannot be read as text: {str(exc).splitlines()[0]}") from None
    for column in MAP_COLUMNS:
        empty = frame.filter(pl.col(column).is_null())
        if empty.height:
            raise FileRejected(f"{where}, {unit} {empty['at'][0]}: no {column}")
    reserved = frame.filter(pl.col("technical_name").str.starts_with(SEGMENT_ID_PREFIX))
    if reserved.height:
        raise FileRejected(f"{where}, {unit} {reserved['at'][0]}: technical_name {reserved['technical_name'][0]!r} "
                           f"starts with {SEGMENT_ID_PREFIX!r}, which names segments known only by id")
    pairs = frame.unique(list(MAP_COLUMNS), keep="first", maintain_order=True)
    for key, other in (MAP_COLUMNS, MAP_COLUMNS[::-1]):
        clash = pairs.filter(pl.len().over(key) > 1)
        if clash.height:
            value = clash[key][0]
            (at1, v1), (at2, v2) = clash.filter(pl.col(key) == value).select("at", other).rows()[:2]
            raise FileRejected(f"{where}: {key} {value!r} has two {other}s, {v1!r} ({unit} {at1}) and {v2!r} "
                               f"({unit} {at2})")
    dest = work_dir / "segments.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    pairs.select(MAP_COLUMNS).write_parquet(dest)
    return dest


def parse_query(text_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    kind = _kind(file_name, feed)
    params = {"mics_replacement": REPLACEMENT_CHARACTER, "mics_min_ms": MIN_MILLISECONDS,
              "mics_id_prefix": SEGMENT_ID_PREFIX}
    segments = NO_SEGMENTS
    if feed.segments:
        params["mics_segments_path"] = str(_segment_map(feed, file_name, work_dir))
        segments = SEGMENTS
    if kind == "ndjson":
        with open(text_path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            raise FileRejected(f"{file_name}: a JSON array, not NDJSON: mediarithmics segment files hold one "
                               "JSON object per line, not separated by commas")
        params |= write_numbered_lines(text_path, work_dir / "lines.parquet")
        return COMMANDS.format(source=_ndjson_source(), segments=segments), params
    try:
        records, columns = write_csv_records(text_path, work_dir / "records.parquet")
    except pl.exceptions.PolarsError as exc:
        raise FileRejected(f"{file_name}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in ("operation", "expiration_duration") if c not in columns]
    if missing:
        raise FileRejected(f"{file_name}: header (line 1) lacks the column(s) {', '.join(missing)}")
    return COMMANDS.format(source=_csv_source(columns), segments=segments), params | records
