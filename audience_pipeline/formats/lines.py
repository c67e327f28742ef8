"""Reading a text file as numbered physical lines, shared by the line-oriented formats.

DuckDB's CSV reader drops blank lines from single-column files, which would shift every line number
after them, so lines are split by polars' streaming CSV reader instead and handed to DuckDB as Parquet.
With no quoting and a control character as separator, polars yields one row per physical line: blank
lines stay (as NULL), LF and CRLF both end a line, a leading UTF-8 BOM is dropped, invalid UTF-8 becomes
U+FFFD (rejected per line rather than failing the file), and a line containing the separator spills
into ``overflow``, which callers treat as a control character.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

LINES_SEPARATOR = "\x01"
REPLACEMENT_CHARACTER = "\ufffd"

NUMBERED_LINES = "SELECT source_line, line, overflow FROM read_parquet($lines_path)"


def write_numbered_lines(raw_path: Path, dest: Path) -> dict:
    """Split ``raw_path`` into (source_line, line, overflow) rows in ``dest``; returns query params."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    (
        pl.scan_csv(
            raw_path,
            has_header=False,
            separator=LINES_SEPARATOR,
            quote_char=None,
            schema={"line": pl.String, "overflow": pl.String},
            missing_columns="insert",
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )
        .with_row_index("source_line", offset=1)
        .with_columns(pl.col("source_line").cast(pl.Int64))
        .sink_parquet(dest, compression="lz4")
    )
    return {"lines_path": str(dest)}


def write_csv_records(text_path: Path, dest: Path) -> tuple[dict, list[str]]:
    """A CSV file with a header row as Parquet records: every field a string (names trimmed), plus
    ``source_line`` (the header is line 1; blank lines keep their number as all-null rows), ``raw`` (the
    fields joined by commas, for rejected rows) and ``all_null``. A quoted field spanning several lines
    shifts the numbers after it, as it would in any CSV reader that counts records."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scan = pl.scan_csv(text_path, has_header=True, infer_schema=False, truncate_ragged_lines=True,
                       encoding="utf8-lossy")
    names = list(scan.collect_schema().names())
    columns = [n.strip() for n in names]
    fields = [pl.col(c) for c in columns]
    (
        scan.rename(dict(zip(names, columns, strict=True)))
        .with_row_index("source_line", offset=2)
        .with_columns(
            pl.col("source_line").cast(pl.Int64),
            pl.concat_str([f.fill_null("") for f in fields], separator=",").alias("raw"),
            pl.all_horizontal([f.is_null() for f in fields]).alias("all_null"),
        )
        .sink_parquet(dest, compression="lz4")
    )
    return {"records_path": str(dest)}, columns
