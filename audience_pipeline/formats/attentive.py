"""Attentive + Amperity subscriber segment files (seed 003), delivered over SFTP once a day.

``{customerdomain}_subscriber_segment_{YYYYMMDD}[_{n}].csv``; no header; each row a subscriber (phone or
e-mail, as the feed says) and a segment name. The seed writes both ``1234567890, segment 1`` and
``1234567890 segment 1``: the separator is a comma with optional spaces, or else the first run of
whitespace (segment names contain spaces). The files of one date are together the full list of every
segment they name: a segment's list is the union of the latest delivery of each part of its newest date (a
re-upload of a part replaces that part's rows), a newer date replaces it, an older date is stale.

Phones become E.164 by ``phones.e164_sql`` for the feed's ``default_region`` (any region), inside DuckDB:
phonenumbers' possible-number rules, except country code 1, read by its digits so that the vendor's
accepted spellings (``1234567890``, ``123-456-7890``, ``1123-456-7890``, ``11234567890``) are one subscriber
although phonenumbers calls 123 no assignable area code. A number that is possible but not a valid
assignment is accepted and counted as a warning (``not_a_valid_number``); what cannot be a phone is
rejected as ``invalid_phone: <problem>``, the problem one of ``phones.PROBLEMS``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from audience_pipeline import phones
from audience_pipeline.formats.errors import FileRejected
from audience_pipeline.formats.lines import NUMBERED_LINES, REPLACEMENT_CHARACTER, write_numbered_lines
from audience_pipeline.model import REJECT_INVALID_PHONE, Semantics

NAME = "attentive"
# Letters, digits, spaces, '_' and '-': the seed forbids "special characters" without listing them.
SEGMENT_PATTERN = r"[A-Za-z0-9 _-]+"
SEGMENT_MAX = 64
EMAIL_PATTERN = r"[^@\s]+@[^@\s]+\.[^@\s]+"


def file_pattern(domain: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(domain)}_subscriber_segment_(\d{{8}})(?:_(\d+))?\.csv$")


def group_name(file_name: str, feed) -> str | None:
    """The name of the list a part belongs to (parts of one date form one list), or None."""
    match = file_pattern(feed.customer_domain).match(file_name)
    return f"{feed.customer_domain}_subscriber_segment_{match.group(1)}.csv" if match else None


def accepts(file_name: str, feed=None) -> bool:
    # every .csv is taken, so a misnamed delivery is refused with its reason in the activity log
    return file_name.lower().endswith(".csv")


def semantics(feed) -> Semantics:
    return Semantics.REPLACE


# A list is made of the parts of its date, each as last delivered (see ImportService._with_other_parts).
UNION_SAME_LIST_TIME = True


def list_time_orders(feed) -> bool:
    """The date in the file name is the list's date: an older date than the applied one is stale."""
    return True


def identifier_types(feed) -> list[str]:
    return [feed.subscriber_type]


def decode(raw_path: Path, file_name: str, feed, work_dir: Path) -> Path:
    return raw_path


def list_date(file_name: str, feed) -> datetime:
    match = file_pattern(feed.customer_domain).match(file_name)
    if not match:
        raise FileRejected(f"{file_name}: not an Attentive segment file name "
                           f"({feed.customer_domain}_subscriber_segment_YYYYMMDD[_n].csv)")
    try:
        return datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        raise FileRejected(f"{file_name}: {match.group(1)} is not a real date (YYYYMMDD)") from None


SPLIT = """
    WITH lines AS ({lines}),
    t AS (SELECT source_line, line, overflow, trim(coalesce(line, '')) AS l FROM lines)
    SELECT source_line, line, overflow, l,
           CASE WHEN contains(l, ',') THEN trim(split_part(l, ',', 1))
                ELSE regexp_extract(l, '^(\\S+)', 1) END AS ident,
           CASE WHEN contains(l, ',') THEN trim(substr(l, strpos(l, ',') + 1))
                ELSE trim(regexp_extract(l, '^\\S+\\s+(.*)$', 1)) END AS segment,
           regexp_replace(CASE WHEN contains(l, ',') THEN trim(split_part(l, ',', 1))
                               ELSE regexp_extract(l, '^(\\S+)', 1) END, '[\\s().-]', '', 'g') AS digits
    FROM t
"""


