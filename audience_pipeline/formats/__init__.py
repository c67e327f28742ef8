"""Vendor formats. Each module turns one landed file into canonical rows (see audience_pipeline.model).

A format module provides:

- ``NAME``: the value of ``feeds.<feed>.format`` that selects it;
- ``accepts(file_name, feed) -> bool``: whether a landed object is a file of this format (others are ignored);
- ``semantics(feed) -> Semantics``: how the parsed rows apply to the audiences they name;
- optionally ``file_audiences(file_name, feed) -> list[str]``: audiences named by the file itself, which a
  full list with no valid row empties;
- optionally ``list_time_orders(feed) -> bool``: whether the rows' ``observed_at`` (newest per audience, kept
  as the version's ``list_time``) dates the list as a whole, so a list older than the applied one is stale
  and skipped; without it lists apply in arrival order;
- ``identifier_types(feed) -> list[str]``: the identifier types its rows can carry (registry resolution);
- ``decode(raw_path, file_name, feed, work_dir) -> Path``: the file as text (e.g. gunzipped, capped);
- ``parse_query(text_path, file_name, feed, work_dir, received_at) -> (sql, params)``: one DuckDB SELECT producing the
  parsed rows with the columns in ``PARSED_COLUMNS`` (``expires_at`` an instant, or ``expires_in`` seconds
  from the import's instant); a row the format itself cannot use carries a
  ``reject_reason``. It may write intermediate files into ``work_dir``. Its parameters are named
  (``$<format>_<name>``) so that queries can be nested without re-ordering. It may add the column
  ``candidates``, ``LIST(STRUCT(identifier_type VARCHAR, identifier VARCHAR))``: every identifier of the line in
  the format's priority order, for registry resolution; ``identifier_type``/``identifier`` are its first;
- optionally ``user_id_sql(feed) -> str``: a DuckDB expression over the columns ``identifier_type`` and
  ``identifier`` giving the user id when no registry is used (by default, the identifier); it must give
  distinct user ids to distinct (type, identifier) pairs.

Formats never touch storage or Dagster; the shared validator applies identifier rules, registry
resolution and the reject policy to whatever they produce.
"""

from __future__ import annotations

from types import ModuleType

from audience_pipeline.formats import attentive, loymax, mediarithmics, odp, repro
from audience_pipeline.formats.errors import FileRejected

PARSED_COLUMNS = (
    "source_line",
    "raw",
    "audience_key",
    "identifier_type",
    "identifier",
    "action",
    "expires_at",
    "expires_in",
    "data_bag",
    "observed_at",
    "warning",
    "reject_reason",
)

__all__ = ["FORMATS", "PARSED_COLUMNS", "FileRejected", "get_format"]

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (repro, odp, mediarithmics, attentive, loymax)}


def get_format(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(sorted(FORMATS))})") from None
