"""Repro audience import files (seed 000): one user ID per line, no header, UTF-8, ``.csv``.

The file name without ``.csv`` is the audience name, and each file is the complete list of its audience,
so it replaces the list currently applied. Leading and trailing spaces and tabs around an ID are trimmed;
a comma means a second column, which an ID file cannot have.
"""

from __future__ import annotations

from pathlib import Path

from audience_pipeline.formats.lines import NUMBERED_LINES, REPLACEMENT_CHARACTER, write_numbered_lines
from audience_pipeline.model import REJECT_BLANK, REJECT_CONTROL, REJECT_ENCODING, REJECT_SEPARATOR, Semantics

NAME = "repro"
SUFFIX = ".csv"


def accepts(file_name: str, feed=None) -> bool:
    return file_name.lower().endswith(SUFFIX) and len(file_name) > len(SUFFIX)


def audience_name(file_name: str) -> str:
    return file_name[: -len(SUFFIX)] if accepts(file_name) else file_name


def file_audiences(file_name: str, feed) -> list[str]:
    """The audience the file names even when none of its rows is valid (then it empties the audience)."""
    return [audience_name(file_name)]


def semantics(feed) -> Semantics:
    return Semantics.REPLACE


def identifier_types(feed) -> list[str]:
    return [feed.identifier]


def decode(raw_path: Path, file_name: str, feed, work_dir: Path) -> Path:
    return raw_path


def parse_query(raw_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    sql = f"""
        WITH lines AS ({NUMBERED_LINES}),
        trimmed AS (
            -- trim() with a character list costs 5x a prefix test on 16M lines; most IDs need no trimming
            SELECT source_line, line, overflow,
                   CASE WHEN line IS NULL THEN ''
                        WHEN starts_with(line, ' ') OR starts_with(line, '\t') OR ends_with(line, ' ')
                             OR ends_with(line, '\t') THEN trim(line, ' \t')
                        ELSE line END AS value
            FROM lines
        )
        SELECT
            source_line,
            line AS raw,
            $repro_audience::VARCHAR AS audience_key,
            $repro_identifier_type::VARCHAR AS identifier_type,
            value AS identifier,
            'add' AS action,
            NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
            NULL::VARCHAR AS data_bag,
            NULL::TIMESTAMPTZ AS observed_at,
            NULL::VARCHAR AS warning,
            CASE
                WHEN overflow IS NOT NULL THEN $repro_control
                WHEN contains(value, $repro_replacement) THEN $repro_encoding
                WHEN value = '' THEN $repro_blank
                WHEN contains(value, ',') THEN $repro_separator
            END AS reject_reason
        FROM trimmed
    """
    params = write_numbered_lines(raw_path, work_dir / "lines.parquet") | {
        "repro_replacement": REPLACEMENT_CHARACTER,
        "repro_encoding": REJECT_ENCODING,
        "repro_audience": audience_name(file_name),
        "repro_identifier_type": feed.identifier,
        "repro_control": REJECT_CONTROL,
        "repro_blank": REJECT_BLANK,
        "repro_separator": REJECT_SEPARATOR,
    }
    return sql, params
