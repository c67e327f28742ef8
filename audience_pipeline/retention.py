"""Retention: one partition per file version, a raw archive and member-list versions all grow without bound
(a 500 MB file every ten minutes is ~70 GB a day). This removes what has aged out, never what the current
lists, an unfinished import or the activity log needs: imports, events and rejected rows stay.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from audience_pipeline.config import Workspace
from audience_pipeline.storage import statements as sql
from audience_pipeline.storage.catalog import Catalog

STAGING_MAX_AGE_SECONDS = 86400


@dataclass
class RetentionReport:
    versions: int = 0
    raw_files: int = 0
    validated: int = 0
    staging: int = 0
    partitions: list[str] = field(default_factory=list)


def run_retention(workspace: Workspace, catalog: Catalog, now: datetime | None = None) -> RetentionReport:
    """Delete aged-out files and return them, plus the partition keys the caller should drop from Dagster."""
    storage = workspace.config.storage
    now = now or datetime.now(UTC)
    report = RetentionReport(versions=catalog.prune_versions(timedelta(days=storage.retention_days)))
    raw_cutoff = now - timedelta(days=storage.raw_retention_days)
    with catalog.session() as con:
        raw = [r[0] for r in con.execute(sql.RAW_EXPIRED, [raw_cutoff]).fetchall()]
        validated = [r[0] for r in con.execute(sql.VALIDATED_EXPIRED, [raw_cutoff]).fetchall()]
        report.partitions = sorted(r[0] for r in con.execute(
            sql.PARTITIONS_EXPIRED, [now - timedelta(days=storage.partition_retention_days)]).fetchall())
    lake = catalog.lake
    for sha256 in raw:
        lake.delete(lake.raw_path(sha256))
        report.raw_files += 1
    for import_id in validated:
        lake.delete_tree(lake.validated_rows(import_id).parent)
        report.validated += 1
    staging = lake.root / "staging"
    if staging.is_dir():
        cutoff = time.time() - STAGING_MAX_AGE_SECONDS
        for entry in staging.iterdir():
            if entry.stat().st_mtime < cutoff:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                report.staging += 1
    return report
