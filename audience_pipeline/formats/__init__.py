"""Vendor formats. Each module turns one landed file into canonical rows (see audience_pipeline.model).

A format module provides:

- ``NAME``: the value of ``feeds.<feed>.format`` that selects it;
- ``accepts(file_name) -> bool``: whether a landed object is a file of this format (others are ignored);
- ``semantics(feed) -> Semantics``: how the parsed rows apply to the audiences they name;
- ``parse_query(raw_path, file_name, feed, work_dir) -> (sql, params)``: one DuckDB SELECT producing the
  parsed rows with the columns in ``PARSED_COLUMNS``; a row the format itself cannot use carries a
  ``reject_reason``. It may write intermediate files into ``work_dir``. Its parameters are named
  (``$<format>_<name>``) so that queries can be nested without re-ordering.

Formats never touch storage or Dagster; the shared validator applies identifier rules, registry
resolution and the reject policy to whatever they produce.
"""

from __future__ import annotations

from types import ModuleType

from audience_pipeline.formats import repro

PARSED_COLUMNS = (
    "source_line",
    "raw",
    "audience_key",
    "identifier_type",
    "identifier",
    "action",
    "expires_at",
    "data_bag",
    "reject_reason",
)

FORMATS: dict[str, ModuleType] = {repro.NAME: repro}


class FileRejected(Exception):
    """The file as a whole cannot be imported; the message says which file, where and why."""


def get_format(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(sorted(FORMATS))})") from None
