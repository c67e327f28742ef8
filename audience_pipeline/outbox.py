"""Downstream files: after every committed import, per audience, a gzip CSV in ODP's column layout
(``type,action,<identifier>,audience_id,ts``) in each configured outbox.

``changes`` mode writes the import's qualify/disqualify rows, for destinations that cannot diff;
``full_list`` mode writes the complete current list, for destinations that diff themselves. ODP treats any
file in its import path as the full list and disqualifies everyone absent from it, so a ``changes`` file
dropped into an ODP import path would wipe the audience: point ODP at a ``full_list`` outbox only.

Names sort in commit order: ``<import_id, 12 digits>_<audience>.changes.csv.gz`` and, for full lists, a
folder per import holding ``<audience>.csv.gz`` (the name ODP expects). Files are written to a temporary
name and renamed (or uploaded as one S3 object), and rewriting is idempotent, so a re-run fills in any
file a crash left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from audience_pipeline.config import OutboxConfig
from audience_pipeline.keys import sanitize_file_name
from audience_pipeline.sources.s3 import parse_s3_uri
from audience_pipeline.sql import quote_identifier, quote_literal
from audience_pipeline.storage.lake import Lake

CHANGES = """
SELECT 'passthrough' AS "type", e.action, e.user_id AS {ident}, $audience AS audience_id,
       epoch(e.event_at)::BIGINT AS ts
FROM read_parquet($events) e WHERE e.audience_id = $audience_id ORDER BY e.action, e.user_id
"""

FULL_LIST = """
SELECT 'passthrough' AS "type", 'qualify' AS action, m.user_id AS {ident}, $audience AS audience_id,
       epoch($ts::TIMESTAMPTZ)::BIGINT AS ts
FROM read_parquet($members) m
WHERE m.expires_at IS NULL OR m.expires_at > $ts::TIMESTAMPTZ
ORDER BY m.user_id
"""


def outbox_files(outbox: OutboxConfig, root: Path, import_id: int, audience: str) -> Path:
    name = sanitize_file_name(audience)
    if outbox.mode == "changes":
        return root / f"{import_id:012d}_{name}.changes.csv.gz"
    return root / f"{import_id:012d}" / f"{name}.csv.gz"


def write_outboxes(outboxes: list[OutboxConfig], resolve, lake: Lake, import_id: int, feed: str,
                   audiences: dict[str, int], committed_at, s3_client=None) -> list[str]:
    """Write every outbox file of one committed import; returns the locations written."""
    written = []
    con = duckdb.connect(":memory:")
    try:
        for outbox in outboxes:
            if outbox.feeds and feed not in outbox.feeds:
                continue
            remote = outbox.location.startswith("s3://")
            root = lake.staging(f"outbox_{import_id}") if remote else resolve(outbox.location)
            for audience, audience_id in sorted(audiences.items()):
                target = outbox_files(outbox, root, import_id, audience)
                relative = target.relative_to(root).as_posix()
                if not remote and target.exists():
                    continue
                ident = quote_identifier(outbox.identifier_field)
                if outbox.mode == "changes":
                    sql = CHANGES.format(ident=ident)
                    params = {"audience": audience, "audience_id": audience_id, "events": str(lake.events(import_id))}
                else:
                    sql = FULL_LIST.format(ident=ident)
                    params = {"audience": audience, "members": str(lake.members_file(audience_id, import_id)),
                              "ts": committed_at}
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                con.execute(f"COPY ({sql}) TO {quote_literal(tmp)} (FORMAT csv, HEADER, COMPRESSION gzip)", params)
                if remote:
                    bucket, prefix = parse_s3_uri(outbox.location.rstrip("/") + "/")
                    s3_client().upload_file(str(tmp), bucket, prefix + relative)
                    tmp.unlink()
                    written.append(f"{outbox.location.rstrip('/')}/{relative}")
                else:
                    os.replace(tmp, target)
                    written.append(str(target))
    finally:
        con.close()
    return written
