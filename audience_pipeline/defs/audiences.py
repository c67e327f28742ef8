"""Audiences and feeds as assets of their own in the Dagster UI.

An import is partitioned by file version, which says nothing of one audience's history: a file names
several audiences, and an audience gets its lists from many files. So the `audience` asset has one dynamic
partition per audience, and every run that commits a change to an audience (an import, an approval, a sweep,
a deletion) reports a materialization of that audience's partition with its counts, and evaluates its checks
there. The partition's history is then the audience's: the UI plots members, qualified and disqualified per
commit, and a failed check stays on the audience until a later commit of that audience passes it.
"""

import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg

from audience_pipeline.config import Workspace
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.importer import ImportService
from audience_pipeline.keys import sanitize_file_name
from audience_pipeline.model import ImportStatus
from audience_pipeline.storage.catalog import ImportRecord
from audience_pipeline.storage.lake import Lake

audiences = dg.DynamicPartitionsDefinition(name="audiences")

# Dagster cuts partition keys at 60 characters in places; audience names may have 1,000.
MAX_KEY_CHARS = 60
DROP_SHARE_ERROR = 0.5

MEMBERS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("user_id", "VARCHAR", description="The member: a users-registry user id, or the identifier "
                                                     "itself for feeds without a registry."),
    dg.TableColumn("qualified_at", "TIMESTAMPTZ", description="When the member joined the audience."),
    dg.TableColumn("expires_at", "TIMESTAMPTZ", description="When the membership lapses (null: never)."),
    dg.TableColumn("data_bag", "VARCHAR", description="The vendor's extra fields for the member, as JSON."),
])

VALIDATED_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("audience_key", "VARCHAR", description="The audience the row is about (its name)."),
    dg.TableColumn("identifier_type", "VARCHAR", description="Kind of identifier: user_id, email, phone, ..."),
    dg.TableColumn("identifier", "VARCHAR", description="The identifier as normalized (hashes lower-cased)."),
    dg.TableColumn("user_id", "VARCHAR", description="The user the identifier resolves to."),
    dg.TableColumn("action", "VARCHAR", description="qualify, disqualify, or null for a full list's member."),
    dg.TableColumn("expires_at", "TIMESTAMPTZ", description="Expiry the vendor gave, absolute."),
    dg.TableColumn("expires_in", "BIGINT", description="Expiry the vendor gave, relative (seconds)."),
    dg.TableColumn("data_bag", "VARCHAR", description="The vendor's extra fields, as JSON."),
    dg.TableColumn("observed_at", "TIMESTAMPTZ", description="When the vendor observed the row, if it says."),
    dg.TableColumn("warning", "VARCHAR", description="A non-fatal remark on the row."),
    dg.TableColumn("source_line", "BIGINT", description="Line of the delivered file the row comes from."),
])

# Partitioned checks are a preview feature of Dagster 1.13; the only way to keep a check's result per audience.
# Its warning would print on every CLI command, so it is silenced here, for these two specs only.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    AUDIENCE_CHECKS = [
        dg.AssetCheckSpec(
            "no_sudden_list_drop", asset="audience", partitions_def=audiences,
            description=f"Fails when a commit left the audience with less than {DROP_SHARE_ERROR:.0%} of the members "
                        "it had (an approved import over the removal gate, an opt-out sweep). Stays failed until a "
                        "later commit of this audience passes."),
        dg.AssetCheckSpec(
            "not_held_by_removal_gate", asset="audience", partitions_def=audiences,
            description="Fails while the audience's newest list is held by the feed's removal gate, with the reason; "
                        "passes again when the import is approved or rejected, or a newer list is applied."),
    ]


def audience_partition_key(feed: str, name: str, audience_id: int) -> str:
    """``<feed>:<name>:<audience id>``: the id makes it unique and stable, the rest makes it readable; the
    name is reduced to the characters every Dagster surface accepts and shortened to fit."""
    suffix = f":{audience_id}"
    return f"{feed}:{sanitize_file_name(name)}"[:MAX_KEY_CHARS - len(suffix)] + suffix


def audience_id_of(partition_key: str) -> int:
    return int(partition_key.rsplit(":", 1)[1])


def lake_location(lake: Lake, path) -> dg.MetadataValue:
    """Where a lake file really is: its S3 URI for an S3 lake (the local copy is only a cache, trimmed after
    every import), else its path."""
    if lake.remote is not None:
        return dg.MetadataValue.url(lake.location + lake.relative(path))
    return dg.MetadataValue.path(str(path))


_OWNER = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7}")


def owners_of(admins) -> list[str]:
    """The admins Dagster accepts as asset owners (e-mail addresses); others would fail the code location."""
    return sorted({a for a in admins if _OWNER.fullmatch(a)})


