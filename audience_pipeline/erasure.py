"""Erasure of one user from the lake (privacy requests).

The user first leaves every audience through an ordinary incremental import per feed, so downstream
consumers get the disqualify events and change files. Then every lake file that holds the user is
rewritten without them: member lists (current and retained versions) and validated rows lose the user's
rows, events keep their history under a pseudonym (``erased:<hash>``), rejected rows and raw files lose the
lines that carry one of the user's identifiers. Raw files keep their content-addressed names although
their content changes. The erasure is recorded by the SHA-256 of the user id only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import duckdb

from audience_pipeline.sql import quote_literal
from audience_pipeline.storage.lake import Lake
from audience_pipeline.users import drop_lookups


def pseudonym(user_id: str) -> str:
    return "erased:" + hashlib.sha256(user_id.encode()).hexdigest()[:16]


def _rewrite(con: duckdb.DuckDBPyConnection, path: Path, query: str, params: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.erasure")
    con.execute(f"COPY ({query.format(src=quote_literal(path))}) TO {quote_literal(tmp)} (FORMAT parquet)", params)
    os.replace(tmp, path)


def _holds(con: duckdb.DuckDBPyConnection, path: Path, user_id: str) -> bool:
    return con.execute("SELECT count(*) FROM read_parquet(?) WHERE user_id = ?", [str(path), user_id]).fetchone()[0] > 0


def identifiers_of(con: duckdb.DuckDBPyConnection, lake: Lake, user_id: str) -> set[str]:
    """The user id and every identifier that resolved to it in any validated file."""
    files = sorted(str(p) for p in (lake.root / "validated").glob("*/rows.parquet"))
    found = {user_id}
    if files:
        found |= {r[0] for r in con.execute(
            "SELECT DISTINCT identifier FROM read_parquet(?, union_by_name = true) WHERE user_id = ?",
            [files, user_id]).fetchall() if r[0]}
    return found


def scrub_lake(lake: Lake, user_id: str, identifiers: set[str]) -> int:
    """Rewrite every lake file that holds the user; returns how many files were rewritten."""
    con = duckdb.connect(":memory:")
    rewritten = 0
    try:
        idents = sorted(identifiers)
        for path in sorted((lake.root / "members").glob("*/*/*.parquet")):
            if _holds(con, path, user_id):
                _rewrite(con, path, "SELECT * FROM read_parquet({src}) WHERE user_id <> $u", {"u": user_id})
                rewritten += 1
        for path in sorted((lake.root / "validated").glob("*/rows.parquet")):
            if con.execute("SELECT count(*) FROM read_parquet(?) WHERE user_id = ? OR list_contains(?, identifier)",
                           [str(path), user_id, idents]).fetchone()[0]:
                _rewrite(con, path, "SELECT * FROM read_parquet({src}) WHERE user_id <> $u "
                                    "AND NOT list_contains($i, identifier)", {"u": user_id, "i": idents})
                rewritten += 1
        for path in sorted((lake.root / "events").glob("*/events.parquet")):
            if _holds(con, path, user_id):
                _rewrite(con, path, "SELECT * REPLACE (CASE WHEN user_id = $u THEN $p ELSE user_id END AS user_id) "
                                    "FROM read_parquet({src})", {"u": user_id, "p": pseudonym(user_id)})
                rewritten += 1
        contains_any = "list_bool_or([contains(coalesce(raw, ''), x) for x in $i])"
        for path in sorted((lake.root / "rejected").glob("*/rejected.parquet")):
            if con.execute(f"SELECT count(*) FROM read_parquet($path) WHERE {contains_any}",
                           {"path": str(path), "i": idents}).fetchone()[0]:
                _rewrite(con, path, f"SELECT * FROM read_parquet({{src}}) WHERE NOT {contains_any}", {"i": idents})
                rewritten += 1
    finally:
        con.close()
    # the registry lookups copy registry values and user ids; the next import rebuilds them from the registry
    drop_lookups(lake.root / "staging")
    needles = [i.encode() for i in identifiers]
    for path in sorted((lake.root / "raw").glob("*/*")):
        if path.is_file() and _scrub_raw(path, needles):
            rewritten += 1
    return rewritten


def _scrub_raw(path: Path, needles: list[bytes]) -> bool:
    """Drop the lines of a raw file (plain or gzip) that carry one of the identifiers."""
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    # Line by line in Python: an erasure is rare and off the import path (about 10 s per 500 MB file).
    tmp = path.with_name(f".{path.name}.erasure")
    removed = False
    with opener(path, "rb") as src, opener(tmp, "wb") as out:
        for line in src:
            if any(needle in line for needle in needles):
                removed = True
                continue
            out.write(line)
    if removed:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return removed

