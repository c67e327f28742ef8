import dagster as dg

from audience_pipeline.defs.audiences import (
    MEMBERS_SCHEMA,
    VALIDATED_SCHEMA,
    delivery_event,
    lake_location,
    report_audiences,
)
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.importer import ImportFailed, ImportService
from audience_pipeline.storage.catalog import ImportRecord

audience_files = dg.DynamicPartitionsDefinition(name="audience_files")

TAG_DELIVERY = "audience_pipeline/delivery"
TAG_SOURCE_URI = "audience_pipeline/source_uri"
TAG_FILE_NAME = "audience_pipeline/file_name"  # when the source object is not named as the file (reimport)
TAG_DRY_RUN = "audience_pipeline/dry_run"
TAG_FEED = "audience_pipeline/feed"
TAG_ATTEMPT = "audience_pipeline/attempt"  # a sensor's retry of a delivery whose run failed or was abandoned
TAG_ORIGIN = "audience_pipeline/origin"  # "cli" for runs of `audience-pipeline import` and `reimport`
TAG_PROFILE = "audience_pipeline/profile"  # the feed profile (Loymax) whose options apply to the file
TAG_SHA256 = "audience_pipeline/sha256"  # a local file's sha256, when the command that started the run hashed it


def _delivery(context: dg.AssetExecutionContext) -> str | None:
    return context.run.tags.get(TAG_DELIVERY)


def _record(context: dg.AssetExecutionContext, service: ImportService) -> ImportRecord:
    try:
        return service.record_for(context.partition_key, _delivery(context))
    except LookupError as exc:
        raise dg.Failure(description=str(exc)) from None


def _failure(record: ImportRecord) -> dg.Failure:
    return dg.Failure(
        description=f"import {record.import_id} failed: {record.error}",
        metadata={"import_id": record.import_id, "status": record.status, "error": record.error or ""},
    )


REJECT_SHARE_WARN = 0.01
UNMATCHED_SHARE_WARN = 0.10
DROP_SHARE_ERROR = 0.5

VALIDATION_CHECKS = [
    dg.AssetCheckSpec("rejected_rows_share", asset="validated_audience_file",
                      description=f"Warns when more than {REJECT_SHARE_WARN:.0%} of the rows were rejected for "
                                  "format or identifier reasons (over the feed's max_reject_ratio, the import fails)."),
    dg.AssetCheckSpec("unmatched_share", asset="validated_audience_file",
                      description=f"Warns when more than {UNMATCHED_SHARE_WARN:.0%} of the rows name users that "
                                  "are not in the users registry."),
]
DIFF_CHECKS = [
    dg.AssetCheckSpec("no_sudden_list_drop", asset="membership_diff",
                      description=f"Fails when the import left its audiences with less than "
                                  f"{DROP_SHARE_ERROR:.0%} of the members they had (the removal gate holds such "
                                  "imports unless approved)."),
]


def _validation_checks(rows: int | None, rejected: int | None, unmatched: int | None) -> list[dg.AssetCheckResult]:
    rows, rejected, unmatched = rows or 0, rejected or 0, unmatched or 0
    reject_share = (rejected - unmatched) / rows if rows else 0.0
    unmatched_share = unmatched / rows if rows else 0.0
    return [
        dg.AssetCheckResult(check_name="rejected_rows_share", passed=reject_share <= REJECT_SHARE_WARN,
                            severity=dg.AssetCheckSeverity.WARN, metadata={"share": reject_share}),
        dg.AssetCheckResult(check_name="unmatched_share", passed=unmatched_share <= UNMATCHED_SHARE_WARN,
                            severity=dg.AssetCheckSeverity.WARN, metadata={"share": unmatched_share}),
    ]


def _diff_checks(record: ImportRecord) -> list[dg.AssetCheckResult]:
    after = record.members or 0
    before = after - (record.qualified or 0) + (record.disqualified or 0)
    applied = record.status == "succeeded"
    kept = after / before if before and applied else 1.0
    return [dg.AssetCheckResult(check_name="no_sudden_list_drop", passed=kept >= DROP_SHARE_ERROR,
                                severity=dg.AssetCheckSeverity.ERROR,
                                metadata={"members_before": before, "members_after": after, "kept_share": kept})]


def _counts(record: ImportRecord) -> dict:
    return {
        "import_id": record.import_id,
        "status": record.status,
        "rows": record.rows_total or 0,
        "valid": record.rows_valid or 0,
        "rejected": record.rows_rejected or 0,
        "duplicates": record.duplicates or 0,
        "unmatched": record.unmatched or 0,
        "qualified": record.qualified or 0,
        "disqualified": record.disqualified or 0,
        "members": record.members or 0,
    }


