"""Optimizely Data Platform audience imports without disqualify events (seed 001).

``<audience_id>.csv.gz``: a gzip CSV with a header holding ``type``, ``action``, ``audience_id``, ``ts`` and
the feed's one high-confidence identifier field (``id_field``), in any column order. The file is the
complete current list of its audience (``replace``): users of the previous list absent from it are
disqualified. ``action=qualify`` rows make the list; a ``disqualify`` row removes its user explicitly; any
other action, a ``type`` other than ``passthrough`` and a row for another audience are rejected per row.
``ts`` (epoch seconds) is each row's event time: the seed never defines it, and its example uses one value
for the whole file, so it is no clock of the list. Lists apply in arrival order, as Repro's do; the newest
``ts`` is kept as the version's ``list_time`` and each qualify event carries its row's ``ts``. With the feed
option ``skip_older_ts`` (a producer that stamps every row with the list's compute time), a list whose
newest ``ts`` is older than the applied one's is skipped as stale.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from audience_pipeline.formats.compression import gunzip_capped
from audience_pipeline.formats.errors import FileRejected
from audience_pipeline.formats.lines import write_csv_records
from audience_pipeline.model import Semantics
from audience_pipeline.sql import quote_identifier

NAME = "odp"
SUFFIX = ".csv.gz"
REQUIRED = ("type", "action", "audience_id", "ts")


def accepts(file_name: str, feed=None) -> bool:
    return file_name.lower().endswith(SUFFIX) and len(file_name) > len(SUFFIX)


def audience_name(file_name: str) -> str:
    return file_name[: -len(SUFFIX)] if accepts(file_name) else file_name


def file_audiences(file_name: str, feed) -> list[str]:
    return [audience_name(file_name)]


def semantics(feed) -> Semantics:
    return Semantics.REPLACE


def list_time_orders(feed) -> bool:
    """Whether a list older than the applied one (by its newest ts) is stale: only when the feed says so."""
    return feed.skip_older_ts


def identifier_types(feed) -> list[str]:
    return [feed.id_field]


def decode(raw_path: Path, file_name: str, feed, work_dir: Path) -> Path:
    return gunzip_capped(raw_path, work_dir / "decoded.csv", feed.max_decompressed_bytes, file_name)


def parse_query(text_path: Path, file_name: str, feed, work_dir: Path, received_at) -> tuple[str, dict]:
    try:
        params, columns = write_csv_records(text_path, work_dir / "records.parquet")
    except pl.exceptions.PolarsError as exc:
        raise FileRejected(f"{file_name}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in (*REQUIRED, feed.id_field) if c not in columns]
    id_field = quote_identifier(feed.id_field)
    if missing:
        raise FileRejected(f"{file_name}: header (line 1) lacks the column(s) {', '.join(missing)}; "
                           f"it has {', '.join(columns)}")
    sql = f"""
        WITH r AS (
            SELECT source_line, raw, trim(coalesce("type", '')) AS kind, lower(trim(coalesce(action, ''))) AS act,
                   trim(coalesce(audience_id, '')) AS aid, trim(coalesce(ts, '')) AS ts_text,
                   trim(coalesce({id_field}, '')) AS value, all_null
            FROM read_parquet($records_path)
        )
        SELECT source_line, raw,
               $odp_audience::VARCHAR AS audience_key,
               $odp_id_field::VARCHAR AS identifier_type,
               value AS identifier,
               CASE act WHEN 'disqualify' THEN 'remove' ELSE 'add' END AS action,
               NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS expires_in,
               NULL::VARCHAR AS data_bag,
               to_timestamp(TRY_CAST(ts_text AS BIGINT)) AS observed_at,
               NULL::VARCHAR AS warning,
               CASE
                   WHEN all_null THEN 'blank_line'
                   WHEN kind <> 'passthrough' THEN 'unsupported_type'
                   WHEN act NOT IN ('qualify', 'disqualify') THEN 'unsupported_action'
                   WHEN aid <> $odp_audience THEN 'other_audience'
                   WHEN TRY_CAST(ts_text AS BIGINT) IS NULL THEN 'invalid_ts'
                   WHEN value = '' THEN 'missing_identifier'
               END AS reject_reason
        FROM r
    """
    return sql, params | {"odp_audience": audience_name(file_name), "odp_id_field": feed.id_field}
