from datetime import UTC, datetime

import dagster as dg

from audience_pipeline.config import Workspace
from audience_pipeline.defs.assets import TAG_DELIVERY, audience_import_job
from audience_pipeline.defs.resources import AudienceWorkspace


@dg.run_failure_sensor(
    name="import_run_failure_sensor",
    monitored_jobs=[audience_import_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="E-mails the feed's admins about an import run that failed without recording its outcome (a "
                "crash, an error in our code). Imports that failed or were held have already sent their own "
                "e-mail; this never sends it twice.",
)
def import_run_failure_sensor(context: dg.RunFailureSensorContext, audience_workspace: AudienceWorkspace):
    run = context.dagster_run
    partition_key = run.tags.get("dagster/partition")
    if not partition_key:
        return
    feed = partition_key.split(":", 1)[0]
    service = audience_workspace.service()
    delivery = run.tags.get(TAG_DELIVERY)
    record = (service.catalog.find_import(partition_key, delivery) if delivery
              else service.catalog.latest_import(partition_key))
    if record is not None and record.status in ("failed", "held"):
        service.notifier.import_outcome(record)  # a no-op when the import already sent it
        return
    step_errors = [_root_cause(e.event_specific_data.error) for e in context.get_step_failure_events()
                   if e.event_specific_data and e.event_specific_data.error]
    reason = "; ".join(step_errors) or (context.failure_event.message if context.failure_event else "unknown")
    service.notifier.run_failure(feed, run.run_id, partition_key, reason)


def _root_cause(error) -> str:
    """The innermost error of a step failure (Dagster wraps ours in its own execution error)."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def build_freshness_sensor(workspace: Workspace) -> dg.SensorDefinition:
    watched = sorted(name for name, feed in workspace.config.feeds.items() if feed.max_silence_hours)

    @dg.sensor(
        name="feed_silence_sensor",
        minimum_interval_seconds=3600,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Hourly: e-mails the admins of a feed that has delivered no file for longer than its "
                    f"max_silence_hours (watching: {', '.join(watched) or 'no feed'}). One e-mail per silent spell.",
    )
    def feed_silence_sensor(context: dg.SensorEvaluationContext, audience_workspace: AudienceWorkspace):
        notifier = audience_workspace.service().notifier
        now = datetime.now(UTC)
        alerted = [feed for feed in watched if notifier.silence(feed, now)]
        return dg.SkipReason(f"alerted: {', '.join(alerted)}" if alerted else "every watched feed delivered in time")

    return feed_silence_sensor
