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
from audience_pipeline.defs.assets import (
    TAG_DELIVERY,
    TAG_DRY_RUN,
    TAG_FEED,
    TAG_FILE_NAME,
    TAG_ORIGIN,
    TAG_PROFILE,
    TAG_SHA256,
    TAG_SOURCE_URI,
    audience_files,
)
from audience_pipeline.defs.resources import AudienceWorkspace
from audience_pipeline.hashing import sha256_file
from audience_pipeline.keys import parse_partition_key, partition_key
from audience_pipeline.polling import profile_delivery
from audience_pipeline.storage.catalog import ImportRecord
from audience_pipeline.workspace_setup import prepare

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


# Errors a later attempt may not meet: a busy audience or catalog, a source that did not answer.
RETRY_LATER_ERRORS = ("CatalogBusy", "SourceTransient")


def _failure(result) -> tuple[str, str | None]:
    """The root cause of a failed run: its message and the class of the error."""
    for event in reversed(result.all_events):
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            return error.message.strip(), error.cls_name
    return "see the run in the Dagster UI", None


class RunNotRecorded(RuntimeError):
    """The run failed before its import existed (the source could not be read, or the delivery was busy)."""

    def __init__(self, message: str, retry_later: bool):
        super().__init__(message)
        self.retry_later = retry_later


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
    log_level: str = "INFO"  # of the run's console log when not quiet (the CLI's -v, -vv)

    def __post_init__(self) -> None:
        self.unrecorded: list[RunNotRecorded] = []
        self.reasons: dict[int, str] = {}  # why a run ended with its import unfinished
        self.defs = build_definitions(self.workspace)
        self.resource = AudienceWorkspace(config_path=str(self.workspace.path))
        self.service = self.resource.service()
        prepare(self.workspace, self.service.lake)

    def run(self, pkey: str, delivery: str, source_uri: str, extra_tags: dict | None = None) -> ImportRecord:
        self.instance.add_dynamic_partitions(audience_files.name, [pkey])
        job = self.defs.resolve_job_def("audience_import_job")
        catalog = self.service.catalog
        try:
            result = job.execute_in_process(
                partition_key=pkey,
                instance=self.instance,
                tags={TAG_DELIVERY: delivery, TAG_SOURCE_URI: source_uri, TAG_FEED: parse_partition_key(pkey)[0],
                      **(extra_tags or {})},
                run_config=QUIET_RUN_CONFIG if self.quiet else {
                    "loggers": {"console": {"config": {"log_level": self.log_level}}}},
                raise_on_error=False,
            )
        finally:
            # the run is over: an import it left unfinished has no live holder now, and is abandoned
            catalog.let_go(pkey, delivery)
        record = catalog.find_import(pkey, delivery)
        if record is None:
            reason, error_class = _failure(result)
            raise RunNotRecorded(f"the run for {pkey} failed before its import was recorded: {reason}",
                                 retry_later=error_class in RETRY_LATER_ERRORS)
        if not record.finished:
            reason = _failure(result)[0] if not result.success else "the run ended before the import did"
            self.reasons[record.import_id] = f"run {result.run_id}: {reason}"
        return record

    def import_file(self, feed: str, path: Path, dry_run: bool = False, profile: str | None = None) -> ImportRecord:
        """A delivery by hand: always a new delivery, so identical content is reported as skipped. ``profile``:
        one of the feed's profiles, as if the file had landed in ``<drop>/<profile>/`` (ConfigError if the
        feed has no such profile, before anything runs)."""
        self.workspace.feed(feed).for_profile(profile)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        sha256 = sha256_file(path)
        pkey = partition_key(feed, path.name, sha256)
        return self.run(pkey, profile_delivery(profile, f"cli:{uuid.uuid4().hex}"), path.resolve().as_uri(),
                        {TAG_ORIGIN: "cli", TAG_SHA256: sha256, **({TAG_DRY_RUN: "true"} if dry_run else {}),
                         **({TAG_PROFILE: profile} if profile else {})})

    def reimport(self, import_id: int) -> ImportRecord:
        """Apply the list of an earlier import again (a rollback), as a new import that passes the gate."""
        earlier = self.service.catalog.get_import(import_id)
        if earlier.sha256 is None:
            raise ValueError(f"import {import_id} has no archived file to import again")
        raw = self.service.lake.raw_path(earlier.sha256)
        if not self.service.lake.fetch(raw):
            raise ValueError(f"the raw file of import {import_id} is no longer archived (retention)")
        # read as it was the first time: a removal file re-imported without its profile would add
        delivery = profile_delivery(earlier.profile, f"reimport:{import_id}:{uuid.uuid4().hex}")
        return self.run(earlier.partition_key, delivery, raw.resolve().as_uri(),
                        {TAG_FILE_NAME: earlier.file_name, TAG_ORIGIN: "cli",
                         **({TAG_PROFILE: earlier.profile} if earlier.profile else {})})

    def decide(self, import_id: int, approve: bool) -> ImportRecord:
        """Approve or reject a held import through its Dagster job, so that the decision, and the audiences it
        changes, show in the Dagster UI. An error (the import is not held) is raised as it was raised."""
        self.service.held(import_id)  # an operator's slip (no such import, not held) is not a failed run
        job, op = ("audience_approve_job", "approve_import") if approve else ("audience_reject_job", "reject_import")
        run_config = {"ops": {op: {"config": {"import_id": import_id}}}, **(QUIET_RUN_CONFIG if self.quiet else {})}
        try:
            self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, run_config=run_config)
        except dg.DagsterExecutionStepExecutionError as exc:
            raise exc.__cause__ or exc from None
        return self.service.catalog.get_import(import_id)

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
                    self.unrecorded.append(exc)  # a later poll asks for it again
            if result.cursor is not None:
                self.service.catalog.set_cursor(feed, result.cursor)
        return records
