"""Attentive + Amperity subscriber segment files (seed 003), delivered over SFTP once a day.

``{customerdomain}_subscriber_segment_{YYYYMMDD}[_{n}].csv``; no header; each row a subscriber (phone or
e-mail, as the feed says) and a segment name. The seed writes both ``1234567890, segment 1`` and
``1234567890 segment 1``: the separator is a comma with optional spaces, or else the first run of
whitespace (segment names contain spaces). The files of one date are together the full list of every
segment they name: a segment's list is the union of the latest delivery of each part of its newest date (a
re-upload of a part replaces that part's rows), a newer date replaces it, an older date is stale.

Phones become E.164. The vendor's accepted spellings (``1234567890``, ``123-456-7890``, ``1123-456-7890``,
``11234567890``) fail phonenumbers' strict validity (123 is not an assignable US area code) and two of them
format wrongly there, so numbers without ``+`` are normalized by their digits for the default region
(national length -> country code + digits; country code + national length -> + digits), and phonenumbers
handles ``+`` numbers and other regions, once per distinct value. A number that is not a valid
assignment is accepted and counted as a warning; only what cannot be a phone at all is rejected.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import phonenumbers

from audience_pipeline.duck import copy_to_parquet
from audience_pipeline.formats.errors import FileRejected
from audience_pipeline.formats.lines import NUMBERED_LINES, REPLACEMENT_CHARACTER, write_numbered_lines
from audience_pipeline.model import Semantics

NAME = "attentive"
# Letters, digits, spaces, '_' and '-': the seed forbids "special characters" without listing them.
SEGMENT_PATTERN = r"[A-Za-z0-9 _-]+"
SEGMENT_MAX = 64
EMAIL_PATTERN = r"[^@\s]+@[^@\s]+\.[^@\s]+"
# National significant number lengths where phonenumbers knows a single fixed length.
NATIONAL_DIGITS = {"US": 10, "CA": 10, "GB": 10, "FR": 9, "DE": 11, "ES": 9, "IT": 10, "AU": 9}


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


def _plus_numbers(con: duckdb.DuckDBPyConnection, split_sql: str, params: dict, region: str,
                  digit_rule: bool) -> None:
    """Register ``phone_map(ident, e164, valid)`` for every distinct spelling the digit rule does not cover
    (``+`` numbers, or every number in a region without a fixed national length), through phonenumbers."""
    condition = "starts_with(ident, '+')" if digit_rule else "true"
    values = [r[0] for r in con.execute(
        f"""SELECT DISTINCT ident FROM ({split_sql})
            WHERE ident <> '' AND NOT contains(ident, '@') AND {condition}""", params).fetchall()]
    mapped = []
    for value in values:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            mapped.append((value, None, None))
            continue
        mapped.append((value, phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
                       phonenumbers.is_valid_number(number)))
    con.execute("CREATE OR REPLACE TEMP TABLE phone_map (ident VARCHAR, e164 VARCHAR, valid BOOLEAN)")
    if mapped:
        con.executemany("INSERT INTO phone_map VALUES (?, ?, ?)", mapped)


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
        region = feed.default_region.upper()
        national = NATIONAL_DIGITS.get(region)
        _plus_numbers(con, split_sql, params, region, national is not None)
        map_path = work_dir / "phone_map.parquet"
        copy_to_parquet(con, "SELECT * FROM phone_map", [], map_path)
    finally:
        con.close()
    country = str(phonenumbers.country_code_for_region(region))
    return PHONE_SQL.format(split=split_sql), common | {
        "att_map": str(map_path), "att_cc": country, "att_national": national or -1,
        "att_nanp": country == "1",
    }


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

# Without '+', a number is its digits for the default region: the national length gets the country code,
# the country code plus the national length gets a '+'. For +1 (NANP) validity is area code and exchange
# starting 2-9; elsewhere phonenumbers decides (for the distinct '+' spellings it parsed).
PHONE_SQL = r"""
    WITH s AS ({split}),
    n AS (
        SELECT s.*, m.e164 AS mapped, m.valid AS mapped_valid,
               CASE WHEN m.ident IS NOT NULL THEN m.e164
                    WHEN NOT regexp_full_match(digits, '[0-9]+') THEN NULL
                    WHEN length(digits) = $att_national THEN '+' || $att_cc || digits
                    WHEN length(digits) = $att_national + length($att_cc) AND starts_with(digits, $att_cc)
                        THEN '+' || digits
               END AS e164
        FROM s LEFT JOIN read_parquet($att_map) m ON m.ident = s.ident
    )
    SELECT source_line, line AS raw, segment AS audience_key, $att_type::VARCHAR AS identifier_type,
           e164 AS identifier, 'add' AS action, NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
           NULL::VARCHAR AS data_bag,
           $att_listed::TIMESTAMPTZ AS observed_at,
           CASE WHEN e164 IS NOT NULL AND NOT coalesce(
                    mapped_valid,
                    CASE WHEN $att_nanp THEN regexp_full_match(e164, '\+1[2-9][0-9]{{2}}[2-9][0-9]{{6}}') END,
                    true)
                THEN 'not_a_valid_number' END AS warning,
           CASE
               WHEN l = '' THEN 'blank_line'
               WHEN overflow IS NOT NULL THEN 'control_character'
               WHEN contains(l, $att_replacement) THEN 'invalid_utf8'
               WHEN ident = '' THEN 'missing_identifier'
               WHEN regexp_matches(ident, '[A-Za-z]') THEN 'not_a_phone'
               WHEN e164 IS NULL THEN 'phone_length'
""" + SEGMENT_CHECKS + """
           END AS reject_reason
    FROM n
"""
