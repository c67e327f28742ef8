"""Downstream files: after every committed import, per audience, a gzip CSV in ODP's column layout
(``type,action,<identifier>,audience_id,ts``) in each configured outbox.

``changes`` mode writes the import's qualify/disqualify rows, for destinations that cannot diff;
``full_list`` mode writes the complete current list, for destinations that diff themselves. ODP treats any
file in its import path as the full list and disqualifies everyone absent from it, so a ``changes`` file
dropped into an ODP import path would wipe the audience: point ODP at a ``full_list`` outbox only.

``changes`` files sort in commit order: ``<import_id, 12 digits>_<audience>.changes.csv.gz``. A full list
is ``<audience>.csv.gz`` at the outbox's root, the audience name exactly, and each list overwrites the one
before: ODP takes the audience id from the file name and diffs every file against its previous import, so
the newest list is the one file it must find. A full list is written only while its import's version is the
audience's current one, so a re-run of an older import never puts an older list back; an audience whose
name cannot be a file name or S3 key gets no file (never an altered name, which ODP would read as another
audience) and the reason is returned for the import's record. Files are written to a temporary name and
renamed (or uploaded as one S3 object, with the outbox's own server-side encryption), and rewriting is
idempotent, so a re-run fills in any file a crash left out.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from audience_pipeline.config import OutboxConfig
from audience_pipeline.keys import sanitize_file_name
from audience_pipeline.sources.s3 import parse_s3_uri
from audience_pipeline.sql import quote_identifier, quote_literal
from audience_pipeline.storage import chunks
from audience_pipeline.storage.lake import Lake

if TYPE_CHECKING:
    from audience_pipeline.storage.catalog import Catalog, ImportRecord

CHANGES = """
SELECT 'passthrough' AS "type", e.action, e.user_id AS {ident}, $audience AS audience_id,
       epoch(e.event_at)::BIGINT AS ts
FROM read_parquet($events, hive_partitioning = true) e
WHERE e.audience_id = $audience_id AND e.import_id = $import_id ORDER BY e.action, e.user_id
"""

FULL_LIST = """
SELECT 'passthrough' AS "type", 'qualify' AS action, m.user_id AS {ident}, $audience AS audience_id,
       epoch($ts::TIMESTAMPTZ)::BIGINT AS ts
FROM read_parquet($members) m
WHERE m.expires_at IS NULL OR m.expires_at > $ts::TIMESTAMPTZ
ORDER BY m.user_id
"""

FULL_LIST_SUFFIX = ".csv.gz"
FILE_NAME_BYTES = 255  # NAME_MAX of common file systems: ODP's own upload (`aws s3 cp`) starts from a file
S3_KEY_BYTES = 1024
# A newer import that commits while a re-run writes gets its list written again; each round needs yet
# another commit of the same audience in between, so a few rounds are plenty.
REWRITE_ROUNDS = 5


@dataclass
class Published:
    """What one import's publication wrote, and why an outbox holds no file for some audience."""

    written: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _shown(audience: str) -> str:
    return repr(audience if len(audience) <= 80 else audience[:80] + "...")


