"""Loymax target-audience files (seed 004): UTF-8, ``;``-separated, one customer per line.

Mode 1 (``mode: single``): one column of customer identifiers, all going to one audience, named by the
feed's ``audience`` or else the file name (without ``.csv``/``.txt``). Mode 2 (``mode: per_row``):
``identifier;audience name``. Whitespace around fields is trimmed and a trailing ``;`` is allowed (the
seed's mode-1 example ends its lines with one; the ``##`` around the examples is wiki markup, not data).
Loymax *assigns* audiences, so files add customers by default (``incremental``); ``action: remove`` files
take them out, and ``action: replace`` files are full lists of the audiences they name.

Loymax asks for the mode, the identifier type and the action on every upload, so a feed may name such choices
as ``profiles``; the ``feed`` given to these functions is then already the profile's options
(``FeedConfig.for_profile``), and nothing here needs to know which profile it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from audience_pipeline.formats.lines import NUMBERED_LINES, REPLACEMENT_CHARACTER, write_numbered_lines
from audience_pipeline.model import Semantics

NAME = "loymax"
SUFFIX = re.compile(r"\.(csv|txt)$", re.IGNORECASE)


def accepts(file_name: str, feed=None) -> bool:
    return bool(SUFFIX.search(file_name)) and len(SUFFIX.sub("", file_name)) > 0


def file_audiences(file_name: str, feed) -> list[str]:
    return [] if feed.mode == "per_row" else [feed.audience or SUFFIX.sub("", file_name)]


def semantics(feed) -> Semantics:
    return Semantics.REPLACE if feed.action == "replace" else Semantics.INCREMENTAL


def identifier_types(feed) -> list[str]:
    return [feed.identifier]


def decode(raw_path: Path, file_name: str, feed, work_dir: Path) -> Path:
    return raw_path


def parse_query(text_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    per_row = feed.mode == "per_row"
    sql = f"""
        WITH lines AS ({NUMBERED_LINES}),
        f AS (
            SELECT source_line, line, overflow, trim(coalesce(line, '')) AS l FROM lines
        ),
        fields AS (
            SELECT source_line, line, overflow, l,
                   trim(split_part(l, ';', 1), ' \t') AS f1,
                   trim(split_part(l, ';', 2), ' \t') AS f2,
                   trim(array_to_string(list_slice(string_split(l, ';'), 3, NULL), ';'), ' \t') AS rest
            FROM f
        )
        SELECT source_line, line AS raw,
               {"f2" if per_row else "$loymax_audience::VARCHAR"} AS audience_key,
               $loymax_identifier_type::VARCHAR AS identifier_type,
               f1 AS identifier,
               $loymax_action::VARCHAR AS action,
               NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
               NULL::VARCHAR AS data_bag,
               NULL::TIMESTAMPTZ AS observed_at,
               NULL::VARCHAR AS warning,
               CASE
                   WHEN l = '' THEN 'blank_line'
                   WHEN overflow IS NOT NULL THEN 'control_character'
                   WHEN contains(l, $loymax_replacement) THEN 'invalid_utf8'
                   WHEN f1 = '' THEN 'missing_identifier'
                   {"WHEN f2 = '' THEN 'missing_audience' WHEN rest <> '' THEN 'extra_column'" if per_row
                    else "WHEN f2 <> '' OR rest <> '' THEN 'extra_column'"}
               END AS reject_reason
        FROM fields
    """
    params = write_numbered_lines(text_path, work_dir / "lines.parquet") | {
        "loymax_identifier_type": feed.identifier,
        "loymax_action": "remove" if feed.action == "remove" else "add",
        "loymax_replacement": REPLACEMENT_CHARACTER,
    }
    if not per_row:
        params["loymax_audience"] = feed.audience or SUFFIX.sub("", file_name)
    return sql, params
