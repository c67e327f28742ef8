import dagster as dg

from audience_pipeline.config import FeedConfig
from audience_pipeline.cursor import Cursor
from audience_pipeline.defs.assets import (
    TAG_DELIVERY,
    TAG_DRY_RUN,
    TAG_SOURCE_URI,
    audience_files,
    audience_import_job,
)
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.polling import poll_feed
from audience_pipeline.sources import SourceError


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
            return dg.SkipReason(f"drop location not readable: {exc}")
        if result.anomaly:
            context.log.warning(result.anomaly)
        for key in result.ignored:
            context.log.debug(f"ignored {key}: not a {feed.format} file")
        for key in result.vanished:
            context.log.info(f"{key} disappeared before it could be read; its audience is unchanged")
        if result.backlog:
            context.log.info(f"{result.backlog} more new files wait for the next tick")
        if not result.deliveries:
            return dg.SensorResult(skip_reason=f"no new files among {result.listed} listed",
                                   cursor=result.cursor.dumps())
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=d.run_key,
                    partition_key=d.partition_key,
                    tags={TAG_DELIVERY: d.delivery, TAG_SOURCE_URI: d.source_uri,
                          **({TAG_DRY_RUN: "true"} if d.dry_run else {})},
                )
                for d in result.deliveries
            ],
            dynamic_partitions_requests=[
                audience_files.build_add_request(sorted({d.partition_key for d in result.deliveries}))
            ],
            cursor=result.cursor.dumps(),
        )

    return _sensor
