"""Layout of the lake: immutable Parquet and the raw archive, under one root folder.

    raw/<sha256[:2]>/<sha256>                          raw archive, content-addressed, immutable
    validated/import_id=<n>/rows.parquet               canonical rows of an import
    rejected/import_id=<n>/rejected.parquet            rejected rows with line number and reason
    members/audience_id=<a>/version=<v>/data_0.parquet member list of one audience version
    events/import_id=<n>/events.parquet                net qualify/disqualify per (import, audience, user)
    catalog/base/seq=<n>/base.parquet                  committed catalog state as of number n (compacted)
    catalog/deltas/seq=<n>/base=<b>/delta.parquet      catalog records changed since base b, as of number n
    staging/                                           work in progress, never read by views

Nothing under members/, events/, rejected/ is read by analysts unless the published catalog names its import or
version, so a crashed run leaves only unreferenced files that its re-run overwrites. Every file is written
under a new name and never rewritten in place: DuckDB may open a file more than once per query (metadata
at bind time, data at scan time), and a file replaced between the two reads as corrupt.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from audience_pipeline.sql import quote_literal
from audience_pipeline.storage.remote import RemoteStore

MEMBERS_SCHEMA = "user_id VARCHAR, qualified_at TIMESTAMPTZ, expires_at TIMESTAMPTZ, data_bag VARCHAR"
EVENTS_SCHEMA = (
    "audience_id BIGINT, user_id VARCHAR, action VARCHAR, event_at TIMESTAMPTZ, source_line BIGINT, "
    "observed_at TIMESTAMPTZ"
)
REJECTED_SCHEMA = "line_number BIGINT, reason VARCHAR, raw VARCHAR"


class Lake:
    """Paths of the lake under a local ``root``. With a ``remote`` (an S3 lake), ``root`` is a local cache:
    files are published to the remote after they are written and fetched from it when missing."""

    def __init__(self, root: Path, remote: RemoteStore | None = None):
        self.root = root
        self.remote = remote

    @property
    def location(self) -> str:
        """Where analysts find the lake: the S3 URI of a remote lake, else the local folder."""
        return self.remote.uri if self.remote else str(self.root) + os.sep

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def publish(self, path: Path) -> None:
        if self.remote is not None:
            self.remote.upload(path, self.relative(path))

    def publish_tree(self, folder: Path) -> None:
        if self.remote is not None:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                self.publish(path)

    def fetch(self, path: Path) -> bool:
        """Make ``path`` present locally; False if it exists nowhere."""
        if path.exists():
            return True
        return self.remote is not None and self.remote.download(self.relative(path), path)

    def delete(self, path: Path) -> None:
        if self.remote is not None:
            self.remote.delete(self.relative(path))
        path.unlink(missing_ok=True)

    def delete_tree(self, folder: Path) -> None:
        """Delete a folder's files here and on the remote (whose listing the local cache may lack)."""
        if self.remote is not None:
            listing = self.remote.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.remote.bucket, Prefix=self.remote.key(self.relative(folder)) + "/")
            for page in listing:
                for item in page.get("Contents", ()):
                    self.remote.client.delete_object(Bucket=self.remote.bucket, Key=item["Key"])
        if folder.exists():
            shutil.rmtree(folder)

    def raw_path(self, sha256: str) -> Path:
        return self.root / "raw" / sha256[:2] / sha256

    def validated_rows(self, import_id: int) -> Path:
        return self.root / "validated" / f"import_id={import_id}" / "rows.parquet"

    def rejected(self, import_id: int) -> Path:
        return self.root / "rejected" / f"import_id={import_id}" / "rejected.parquet"

    def events(self, import_id: int) -> Path:
        return self.root / "events" / f"import_id={import_id}" / "events.parquet"

    def members_dir(self, audience_id: int, version: int) -> Path:
        return self.root / "members" / f"audience_id={audience_id}" / f"version={version}"

    def members_file(self, audience_id: int, version: int) -> Path:
        return self.members_dir(audience_id, version) / "data_0.parquet"

    def base_dir(self, seq: int) -> Path:
        return self.root / "catalog" / "base" / f"seq={seq:012d}"

    def base_file(self, seq: int) -> Path:
        return self.base_dir(seq) / "base.parquet"

    def delta_dir(self, seq: int, base: int) -> Path:
        return self.root / "catalog" / "deltas" / f"seq={seq:012d}" / f"base={base:012d}"

    def delta_file(self, seq: int, base: int) -> Path:
        return self.delta_dir(seq, base) / "delta.parquet"

    def deltas(self) -> list[tuple[int, int]]:
        """(number, base) of the deltas in the local lake."""
        found = []
        for folder in (self.root / "catalog" / "deltas").glob("seq=*/base=*"):
            seq, base = folder.parent.name[4:], folder.name[5:]
            if seq.isdigit() and base.isdigit():
                found.append((int(seq), int(base)))
        return found

    @property
    def base_glob(self) -> str:
        return self.location + "catalog/base/*/base.parquet"

    @property
    def deltas_glob(self) -> str:
        return self.location + "catalog/deltas/*/*/delta.parquet"

    @staticmethod
    def numbers(folder: Path) -> list[int]:
        """The numbers of a folder's ``seq=<n>`` subfolders (none when it does not exist)."""
        if not folder.is_dir():
            return []
        return [int(c.name[4:]) for c in folder.iterdir() if c.name.startswith("seq=") and c.name[4:].isdigit()]

    def staging(self, name: str) -> Path:
        return self.root / "staging" / name

    # What the analyst views read: the real partitions (ids start at 1), then partition 0's empty
    # placeholder, which gives every view its schema while the lake holds nothing else.
    @property
    def members_sources(self) -> list[str]:
        return [self.location + "members/audience_id=[1-9]*/*/*.parquet",
                self.location + self.relative(self.members_file(0, 0))]

    @property
    def events_sources(self) -> list[str]:
        return [self.location + "events/import_id=[1-9]*/*.parquet", self.location + self.relative(self.events(0))]

    @property
    def rejected_sources(self) -> list[str]:
        return [self.location + "rejected/import_id=[1-9]*/*.parquet",
                self.location + self.relative(self.rejected(0))]

    def trim_cache(self, keep: set[Path], max_bytes: int) -> None:
        """Empty the local cache of a remote lake down to ``keep`` (what the next diffs read), then drop
        the oldest kept files while the cache is over ``max_bytes``. Everything is on the remote."""
        files = [p for p in self.root.rglob("*") if p.is_file()]
        kept = []
        for path in files:
            if path in keep:
                kept.append(path)
            elif "staging" not in path.relative_to(self.root).parts:
                path.unlink(missing_ok=True)
        kept.sort(key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in kept)
        for path in kept:
            if total <= max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)

    def ensure(self) -> None:
        """Create the folders and the empty placeholder partitions (idempotent). Every import calls it, so a
        lake already in place costs three schema reads and no DuckDB instance."""
        placeholders = ((self.members_file(0, 0), MEMBERS_SCHEMA), (self.events(0), EVENTS_SCHEMA),
                        (self.rejected(0), REJECTED_SCHEMA))
        # a placeholder of an older schema is rewritten too: it gives the views their columns
        stale = [(path, schema) for path, schema in placeholders if _columns(path) != _schema_columns(schema)]
        if stale:
            con = duckdb.connect(":memory:")
            try:
                for path, schema in stale:
                    _write_empty(con, path, schema)
                    self.publish(path)
            finally:
                con.close()
        (self.root / "catalog").mkdir(parents=True, exist_ok=True)
        (self.root / "raw").mkdir(parents=True, exist_ok=True)

    def move_into_place(self, staged: Path, final: Path) -> None:
        """Move a staged folder into place, replacing an unreferenced leftover of a crashed attempt."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)


def _columns(path: Path) -> list[str] | None:
    """A placeholder's columns, or None when it is missing or cannot be read (it is empty: writing it again
    loses nothing)."""
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return None


def _schema_columns(schema: str) -> list[str]:
    return [column.split()[0] for column in schema.split(",")]


def _write_empty(con: duckdb.DuckDBPyConnection, path: Path, schema: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # processes starting together all write the missing placeholders: each through a name of its own
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    con.execute(f"CREATE OR REPLACE TEMP TABLE empty_placeholder ({schema})")
    con.execute(f"COPY empty_placeholder TO {quote_literal(tmp)} (FORMAT parquet)")
    os.replace(tmp, path)
