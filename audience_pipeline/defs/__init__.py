import dagster as dg

from audience_pipeline.config import Workspace, load_workspace
from audience_pipeline.defs.assets import (
    audience_import_job,
    membership_diff,
    raw_audience_file,
    validated_audience_file,
)
from audience_pipeline.defs.audiences import audience, build_silence_checks, feed_specs
from audience_pipeline.defs.eligibility import build_registry_sensor, registry_eligibility_job
from audience_pipeline.defs.expiry import audience_expiry_job, audience_expiry_schedule
from audience_pipeline.defs.lifecycle import audience_approve_job, audience_delete_job, audience_reject_job
from audience_pipeline.defs.notifications import build_freshness_sensor, import_run_failure_sensor
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.defs.retention import audience_retention_job, audience_retention_schedule
from audience_pipeline.defs.sensors import build_feed_sensor


def build_definitions(workspace: Workspace | None = None) -> dg.Definitions:
    workspace = workspace or load_workspace()
    return dg.Definitions(
        assets=[raw_audience_file, validated_audience_file, membership_diff, audience, *feed_specs(workspace)],
        asset_checks=build_silence_checks(workspace),
        jobs=[audience_import_job, audience_retention_job, audience_expiry_job, audience_delete_job,
              audience_approve_job, audience_reject_job, registry_eligibility_job],
        schedules=[audience_retention_schedule, audience_expiry_schedule],
        sensors=[
            *(build_feed_sensor(name, feed) for name, feed in sorted(workspace.config.feeds.items())),
            import_run_failure_sensor,
            build_freshness_sensor(workspace),
            build_registry_sensor(workspace),
        ],
        resources={"audience_workspace": AudienceWorkspace(config_path=str(workspace.path))},
    )