def parse_query(text_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    listed = list_date(file_name, feed)
    params = write_numbered_lines(text_path, work_dir / "lines.parquet")
    split_sql = SPLIT.format(lines=NUMBERED_LINES)
    con = duckdb.connect(":memory:")
    try:
        email_line, phone_line = con.execute(
            f"""SELECT min(source_line) FILTER (WHERE contains(ident, '@')),
                       min(source_line) FILTER (WHERE regexp_full_match(digits, '\\+?[0-9]{{7,}}'))
                FROM ({split_sql})""", params).fetchone()
        if email_line is not None and phone_line is not None:
            raise FileRejected(f"{file_name}: mixes phone numbers (line {phone_line}) and e-mail addresses "
                               f"(line {email_line}); a file holds one kind only")
        common = params | {
            "att_type": feed.subscriber_type, "att_listed": listed, "att_segment_max": SEGMENT_MAX,
            "att_segment_pattern": SEGMENT_PATTERN, "att_replacement": REPLACEMENT_CHARACTER,
        }
        if feed.subscriber_type == "email":
            return EMAIL_SQL.format(split=split_sql), common | {"att_email": EMAIL_PATTERN}
    finally:
        con.close()
    try:
        phone_sql, phone_params = phones.e164_sql("ident", feed.default_region)
    except ValueError as exc:
        raise FileRejected(f"{file_name}: the feed's default_region: {exc}") from None
    return PHONE_SQL.format(split=split_sql, phone=phone_sql), common | phone_params | {
        "att_invalid_phone": REJECT_INVALID_PHONE + ": "}


SEGMENT_CHECKS = """
               WHEN segment = '' THEN 'missing_segment'
               WHEN length(segment) > $att_segment_max THEN 'segment_name_too_long'
               WHEN NOT regexp_full_match(segment, $att_segment_pattern) THEN 'segment_name_characters'
"""

EMAIL_SQL = """
    WITH s AS ({split})
    SELECT source_line, line AS raw, segment AS audience_key, $att_type::VARCHAR AS identifier_type,
           lower(ident) AS identifier, 'add' AS action, NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
           NULL::VARCHAR AS data_bag,
           $att_listed::TIMESTAMPTZ AS observed_at, NULL::VARCHAR AS warning,
           CASE
               WHEN l = '' THEN 'blank_line'
               WHEN overflow IS NOT NULL THEN 'control_character'
               WHEN contains(l, $att_replacement) THEN 'invalid_utf8'
               WHEN NOT regexp_full_match(ident, $att_email) THEN 'invalid_email'
""" + SEGMENT_CHECKS + """
           END AS reject_reason
    FROM s
"""

# phones.e164_sql reads the number (see there); a number it cannot read is rejected with its problem.
PHONE_SQL = r"""
    WITH s AS ({split}),
    n AS (SELECT s.*, {phone} AS phone FROM s)
    SELECT source_line, line AS raw, segment AS audience_key, $att_type::VARCHAR AS identifier_type,
           phone.e164 AS identifier, 'add' AS action, NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
           NULL::VARCHAR AS data_bag,
           $att_listed::TIMESTAMPTZ AS observed_at,
           CASE WHEN NOT phone.valid THEN 'not_a_valid_number' END AS warning,
           CASE
               WHEN l = '' THEN 'blank_line'
               WHEN overflow IS NOT NULL THEN 'control_character'
               WHEN contains(l, $att_replacement) THEN 'invalid_utf8'
               WHEN ident = '' THEN 'missing_identifier'
               WHEN phone.problem IS NOT NULL THEN $att_invalid_phone || phone.problem
""" + SEGMENT_CHECKS + """
           END AS reject_reason
    FROM n
"""
