from datetime import UTC, datetime

import dagster as dg

from audience_pipeline.config import Workspace
from audience_pipeline.defs.assets import TAG_DELIVERY, audience_import_job
from audience_pipeline.defs.audiences import silence_evaluation
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.importer import ImportService


# No monitored_jobs: the sensor watches every job of the code location, those added later included.
@dg.run_failure_sensor(
    name="import_run_failure_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="E-mails the admins about any run of this code location that failed: an import run that failed "
                "without recording its outcome (a crash, an error in our code) goes to its feed's admins; a "
                "failed retention, expiry, approve, reject, delete or opt-out sweep run goes to the admins of "
                "the feeds it concerns (every feed for a sweep of all). Imports that failed or were held have "
                "already sent their own e-mail; this never sends it twice.",
)
def import_run_failure_sensor(context: dg.RunFailureSensorContext, audience_workspace: AudienceWorkspace):
    run = context.dagster_run
    service = audience_workspace.service()
    step_errors = [_root_cause(e.event_specific_data.error) for e in context.get_step_failure_events()
                   if e.event_specific_data and e.event_specific_data.error]
    reason = "; ".join(step_errors) or (context.failure_event.message if context.failure_event else "unknown")
    if run.job_name != audience_import_job.name:
        for feed in _feeds_of(run, service):
            service.notifier.send(
                f"run:{run.run_id}:{feed}", feed, f"[audience_pipeline] {feed}: {run.job_name} run {run.run_id} failed",
                f"Run {run.run_id} of {run.job_name} failed.\nError: {reason}\nSee the run in the Dagster UI.")
        return
    partition_key = run.tags.get("dagster/partition")
    if not partition_key:
        return
    feed = partition_key.split(":", 1)[0]
    delivery = run.tags.get(TAG_DELIVERY)
    record = (service.catalog.find_import(partition_key, delivery) if delivery
              else service.catalog.latest_import(partition_key))
    if record is not None and record.status in ("failed", "held"):
        service.notifier.import_outcome(record)  # a no-op when the import already sent it
        return
    service.notifier.run_failure(feed, run.run_id, partition_key, reason)


def _feeds_of(run: dg.DagsterRun, service: ImportService) -> list[str]:
    """The feeds a failed run of another job concerns, read from its run config; every feed when it names
    none (retention, expiry, a sweep of all feeds)."""
    feeds = service.workspace.config.feeds
    for op in (run.run_config or {}).get("ops", {}).values():
        config = op.get("config", {}) if isinstance(op, dict) else {}
        if config.get("feed") in feeds:
            return [config["feed"]]
        if config.get("feeds"):
            return [f for f in config["feeds"] if f in feeds]
        if "import_id" in config:
            try:
                return [service.catalog.get_import(int(config["import_id"])).feed]
            except (LookupError, ValueError):
                break
    return sorted(feeds)


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
        service = audience_workspace.service()
        now = datetime.now(UTC)
        for feed in watched:
            # the feed's freshness in the UI, beside the e-mail
            context.instance.report_runless_asset_event(silence_evaluation(service, feed, now))
        alerted = [feed for feed in watched if service.notifier.silence(feed, now)]
        return dg.SkipReason(f"alerted: {', '.join(alerted)}" if alerted else "every watched feed delivered in time")

    return feed_silence_sensor