@dataclass(frozen=True)
class AudienceChange:
    """One audience's commit: members before and after, and how many left."""

    feed: str
    name: str
    audience_id: int
    before: int
    after: int
    removed: int
    import_id: int

    @property
    def key(self) -> str:
        return audience_partition_key(self.feed, self.name, self.audience_id)

    @property
    def qualified(self) -> int:
        return self.after - self.before + self.removed


def changes_of(service: ImportService, record: ImportRecord) -> list[AudienceChange]:
    rows = service.catalog.import_versions(record.import_id)
    if not rows:
        return []
    ids = service.catalog.audience_ids(record.feed, [r[0] for r in rows])
    return [AudienceChange(record.feed, name, ids[name], before, after, removed, record.import_id)
            for name, before, after, removed in rows]


def _drop_check(change: AudienceChange, deleted: bool = False) -> dg.AssetCheckEvaluation:
    kept = change.after / change.before if change.before else 1.0
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("audience"), check_name="no_sudden_list_drop", partition=change.key,
        passed=deleted or kept >= DROP_SHARE_ERROR, severity=dg.AssetCheckSeverity.ERROR,
        description="the audience was deleted" if deleted else None,
        metadata={"members_before": change.before, "members_after": change.after, "kept_share": kept,
                  "import_id": change.import_id},
    )


def _gate_check(key: str, held: ImportRecord | None) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("audience"), check_name="not_held_by_removal_gate", partition=key,
        passed=held is None, severity=dg.AssetCheckSeverity.WARN,
        description=f"import {held.import_id} ({held.file_name}) {held.error}" if held else None,
        metadata={"held_import_id": held.import_id, "reason": held.error or ""} if held else {},
    )


def _materialization(service: ImportService, change: AudienceChange, version: int | None) -> dg.AssetMaterialization:
    metadata = {
        "members": change.after,
        "qualified": change.qualified,
        "disqualified": change.removed,
        "import_id": change.import_id,
        "feed": change.feed,
        "audience": change.name,
        "audience_id": change.audience_id,
        "dagster/partition_row_count": change.after,
    }
    if version is not None:
        metadata["version"] = version
        metadata["members_path"] = lake_location(service.lake, service.lake.members_file(change.audience_id, version))
    return dg.AssetMaterialization(asset_key="audience", partition=change.key, metadata=metadata,
                                   description=f"{change.name} after import {change.import_id}")


def audience_events(service: ImportService, record: ImportRecord, deleted: bool = False) -> list:
    """What ``record`` did to its audiences, as events for the `audience` asset: a materialization and check
    results per audience it changed, or, for a held import, a failed gate check per audience it names."""
    if record.status == ImportStatus.HELD:
        ids = service.catalog.audience_ids(record.feed, list(record.audiences or []))
        return [_gate_check(audience_partition_key(record.feed, name, i), record) for name, i in sorted(ids.items())]
    if record.status == ImportStatus.REJECTED:
        ids = service.catalog.audience_ids(record.feed, list(record.audiences or []))
        held = _held(service, record.feed, list(ids))
        return [_gate_check(audience_partition_key(record.feed, name, i), held.get(name))
                for name, i in sorted(ids.items())]
    if record.status != ImportStatus.SUCCEEDED:
        return []
    changes = changes_of(service, record)
    current = service.catalog.current_versions([c.audience_id for c in changes])
    held = _held(service, record.feed, [c.name for c in changes])
    events: list = []
    for change in changes:
        version = current[change.audience_id].version if change.audience_id in current else None
        events += [_materialization(service, change, version), _drop_check(change, deleted),
                   _gate_check(change.key, held.get(change.name))]
    return events


def _held(service: ImportService, feed: str, names: list[str]) -> dict[str, ImportRecord]:
    """Per audience name, the newest import of it that the gate holds (one catalog query for all names, then
    one per held import: a feed rarely has more than one)."""
    held: dict[str, ImportRecord] = {}
    for import_id, status in service.catalog.pending_for(feed, names, 0) if names else []:
        if status == ImportStatus.HELD:
            record = service.catalog.get_import(import_id)
            held.update({name: record for name in record.audiences or [] if name in names})
    return held


def report_audiences(context: dg.OpExecutionContext, service: ImportService, record: ImportRecord,
                     deleted: bool = False) -> None:
    """Log, in the current run, the `audience` events of a commit (or a hold) this run made."""
    events = audience_events(service, record, deleted)
    keys = sorted({e.partition for e in events})
    if keys:
        context.instance.add_dynamic_partitions(audiences.name, keys)
    for event in events:
        context.log_event(event)


@dg.asset(partitions_def=audiences, group_name="audiences", kinds={"parquet"}, check_specs=AUDIENCE_CHECKS,
          metadata={"dagster/column_schema": MEMBERS_SCHEMA})
