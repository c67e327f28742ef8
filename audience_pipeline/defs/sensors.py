from datetime import UTC, datetime, timedelta

import dagster as dg

from audience_pipeline.config import FeedConfig
from audience_pipeline.cursor import Cursor
from audience_pipeline.defs.assets import (
    TAG_ATTEMPT,
    TAG_DELIVERY,
    TAG_DRY_RUN,
    TAG_FEED,
    TAG_FILE_NAME,
    TAG_ORIGIN,
    TAG_PROFILE,
    TAG_SOURCE_URI,
    audience_files,
    audience_import_job,
)
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.model import ImportStatus
from audience_pipeline.polling import poll_feed
from audience_pipeline.sources import SourceError, SourceRefused


def build_feed_sensor(feed_name: str, feed: FeedConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{feed_name}_audience_sensor",
        description=(
            f"Polls the {feed_name!r} feed's drop location ({feed.format} files) every "
            f"{feed.poll_seconds} s and requests one import run per new file version. Deleted "
            "files leave their audience as it was."
        ),
        job=audience_import_job,
        minimum_interval_seconds=feed.poll_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _sensor(context: dg.SensorEvaluationContext, audience_workspace: AudienceWorkspace):
        workspace = audience_workspace.workspace()
        try:
            source = audience_workspace.source(feed_name)
            try:
                result = poll_feed(feed_name, workspace.feed(feed_name), source, Cursor.loads(context.cursor))
            finally:
                source.close()
        except SourceError as exc:
            # Raised, not skipped: a skip reads as "no new files", and an unreadable source must fail the tick
            # visibly (and the CLI's exit status). Only a refusal needs a person, so only it is e-mailed.
            if isinstance(exc, SourceRefused):
                try:
                    audience_workspace.service().notifier.source_refused(feed_name, str(exc))
                except Exception as notify_exc:
                    # a catalog or mail fault must not replace the reason the tick fails with
                    context.log.warning(f"could not e-mail the admins of {feed_name}: {notify_exc}")
            raise
        else:
            audience_workspace.service().notifier.source_readable(feed_name)
        if result.anomaly:
            context.log.warning(result.anomaly)
        for key in result.ignored:
            context.log.debug(f"ignored {key}: not a {feed.format} file")
        for key in result.vanished:
            context.log.info(f"{key} disappeared before it could be read; its audience is unchanged")
        if result.backlog:
            context.log.info(f"{result.backlog} more new files wait for the next tick")
        listed = {(d.partition_key, d.delivery) for d in result.deliveries}
        # a delivery listed again (a poll killed before it kept its cursor) is asked for once
        retries = [r for r in _retry_requests(context, feed_name, audience_workspace)
                   if (r.partition_key, r.tags[TAG_DELIVERY]) not in listed]
        if not result.deliveries and not retries:
            return dg.SensorResult(skip_reason=f"no new files among {result.listed} listed",
                                   cursor=result.cursor.dumps())
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=d.run_key,
                    partition_key=d.partition_key,
                    tags={TAG_DELIVERY: d.delivery, TAG_SOURCE_URI: d.source_uri, TAG_FEED: feed_name,
                          **({TAG_DRY_RUN: "true"} if d.dry_run else {}),
                          **({TAG_PROFILE: d.profile} if d.profile else {}),
                          **({TAG_FILE_NAME: d.key} if d.delivery.startswith("parts:") else {})},
                )
                for d in result.deliveries
            ] + retries,
            dynamic_partitions_requests=[
                audience_files.build_add_request(sorted({d.partition_key for d in result.deliveries}))
            ] if result.deliveries else [],
            cursor=result.cursor.dumps(),
        )

    return _sensor


MAX_ATTEMPTS = 5
RETRY_WINDOW_SECONDS = 86400


def _retry_requests(context: dg.SensorEvaluationContext, feed_name: str,
                    audience_workspace: AudienceWorkspace) -> list[dg.RunRequest]:
    """Ask again for deliveries whose latest run failed before recording an import (the source was
    unreachable or cut the download), or whose import was abandoned (the process running it died): the
    cursor has moved past them, so nothing else would. A retry carries every tag of the run it retries,
    the dry-run flag included. Runs of the CLI are not retried: the CLI reports its own failures."""
    catalog = audience_workspace.service().catalog
    for record in catalog.abandon_dead(feed_name, f"the {feed_name} sensor"):
        context.log.warning(f"import {record.import_id} ({record.file_name}): {record.error}")
    failed = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=audience_import_job.name, statuses=[dg.DagsterRunStatus.FAILURE],
                              tags={TAG_FEED: feed_name},
                              updated_after=datetime.now(UTC) - timedelta(seconds=RETRY_WINDOW_SECONDS)),
        limit=100,
    )
    candidates = [(run.tags.get("dagster/partition"), run.tags.get(TAG_DELIVERY)) for run in failed]
    candidates += [(r.partition_key, r.delivery) for r in catalog.abandoned_imports(feed_name)]
    requests, seen = [], set()
    for partition, delivery in candidates:
        if not partition or not delivery or (partition, delivery) in seen:
            continue
        seen.add((partition, delivery))
        record = catalog.find_import(partition, delivery)
        if record is not None and record.status != ImportStatus.ABANDONED:
            continue  # the import recorded its outcome (failures of files are not retried) or is running
        latest = context.instance.get_runs(
            filters=dg.RunsFilter(tags={"dagster/partition": partition, TAG_DELIVERY: delivery}), limit=1)
        if not latest or latest[0].tags.get(TAG_ORIGIN) == "cli":
            continue
        run = latest[0]
        if record is None and run.status != dg.DagsterRunStatus.FAILURE:
            continue  # a later attempt is queued or running
        attempt = int(run.tags.get(TAG_ATTEMPT, "1"))
        if attempt >= MAX_ATTEMPTS:
            continue
        context.log.info(f"retrying {partition} ({delivery}), attempt {attempt + 1}")
        tags = {k: v for k, v in run.tags.items() if not k.startswith(("dagster/", ".dagster/"))}
        requests.append(dg.RunRequest(
            run_key=f"{partition}|{delivery}|attempt:{attempt + 1}", partition_key=partition,
            tags={**tags, TAG_FEED: feed_name, TAG_ATTEMPT: str(attempt + 1)},
        ))
    return requests
