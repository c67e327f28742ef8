"""Layout of the lake: immutable Parquet and the raw archive, under one root folder.

    raw/<sha256[:2]>/<sha256>                          raw archive, content-addressed, immutable
    validated/import_id=<n>/rows.parquet               canonical rows of an import
    rejected/import_id=<n>/rejected.parquet            rejected rows with line number and reason
    members/audience_id=<a>/version=<v>/data_0.parquet member list of one audience version
    events/import_id=<n>/events.parquet                net qualify/disqualify per (import, audience, user)
    catalog/snapshots/seq=<n>/snapshot.parquet         committed catalog state; the newest is current
    staging/                                           work in progress, never read by views

Nothing under members/, events/, rejected/ is read by analysts unless the snapshot names its import or
version, so a crashed run leaves only unreferenced files that its re-run overwrites. Every file is written
under a new name and never rewritten in place: DuckDB may open a file more than once per query (metadata
at bind time, data at scan time), and a file replaced between the two reads as corrupt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb

from audience_pipeline.sql import quote_literal

MEMBERS_SCHEMA = "user_id VARCHAR, qualified_at TIMESTAMPTZ, expires_at TIMESTAMPTZ, data_bag VARCHAR"
EVENTS_SCHEMA = (
    "audience_id BIGINT, user_id VARCHAR, action VARCHAR, event_at TIMESTAMPTZ, source_line BIGINT"
)
REJECTED_SCHEMA = "line_number BIGINT, reason VARCHAR, raw VARCHAR"


class Lake:
    def __init__(self, root: Path):
        self.root = root

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

    def snapshot_dir(self, seq: int) -> Path:
        return self.root / "catalog" / "snapshots" / f"seq={seq:012d}"

    @property
    def snapshots_glob(self) -> str:
        return str(self.root / "catalog" / "snapshots" / "*" / "snapshot.parquet")

    def staging(self, name: str) -> Path:
        return self.root / "staging" / name

    # Globs the analyst views read. Partition 0 holds an empty placeholder so a glob never matches nothing.
    @property
    def members_glob(self) -> str:
        return str(self.root / "members" / "*" / "*" / "*.parquet")

    @property
    def events_glob(self) -> str:
        return str(self.root / "events" / "*" / "*.parquet")

    @property
    def rejected_glob(self) -> str:
        return str(self.root / "rejected" / "*" / "*.parquet")

    def ensure(self) -> None:
        """Create the folders and the empty placeholder partitions (idempotent)."""
        con = duckdb.connect(":memory:")
        try:
            for path, schema in (
                (self.members_file(0, 0), MEMBERS_SCHEMA),
                (self.events(0), EVENTS_SCHEMA),
                (self.rejected(0), REJECTED_SCHEMA),
            ):
                if not path.exists():
                    _write_empty(con, path, schema)
        finally:
            con.close()
        (self.root / "catalog").mkdir(parents=True, exist_ok=True)
        (self.root / "raw").mkdir(parents=True, exist_ok=True)

    def publish_dir(self, staged: Path, final: Path) -> None:
        """Move a staged folder into place, replacing an unreferenced leftover of a crashed attempt."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)


def _write_empty(con: duckdb.DuckDBPyConnection, path: Path, schema: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    con.execute(f"CREATE OR REPLACE TEMP TABLE empty_placeholder ({schema})")
    con.execute(f"COPY empty_placeholder TO {quote_literal(tmp)} (FORMAT parquet)")
    os.replace(tmp, path)
