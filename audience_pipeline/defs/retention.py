import dagster as dg

from audience_pipeline.defs.assets import audience_files
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.retention import run_retention


@dg.op
def apply_retention(context: dg.OpExecutionContext, audience_workspace: AudienceWorkspace) -> dg.Output:
    """Delete aged-out member-list versions, raw files, validated rows and import partitions."""
    service = audience_workspace.service()
    report = run_retention(service.workspace, service.catalog)
    existing = set(context.instance.get_dynamic_partitions(audience_files.name))
    dropped = [key for key in report.partitions if key in existing]
    for key in dropped:
        context.instance.delete_dynamic_partition(audience_files.name, key)
    context.log.info(
        f"removed {report.versions} member-list versions, {report.raw_files} raw files, "
        f"{report.validated} validated files, {report.staging} staging leftovers, {len(dropped)} partitions"
    )
    return dg.Output(
        None,
        metadata={"versions": report.versions, "raw_files": report.raw_files, "validated": report.validated,
                  "staging": report.staging, "partitions": len(dropped)},
    )


@dg.job(description="Remove what has aged out of the lake, the raw archive and the import partitions; the "
                    "activity log, events, rejected rows and everything the current lists need stay.")
def audience_retention_job():
    apply_retention()


audience_retention_schedule = dg.ScheduleDefinition(
    name="audience_retention_schedule",
    job=audience_retention_job,
    cron_schedule="17 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Runs the retention job daily at 03:17 UTC.",
)
