import dagster as dg

from audience_pipeline.defs.audiences import report_audiences
from audience_pipeline.defs.resources import AudienceWorkspace


@dg.op
def sweep_expired_memberships(context: dg.OpExecutionContext, audience_workspace: AudienceWorkspace) -> dg.Output:
    """Remove every membership whose expires_at has passed, one import per feed, with disqualify events."""
    service = audience_workspace.service()
    records = service.sweep_expired()
    for record in records:
        context.log.info(f"expiry sweep {record.import_id} ({record.feed}): -{record.disqualified} members")
        report_audiences(context, service, record)
    return dg.Output(None, metadata={"imports": len(records),
                                     "disqualified": sum(r.disqualified or 0 for r in records)})


@dg.job(description="Write disqualify events (at each membership's expires_at) for memberships that expired "
                    "since the last sweep, as an import of its own in the activity log.")
def audience_expiry_job():
    sweep_expired_memberships()


audience_expiry_schedule = dg.ScheduleDefinition(
    name="audience_expiry_schedule",
    job=audience_expiry_job,
    cron_schedule="5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Runs the expiry sweep hourly, five minutes past the hour.",
)
