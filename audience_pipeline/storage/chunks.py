"""Chunks: the per-import files that the analysts' views read, merged CHUNK imports at a time.

Every import writes ``events/import_id=<n>/events.parquet`` and ``rejected/import_id=<n>/rejected.parquet``.
A million imports make a million files, and a query of ``membership_events`` or ``rejected_rows`` opened
them all. Once the CHUNK imports of a range are settled (none of them is still pending, so none will write
its files again), their files are merged into one file per kind, the import id as a column:

    events/chunk=<lo>-<hi>/events.parquet        imports lo..hi
    rejected/chunk=<lo>-<hi>/rejected.parquet

Chunks cover 1..H without a gap, H being the highest ``hi``. A query takes H once from the chunk names, and
reads chunk rows up to H and per-import files above it, so it sees each row once whether or not a chunk
appears meanwhile. The per-import files of a chunk are deleted once it has been in place for the grace period.
A chunk is made by the export that publishes a commit (storage.publishing), one chunk per export, so a
workspace with a long history catches up one chunk per commit.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import duckdb

from audience_pipeline.sql import quote_literal
from audience_pipeline.storage.lake import Lake

CHUNK = 1000
# An import is settled this long after it was received at the earliest (storage.publishing.SETTLED_BELOW).
SETTLE_SECONDS = 600
KINDS = ("events", "rejected")
_NAME = re.compile(r"chunk=(\d+)-(\d+)$")


def chunk_dir(lake: Lake, kind: str, lo: int, hi: int) -> Path:
    return lake.root / kind / f"chunk={lo}-{hi}"


def chunk_file(lake: Lake, kind: str, lo: int, hi: int) -> Path:
    return chunk_dir(lake, kind, lo, hi) / f"{kind}.parquet"


def per_import_file(lake: Lake, kind: str, import_id: int) -> Path:
    return lake.events(import_id) if kind == "events" else lake.rejected(import_id)


def chunks(lake: Lake, kind: str) -> list[tuple[int, int]]:
    """(lo, hi) of the kind's chunks in the local lake, the placeholder (0, 0) included."""
    found = []
    folder = lake.root / kind
    if folder.is_dir():
        for child in folder.iterdir():
            if m := _NAME.match(child.name):
                found.append((int(m[1]), int(m[2])))
    return sorted(found)


def chunks_glob(lake: Lake, kind: str) -> str:
    return lake.location + f"{kind}/chunk=*/{kind}.parquet"


def view_source(lake: Lake, kind: str, per_import: str, union_by_name: bool) -> str:
    """The kind's rows for a view, each once: chunk rows up to H, per-import files above it (``per_import``:
    the read_parquet of those files)."""
    glob = quote_literal(chunks_glob(lake, kind))
    upto = (f"SELECT max(regexp_extract(file, 'chunk=[0-9]+-([0-9]+)', 1)::BIGINT) AS upto "
            f"FROM glob({glob})")
    union = ", union_by_name = true" if union_by_name else ""
    return (f"(WITH upto AS MATERIALIZED ({upto}) "
            f"SELECT * EXCLUDE (chunk) FROM read_parquet({glob}, hive_partitioning = true{union}) "
            f"WHERE import_id <= (SELECT upto FROM upto) "
            f"UNION ALL BY NAME "
            f"SELECT * FROM {per_import} WHERE import_id > (SELECT upto FROM upto))")


def ensure(lake: Lake) -> None:
    """The empty chunk 0-0 of each kind (the placeholder per-import file's columns and an import id), which
    keeps the chunk glob from matching nothing."""
    for kind in KINDS:
        path = chunk_file(lake, kind, 0, 0)
        if lake.fetch(path):
            continue
        placeholder = per_import_file(lake, kind, 0)
        _merge([placeholder], path, 0, 0)
        lake.publish(path)


def next_range(upto: int, settled_below: int) -> tuple[int, int] | None:
    """The chunk after ``upto`` if every import in it is settled (ids below ``settled_below``)."""
    lo, hi = upto + 1, upto + CHUNK
    return (lo, hi) if hi < settled_below else None


def compact(lake: Lake, lo: int, hi: int) -> None:
    """Merge the per-import files of imports lo..hi into one chunk per kind. A chunk in place already (an
    export that failed after making it) is kept: a file is never rewritten in place, and an erasure may have
    scrubbed it since."""
    for kind in KINDS:
        dest = chunk_file(lake, kind, lo, hi)
        if lake.fetch(dest):
            continue
        files = [per_import_file(lake, kind, 0)] + [
            path for n in range(lo, hi + 1) if lake.fetch(path := per_import_file(lake, kind, n))]
        _merge(files, dest, lo, hi)
        lake.publish(dest)


def _merge(files: list[Path], dest: Path, lo: int, hi: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    listed = ", ".join(quote_literal(f) for f in files)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"COPY (SELECT * FROM read_parquet([{listed}], hive_partitioning = true, union_by_name = true) "
                    f"WHERE import_id BETWEEN ? AND ? ORDER BY import_id) "
                    f"TO {quote_literal(tmp)} (FORMAT parquet)", [lo, hi])
    finally:
        con.close()
    os.replace(tmp, dest)


def prune(lake: Lake, grace_seconds: float) -> None:
    """Delete the per-import files of every chunk in place for ``grace_seconds``, newest chunk first, up to
    the first one already pruned."""
    cutoff = time.time() - grace_seconds
    for kind in KINDS:
        for lo, hi in reversed(chunks(lake, kind)):
            if lo == 0 or chunk_dir(lake, kind, lo, hi).stat().st_mtime >= cutoff:
                continue
            present = [per_import_file(lake, kind, n).parent for n in range(lo, hi + 1)]
            present = [folder for folder in present if folder.exists()]
            if not present:
                break
            for folder in present:
                lake.delete_tree(folder)


def file_of(lake: Lake, kind: str, import_id: int) -> Path | None:
    """The file that holds an import's rows of the kind: its own, or the chunk it was merged into."""
    own = per_import_file(lake, kind, import_id)
    if lake.fetch(own):
        return own
    for lo, hi in chunks(lake, kind):
        if lo <= import_id <= hi and lake.fetch(path := chunk_file(lake, kind, lo, hi)):
            return path
    return None