def audience(context: dg.AssetExecutionContext, audience_workspace: AudienceWorkspace) -> dg.MaterializeResult:
    """One audience of one feed: its current member list, one partition per audience (`<feed>:<name>:<id>`).

    Each commit that changes the audience (an import, an approval, an opt-out or expiry sweep, a deletion)
    reports a materialization of its partition with members, qualified, disqualified and the import id, so
    the partition's history is the audience's history. Materializing a partition by hand re-reports its
    current list and re-evaluates its checks; it changes nothing.
    """
    service = audience_workspace.service()
    audience_id = audience_id_of(context.partition_key)
    applied = service.catalog.applied_imports(audience_id)
    if not applied:
        raise dg.Failure(description=f"audience {context.partition_key} has no committed list")
    latest = applied[0]
    [change] = [c for c in changes_of(service, latest) if c.audience_id == audience_id]
    version = service.catalog.current_versions([audience_id]).get(audience_id)
    result = _materialization(service, change, version.version if version else None)
    held = _held(service, latest.feed, [change.name]).get(change.name)
    drop, gate = _drop_check(change), _gate_check(change.key, held)
    return dg.MaterializeResult(
        metadata=dict(result.metadata),
        check_results=[dg.AssetCheckResult(check_name=e.check_name, passed=e.passed, severity=e.severity,
                                           description=e.description, metadata=dict(e.metadata))
                       for e in (drop, gate)],
    )


MIN_FRESHNESS = timedelta(minutes=1)


def feed_asset_key(feed: str) -> dg.AssetKey:
    return dg.AssetKey(["feed_deliveries", feed])


def feed_specs(workspace: Workspace) -> list[dg.AssetSpec]:
    """One external asset per feed: what the vendor delivers. Each delivery an import receives is reported as
    a materialization, so the UI shows when each feed last delivered; a feed with max_silence_hours has a
    freshness policy of that window and the delivered_within_max_silence check beside its silence e-mail."""
    specs = []
    for name, feed in sorted(workspace.config.feeds.items()):
        window = timedelta(hours=feed.max_silence_hours) if feed.max_silence_hours else None
        # Dagster refuses freshness windows under a minute; the silence check covers such a feed all the same
        policy = dg.FreshnessPolicy.time_window(fail_window=window) if window and window >= MIN_FRESHNESS else None
        specs.append(dg.AssetSpec(
            feed_asset_key(name), group_name="feeds", kinds={feed.format},
            description=f"Files the {name!r} feed delivers ({feed.format}) at {workspace.source_location(name)}.",
            owners=owners_of(feed.admins),
            freshness_policy=policy,
            metadata={"max_silence_hours": feed.max_silence_hours} if window else {},
        ))
    return specs


def delivery_event(record: ImportRecord) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(
        asset_key=feed_asset_key(record.feed), description=f"delivered {record.file_name}",
        metadata={"import_id": record.import_id, "file_name": record.file_name or "",
                  "source_uri": record.source_uri or "", "size_bytes": record.size_bytes or 0},
    )


SILENCE_CHECK = "delivered_within_max_silence"


def silence_evaluation(service: ImportService, feed: str, now: datetime) -> dg.AssetCheckEvaluation:
    """Whether the feed delivered within its max_silence_hours, as of ``now``."""
    limit = service.workspace.feed(feed).max_silence_hours
    last = service.catalog.last_delivery(feed)
    silent = (now - last).total_seconds() / 3600 if last else None
    passed = silent is not None and limit is not None and silent <= limit
    return dg.AssetCheckEvaluation(
        asset_key=feed_asset_key(feed), check_name=SILENCE_CHECK, passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"last delivery {silent:.1f} hours ago (allowed: {limit})" if silent is not None
                     else "no delivery yet"),
        metadata={"last_delivery": last.isoformat() if last else "", "max_silence_hours": limit or 0},
    )


def build_silence_checks(workspace: Workspace) -> list[dg.AssetChecksDefinition]:
    watched = sorted(name for name, feed in workspace.config.feeds.items() if feed.max_silence_hours)
    if not watched:
        return []

    @dg.multi_asset_check(
        specs=[dg.AssetCheckSpec(SILENCE_CHECK, asset=feed_asset_key(name),
                                 description="Fails when the feed has delivered no file for longer than its "
                                             "max_silence_hours. Evaluated hourly by feed_silence_sensor.")
               for name in watched],
        can_subset=True,
    )
    def feed_silence_checks(context: dg.AssetCheckExecutionContext, audience_workspace: AudienceWorkspace):
        service = audience_workspace.service()
        now = datetime.now(UTC)
        for key in context.selected_asset_check_keys:
            evaluation = silence_evaluation(service, key.asset_key.path[-1], now)
            yield dg.AssetCheckResult(asset_key=key.asset_key, check_name=SILENCE_CHECK, passed=evaluation.passed,
                                      description=evaluation.description, metadata=dict(evaluation.metadata))

    return [feed_silence_checks]