def full_list_name_problem(outbox: OutboxConfig, audience: str) -> str | None:
    """Why ``<audience>.csv.gz`` cannot be this outbox's file of the audience, or None."""
    if not audience:
        return "the name is empty"
    if audience in (".", ".."):
        return f"{audience!r} names a folder, not a file"
    if "/" in audience:
        return "it contains '/', a folder separator in file names and S3 keys"
    control = next((c for c in audience if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"it contains the control character {control!r}"
    if audience != audience.strip():
        # readers trim CSV fields (our ODP parser does): the audience_id column would not match the file name
        return "it begins or ends with white space"
    try:
        size = len((audience + FULL_LIST_SUFFIX).encode())
    except UnicodeEncodeError:
        return "it is not valid UTF-8 text"
    if size > FILE_NAME_BYTES:
        return f"the file name would be {size} bytes, over the {FILE_NAME_BYTES} a file name may have"
    if outbox.location.startswith("s3://"):
        _, prefix = parse_s3_uri(outbox.location.rstrip("/") + "/")
        key = len(prefix.encode()) + size
        if key > S3_KEY_BYTES:
            return f"the S3 key would be {key} bytes, over the {S3_KEY_BYTES} a key may have"
    return None


def outbox_files(outbox: OutboxConfig, root: Path, import_id: int, audience: str) -> Path:
    if outbox.mode == "changes":
        return root / f"{import_id:012d}_{sanitize_file_name(audience)}.changes.csv.gz"
    return root / f"{audience}{FULL_LIST_SUFFIX}"


class _Writer:
    """Writes the files of one outbox: into its folder by rename, or to its S3 prefix as single uploads."""

    def __init__(self, outbox: OutboxConfig, resolve, lake: Lake, con, s3_client, import_id: int):
        self.outbox = outbox
        self.con = con
        self.s3_client = s3_client
        self.remote = outbox.location.startswith("s3://")
        self.root = lake.staging(f"outbox_{import_id}") if self.remote else resolve(outbox.location)
        self.ident = quote_identifier(outbox.identifier_field)

    def exists(self, target: Path) -> bool:
        return not self.remote and target.exists()

    def write(self, target: Path, sql: str, params: dict) -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a short temporary name: the final one may already be as long as a file name can be
        digest = hashlib.sha1(target.name.encode()).hexdigest()[:16]
        tmp = target.with_name(f".{digest}.{os.getpid()}.tmp")
        self.con.execute(f"COPY ({sql.format(ident=self.ident)}) TO {quote_literal(tmp)} "
                         "(FORMAT csv, HEADER, COMPRESSION gzip)", params)
        relative = target.relative_to(self.root).as_posix()
        if not self.remote:
            os.replace(tmp, target)
            return str(target)
        bucket, prefix = parse_s3_uri(self.outbox.location.rstrip("/") + "/")
        extra = {"ServerSideEncryption": self.outbox.server_side_encryption}
        if self.outbox.kms_key_id:
            extra["SSEKMSKeyId"] = self.outbox.kms_key_id
        try:
            self.s3_client().upload_file(str(tmp), bucket, prefix + relative, ExtraArgs=extra)
        finally:
            tmp.unlink(missing_ok=True)
        return f"{self.outbox.location.rstrip('/')}/{relative}"


def write_outboxes(outboxes: list[OutboxConfig], resolve, lake: Lake, catalog: Catalog, record: ImportRecord,
                   audiences: dict[str, int], s3_client=None) -> Published:
    """Write every outbox file of one committed import (``audiences``: name -> audience_id)."""
    published = Published()
    con = duckdb.connect(":memory:")
    try:
        for outbox in outboxes:
            if outbox.feeds and record.feed not in outbox.feeds:
                continue
            writer = _Writer(outbox, resolve, lake, con, s3_client, record.import_id)
            if outbox.mode == "changes":
                for audience, audience_id in sorted(audiences.items()):
                    target = outbox_files(outbox, writer.root, record.import_id, audience)
                    if not writer.exists(target):
                        # the import's own events file, or the chunk it was merged into (storage.chunks)
                        events = chunks.file_of(lake, "events", record.import_id) or lake.events(record.import_id)
                        published.written.append(writer.write(target, CHANGES, {
                            "audience": audience, "audience_id": audience_id, "import_id": record.import_id,
                            "events": str(events)}))
            else:
                _write_full_lists(writer, lake, catalog, record, audiences, published)
    finally:
        con.close()
    return published


def _write_full_lists(writer: _Writer, lake: Lake, catalog: Catalog, record: ImportRecord,
                      audiences: dict[str, int], published: Published) -> None:
    ids = {}
    for audience, audience_id in sorted(audiences.items()):
        problem = full_list_name_problem(writer.outbox, audience)
        if problem:
            published.refused.append(
                f"outbox {writer.outbox.location}: no full list of audience {_shown(audience)}: {problem} "
                "(the file name must be the audience id)")
        else:
            ids[audience] = audience_id
    # a version number is the import_id that created it
    current = catalog.current_versions(list(ids.values()))
    due = {a: record.import_id for a, i in ids.items() if i in current and current[i].version == record.import_id}
    committed_at = {record.import_id: record.finished_at}
    for _ in range(REWRITE_ROUNDS):
        for audience, version in sorted(due.items()):
            members = lake.members_file(ids[audience], version)
            lake.fetch(members)
            if version not in committed_at:
                committed_at[version] = catalog.get_import(version).finished_at
            published.written.append(writer.write(
                outbox_files(writer.outbox, writer.root, version, audience), FULL_LIST,
                {"audience": audience, "members": str(members), "ts": committed_at[version]}))
        # Outside the audience locks (a re-run) a newer import may have committed meanwhile, and its own
        # file may have landed before this one: write its list again, so the newest list is what stays.
        after = catalog.current_versions([ids[a] for a in due])
        due = {a: after[ids[a]].version for a, v in due.items()
               if ids[a] in after and after[ids[a]].version != v}
        if not due:
            break
