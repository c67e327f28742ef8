"""Running imports and sensor evaluations in this process, against the workspace's Dagster instance,
so that CLI runs appear in the Dagster UI beside the daemon's."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from audience_pipeline.config import Workspace
from audience_pipeline.defs import build_definitions
from audience_pipeline.defs.assets import TAG_DELIVERY, TAG_DRY_RUN, TAG_FILE_NAME, TAG_SOURCE_URI, audience_files
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.hashing import sha256_file
from audience_pipeline.keys import partition_key
from audience_pipeline.storage.catalog import ImportRecord
from audience_pipeline.workspace_setup import prepare

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _failure_reason(result) -> str:
    for event in reversed(result.all_events):
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            return error.message.strip()
    return "see the run in the Dagster UI"


class RunNotRecorded(RuntimeError):
    """The run failed before its import existed (the source could not be read)."""


def instance_for(workspace: Workspace) -> dg.DagsterInstance:
    """DAGSTER_HOME when set, else the workspace folder (where `init` writes dagster.yaml).

    The workspace's dagster.yaml keeps instance storage under data/ with relative paths, which Dagster
    resolves against the working directory, so the process works from the workspace folder.
    """
    os.environ.setdefault("DAGSTER_HOME", str(workspace.root))
    os.chdir(workspace.root)
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def sensor_context(workspace: Workspace, instance: dg.DagsterInstance, defs: dg.Definitions,
                   cursor: str | None) -> dg.SensorEvaluationContext:
    """A context for evaluating a feed sensor outside the daemon, with the workspace resource bound."""
    return dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={"audience_workspace": AudienceWorkspace(config_path=str(workspace.path))},
    )


@dataclass
class Runner:
    workspace: Workspace
    instance: dg.DagsterInstance
    quiet: bool = True

    def __post_init__(self) -> None:
        self.unrecorded: list[str] = []
        self.defs = build_definitions(self.workspace)
        self.resource = AudienceWorkspace(config_path=str(self.workspace.path))
        self.service = self.resource.service()
        prepare(self.workspace, self.service.lake)

    def run(self, pkey: str, delivery: str, source_uri: str, extra_tags: dict | None = None) -> ImportRecord:
        self.instance.add_dynamic_partitions(audience_files.name, [pkey])
        job = self.defs.resolve_job_def("audience_import_job")
        result = job.execute_in_process(
            partition_key=pkey,
            instance=self.instance,
            tags={TAG_DELIVERY: delivery, TAG_SOURCE_URI: source_uri, **(extra_tags or {})},
            run_config=QUIET_RUN_CONFIG if self.quiet else None,
            raise_on_error=False,
        )
        record = self.service.catalog.find_import(pkey, delivery)
        if record is None:
            raise RunNotRecorded(f"the run for {pkey} failed before its import was recorded: "
                                 f"{_failure_reason(result)}")
        return record

    def import_file(self, feed: str, path: Path, dry_run: bool = False) -> ImportRecord:
        """A delivery by hand: always a new delivery, so identical content is reported as skipped."""
        self.workspace.feed(feed)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        pkey = partition_key(feed, path.name, sha256_file(path))
        return self.run(pkey, f"cli:{uuid.uuid4().hex}", path.resolve().as_uri(),
                        {TAG_DRY_RUN: "true"} if dry_run else None)

    def reimport(self, import_id: int) -> ImportRecord:
        """Apply the list of an earlier import again (a rollback), as a new import that passes the gate."""
        earlier = self.service.catalog.get_import(import_id)
        if earlier.sha256 is None:
            raise ValueError(f"import {import_id} has no archived file to import again")
        raw = self.service.lake.raw_path(earlier.sha256)
        if not self.service.lake.fetch(raw):
            raise ValueError(f"the raw file of import {import_id} is no longer archived (retention)")
        return self.run(earlier.partition_key, f"reimport:{import_id}:{uuid.uuid4().hex}", raw.resolve().as_uri(),
                        {TAG_FILE_NAME: earlier.file_name})

    def poll(self, feed: str) -> list[ImportRecord]:
        """One evaluation of the feed's sensor, and the runs it asks for. The cursor is the one this
        command keeps in the catalog; deliveries are identified by file version, so a daemon that also
        polls the same folder re-reports rather than re-applies what this imported."""
        sensor = self.defs.resolve_sensor_def(f"{feed}_audience_sensor")
        cursor = self.service.catalog.get_cursor(feed)
        context = sensor_context(self.workspace, self.instance, self.defs, cursor)
        result = sensor(context)
        records = []
        if isinstance(result, dg.SensorResult):
            for request in result.run_requests or []:
                extra = {k: v for k, v in request.tags.items() if k not in (TAG_DELIVERY, TAG_SOURCE_URI)}
                try:
                    records.append(self.run(request.partition_key, request.tags[TAG_DELIVERY],
                                            request.tags[TAG_SOURCE_URI], extra))
                except RunNotRecorded as exc:
                    self.unrecorded.append(str(exc))  # a later poll asks for it again
            if result.cursor is not None:
                self.service.catalog.set_cursor(feed, result.cursor)
        return records