@dg.asset(partitions_def=audience_files, group_name="audience_import", kinds={"parquet"})
def raw_audience_file(context: dg.AssetExecutionContext, audience_workspace: AudienceWorkspace):
    """The delivered file exactly as it landed, copied into the immutable, content-addressed raw archive.

    One partition per imported file version (`<feed>:<file name>:<8 hex of sha256>`). A run started by
    a sensor or `audience-pipeline import` carries the delivery in its tags, and the feed profile whose
    options apply (Loymax: `<drop>/<profile>/` or `--profile`), which the import records; a manual
    re-materialization re-reports the partition's latest import and changes nothing.
    """
    service = audience_workspace.service()
    delivery, uri = _delivery(context), context.run.tags.get(TAG_SOURCE_URI)
    try:
        if delivery and uri:
            record = service.receive(context.partition_key, delivery, uri, context.run.run_id,
                                     file_name=context.run.tags.get(TAG_FILE_NAME),
                                     profile=context.run.tags.get(TAG_PROFILE),
                                     sha256_hint=context.run.tags.get(TAG_SHA256))
        else:
            record = _record(context, service)
    except ImportFailed as exc:
        raise _failure(exc.record) from None
    if record.run_id == context.run.run_id:
        context.log_event(delivery_event(record))  # this run received the delivery: the feed delivered
    if record.status == "failed":
        raise _failure(record)
    return dg.MaterializeResult(
        metadata={
            "import_id": record.import_id,
            "source_uri": record.source_uri or "",
            "file_name": record.file_name or "",
            "size_bytes": record.size_bytes or 0,
            "sha256": record.sha256 or "",
            "raw_path": lake_location(service.lake, service.lake.raw_path(record.sha256)),
            "delivery": record.delivery,
        }
    )


@dg.asset(partitions_def=audience_files, group_name="audience_import", deps=[raw_audience_file],
          kinds={"duckdb", "pandera", "parquet"}, check_specs=VALIDATION_CHECKS,
          metadata={"dagster/column_schema": VALIDATED_SCHEMA})
def validated_audience_file(context: dg.AssetExecutionContext, audience_workspace: AudienceWorkspace):
    """The file parsed into canonical rows (Parquet, with a pandera contract) plus its rejected rows.

    Rows are checked in DuckDB: identifier length and characters, the format's own rules, and resolution
    through the users registry (unregistered users are `unmatched`). A file whose share of rejected rows is
    over the feed's `max_reject_ratio`, or that is empty, binary, not UTF-8 or too large, fails the import
    with the reason; it changes no audience.
    """
    service = audience_workspace.service()
    record = _record(context, service)
    if record.status == "failed":
        raise _failure(record)
    if record.finished:
        return dg.MaterializeResult(metadata={**_counts(record), "rerun": True},
                                    check_results=_validation_checks(record.rows_total, record.rows_rejected,
                                                                     record.unmatched))
    if service.catalog.is_applied(record, service.users_sha256()):
        return dg.MaterializeResult(
            metadata={"import_id": record.import_id, "status": "identical to the applied list; not parsed"},
            check_results=_validation_checks(0, 0, 0),
        )
    try:
        summary = service.validate(record)
    except ImportFailed as exc:
        raise _failure(exc.record) from None
    return dg.MaterializeResult(
        metadata={
            "import_id": record.import_id,
            "rows": summary.rows_total,
            "valid": summary.rows_valid,
            "rejected": summary.rows_rejected,
            "unmatched": summary.unmatched,
            "audiences": ", ".join(summary.audiences),
            "rows_path": lake_location(service.lake, service.lake.validated_rows(record.import_id)),
            "users_sha256": summary.users_sha256 or "",
            "dagster/partition_row_count": summary.rows_valid,
            "dagster/column_schema": VALIDATED_SCHEMA,
        },
        check_results=_validation_checks(summary.rows_total, summary.rows_rejected, summary.unmatched),
    )


@dg.asset(partitions_def=audience_files, group_name="audience_import", deps=[validated_audience_file],
          kinds={"duckdb", "parquet"}, check_specs=DIFF_CHECKS, metadata={"dagster/column_schema": MEMBERS_SCHEMA})
def membership_diff(context: dg.AssetExecutionContext, audience_workspace: AudienceWorkspace):
    """For every audience the file names: the new member list and the qualify/disqualify sets.

    Computed in DuckDB against the audience's current list and committed atomically for all of them: the
    catalog transaction plus the re-published snapshot that analysts read. An import whose content equals
    the list currently applied is `skipped`; one over the feed's removal gate is `held` until approved or
    rejected (`audience-pipeline approve|reject`); a dry run records the diff and the verdict as `dry_run`.
    A re-run of a finished import only re-reports it. Each audience the commit changes (or the gate holds)
    is reported on its own partition of the `audience` asset.
    """
    service = audience_workspace.service()
    record = _record(context, service)
    if record.status == "failed":
        raise _failure(record)
    try:
        final = service.apply(record, dry_run=context.run.tags.get(TAG_DRY_RUN) == "true")
    except ImportFailed as exc:
        raise _failure(exc.record) from None
    context.log.info(
        f"import {final.import_id} {final.status}: +{final.qualified or 0} -{final.disqualified or 0}, "
        f"{final.members or 0} members"
    )
    if not record.finished:
        report_audiences(context, service, final)
    reason = {"reason": final.error} if final.error else {}
    return dg.MaterializeResult(metadata={**_counts(final), **reason, "rerun": record.finished},
                                check_results=_diff_checks(final))


audience_import_job = dg.define_asset_job(
    name="audience_import_job",
    description="Import one delivered audience file: raw archive, validation, diff and commit.",
    selection=[raw_audience_file, validated_audience_file, membership_diff],
    # One import is one short chain of DuckDB steps; separate step processes would only add start-up time.
    executor_def=dg.in_process_executor,
)
