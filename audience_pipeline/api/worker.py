"""Imports of the server's uploads, one at a time, on a worker thread: each is a run of the import job on the
workspace's Dagster instance (through the Runner), so it shows in the Dagster UI beside the sensors' runs.

An upload is its own delivery (``api:<upload id>``): the run of an upload that a stopped server left
received or running is started again at the next start, and the importer returns the import it already
finished rather than applying the file twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import dagster as dg

from audience_pipeline.api.store import Upload, UploadStore
from audience_pipeline.defs.assets import TAG_FILE_NAME, TAG_ORIGIN, TAG_PROFILE
from audience_pipeline.keys import partition_key
from audience_pipeline.polling import profile_delivery
from audience_pipeline.runner import Runner, RunNotRecorded
from audience_pipeline.storage.catalog import ImportRecord

log = logging.getLogger(__name__)

TAG_UPLOAD = "audience_pipeline/upload"  # the upload server's id of the upload a run imports


def delivery_of(upload: Upload) -> str:
    return profile_delivery(upload.profile, f"api:{upload.id}")


def outcome(record: ImportRecord, reason: str | None) -> dict:
    """What the server reports of a finished run's import."""
    return {
        "import_id": record.import_id,
        "status": record.status,
        "file_name": record.file_name,
        # None where the import did not get so far (a file refused as a whole has no row counts)
        "rows": record.rows_total,
        "valid": record.rows_valid,
        "rejected": record.rows_rejected,
        "duplicates": record.duplicates,
        "unmatched": record.unmatched,
        "qualified": record.qualified,
        "disqualified": record.disqualified,
        "members": record.members,
        "audiences": record.audiences or [],
        "error": reason or record.error,
        "run_id": record.run_id,
    }


class ImportWorker:
    def __init__(self, runner: Runner, store: UploadStore):
        self.runner = runner
        self.store = store
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="audience-pipeline-imports", daemon=True)

    def start(self) -> None:
        for upload_id in self.store.unfinished():
            self._close_cut_off_runs(upload_id)
            self._queue.put(upload_id)
        self._thread.start()

    def _close_cut_off_runs(self, upload_id: int) -> None:
        """A run of this process that a stop cut off stays 'started' in the instance (no daemon watches
        in-process runs), or 'not started' when the stop fell between the run's creation and its start: mark it
        failed, so the UI shows it ended and that the upload runs again."""
        instance = self.runner.instance
        for record in instance.get_run_records(filters=dg.RunsFilter(
                tags={TAG_UPLOAD: str(upload_id)},
                statuses=[dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                          dg.DagsterRunStatus.STARTED])):
            instance.report_run_failed(record.dagster_run, message=(
                f"the upload server stopped during this run; upload {upload_id} is imported again by a new run"))

    def stop(self) -> None:
        """Let the worker end after its current import; a run cut off by the process's exit is started again
        by the next server (same delivery), and its import taken over."""
        self._queue.put(None)
        self._thread.join(timeout=1)

    def submit(self, upload_id: int) -> None:
        self._queue.put(upload_id)

    def _loop(self) -> None:
        while (upload_id := self._queue.get()) is not None:
            upload = self.store.get(upload_id)
            if upload is None or upload.state in ("finished", "not_recorded"):
                continue
            try:
                self._import(upload)
            except Exception as exc:  # the server keeps serving; the upload reports why
                log.exception("upload %s: the import failed", upload_id)
                self.store.mark_done(upload_id, "not_recorded", None, None, f"{type(exc).__name__}: {exc}")

    def _import(self, upload: Upload) -> None:
        if upload.state == "running":
            log.info("upload %s: its run was cut off (the server stopped): running it again", upload.id)
        self.store.mark_running(upload.id)
        staged = Path(upload.staged)
        tags = {TAG_FILE_NAME: upload.file_name, TAG_ORIGIN: "api", TAG_UPLOAD: str(upload.id),
                **({TAG_PROFILE: upload.profile} if upload.profile else {})}
        pkey = partition_key(upload.feed, upload.file_name, upload.sha256)
        try:
            record = self.runner.run(pkey, delivery_of(upload), staged.resolve().as_uri(), tags)
        except RunNotRecorded as exc:
            log.warning("upload %s: %s", upload.id, exc)
            self.store.mark_done(upload.id, "not_recorded", None, None, str(exc))
        else:
            reason = self.runner.reasons.pop(record.import_id, None)
            log.info("upload %s: import %s %s%s", upload.id, record.import_id, record.status,
                     f" ({reason or record.error})" if reason or record.error else "")
            self.store.mark_done(upload.id, "finished", record.import_id, outcome(record, reason), None)
        # the raw archive holds the bytes now (or the import failed before it could)
        staged.unlink(missing_ok=True)
