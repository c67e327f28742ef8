"""The opt-out sweep in Dagster: a sensor on the users registry that starts a job.

A sensor of its own, not a step of the feeds' sensors: the registry is one file shared by every feed, and
its interval must be short even for a feed polled once a day (Attentive). A job, not work inside the tick:
a sweep reads every current list of a feed (16M members for a big one), longer than a sensor evaluation
may take, and as a run it shows in the UI with its counts and its failures.
"""

import dagster as dg

from audience_pipeline.config import Workspace
from audience_pipeline.defs.audiences import report_audiences
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.eligibility import EligibilitySweep

SWEEP_INTERVAL_SECONDS = 600
TAG_SWEEP_FEEDS = "audience_pipeline/sweep_feeds"


class EligibilitySweepConfig(dg.Config):
    feeds: list[str] = []  # empty: every feed that is due


@dg.op
def sweep_ineligible_members(context: dg.OpExecutionContext, config: EligibilitySweepConfig,
                             audience_workspace: AudienceWorkspace) -> dg.Output:
    """Disqualify, per feed with eligible:, the current members the users registry no longer makes eligible,
    as one import per feed with disqualify events."""
    service = audience_workspace.service()
    results = EligibilitySweep(service).sweep(config.feeds or None)
    for result in results:
        if result.failed:
            context.log.error(f"{result.feed}: opt-out sweep {result.record.import_id} failed: {result.record.error}")
            continue
        if result.record is None:
            context.log.info(f"{result.feed}: every member is eligible under registry {result.users_sha256[:12]}")
            continue
        context.log.info(f"{result.feed}: opt-out sweep {result.record.import_id} disqualified "
                         f"{result.record.disqualified} members (registry {result.users_sha256[:12]})")
        report_audiences(context, service, result.record)
        for drop in result.large_drops:
            context.log.warning(f"{result.feed}: large drop, admins e-mailed: {drop}")
    failed = [r for r in results if r.failed]
    if failed:
        # the sweep is not recorded, so the sensor asks for it again at its next tick
        raise dg.Failure(description="; ".join(f"{r.feed}: import {r.record.import_id} failed: {r.record.error}"
                                               for r in failed))
    return dg.Output(None, metadata={
        "feeds": len(results),
        "imports": sum(1 for r in results if r.record is not None),
        "disqualified": sum(r.record.disqualified or 0 for r in results if r.record is not None),
    })


@dg.job(description="Disqualify the members a new users registry version makes ineligible (opted out, inactive, "
                    "gone) for the feeds with eligible:, as an import of their own per feed with disqualify "
                    "events. Same as `audience-pipeline registry sweep`.")
def registry_eligibility_job():
    sweep_ineligible_members()


def sweep_interval(workspace: Workspace) -> int:
    """Within one poll interval of every feed with eligible:, and at most SWEEP_INTERVAL_SECONDS."""
    intervals = [feed.poll_seconds for feed in workspace.config.feeds.values() if feed.eligible]
    return min([SWEEP_INTERVAL_SECONDS, *intervals])


def build_registry_sensor(workspace: Workspace) -> dg.SensorDefinition:
    interval = sweep_interval(workspace)

    @dg.sensor(
        name="users_registry_sensor",
        job=registry_eligibility_job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Every {interval} s: when the users registry has a new version (its sha256), starts "
                    "registry_eligibility_job for the feeds with eligible: whose members were not swept against "
                    "it, so opt-outs leave their audiences within one interval. One run at a time; a failed run "
                    "is asked for again at the next tick.",
    )
    def users_registry_sensor(context: dg.SensorEvaluationContext, audience_workspace: AudienceWorkspace):
        due = EligibilitySweep(audience_workspace.service()).due()
        if not due:
            return dg.SkipReason("every feed with eligible: is swept against the current registry")
        in_flight = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=registry_eligibility_job.name, statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]),
            limit=1,
        )
        if in_flight:
            return dg.SkipReason(f"sweep run {in_flight[0].run_id} is still going")
        feeds = sorted(due)
        return dg.RunRequest(
            run_config={"ops": {"sweep_ineligible_members": {"config": {"feeds": feeds}}}},
            tags={TAG_SWEEP_FEEDS: ",".join(feeds)},
        )

    return users_registry_sensor
