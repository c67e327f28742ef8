"""E-mail to a feed's admins when an import fails or is held, once per import outcome.

SMTP settings come from the config (host, port, STARTTLS, sender); the login comes from environment
variables named there. Every message is recorded in the catalog before it is sent, under a key (the
import and its outcome, or the failed run), so a retried run, a re-materialization or the run-failure
sensor never sends the same news twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import smtplib
import ssl
from email.message import EmailMessage

from audience_pipeline.config import NotificationsConfig, Workspace
from audience_pipeline.storage.catalog import Catalog, ImportRecord

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, workspace: Workspace, catalog: Catalog):
        self.workspace = workspace
        self.catalog = catalog
        self.config: NotificationsConfig = workspace.config.notifications

    def recipients(self, feed: str) -> list[str]:
        return list(self.workspace.feed(feed).admins)

    def import_outcome(self, record: ImportRecord) -> bool:
        """Tell the feed's admins that an import failed or is held; False when there is nothing to send."""
        if record.status not in ("failed", "held"):
            return False
        verb = "failed" if record.status == "failed" else "is held for approval"
        subject = f"[audience_pipeline] {record.feed}: import {record.import_id} of {record.file_name} {verb}"
        lines = [
            f"Feed:      {record.feed}",
            f"File:      {record.file_name}",
            f"Source:    {record.source_uri}",
            f"Import:    {record.import_id} ({record.status})",
            f"Reason:    {record.error}",
        ]
        if record.status == "held":
            lines += [
                f"Would qualify {record.qualified} and disqualify {record.disqualified} members.",
                f"Apply it:  audience-pipeline approve {record.import_id}",
                f"Drop it:   audience-pipeline reject {record.import_id}",
            ]
        else:
            lines.append(f"Rejected rows: audience-pipeline rejects {record.import_id}")
        return self.send(f"import:{record.import_id}:{record.status}", record.feed, subject, "\n".join(lines))

    def outbox_refused(self, record: ImportRecord, reasons: list[str]) -> bool:
        """Tell the feed's admins that a succeeded import left some outbox without its file, and why; once
        per import and set of reasons, however often the import is published again."""
        digest = hashlib.sha256("\n".join(sorted(reasons)).encode()).hexdigest()[:16]
        lines = [
            f"Feed:      {record.feed}",
            f"File:      {record.file_name}",
            f"Import:    {record.import_id} ({record.status}: the audiences are updated)",
            "Not written:",
            *(f"  - {reason}" for reason in reasons),
            "The file name must be the audience id, so these audiences reach no outbox until their source "
            "names them with a name that can be a file name.",
        ]
        return self.send(f"outbox:{record.import_id}:{digest}", record.feed,
                         f"[audience_pipeline] {record.feed}: import {record.import_id} of {record.file_name} "
                         "left outbox files unwritten", "\n".join(lines))

    def eligibility_drop(self, record: ImportRecord, drops: list[str]) -> bool:
        """Tell the feed's admins that an opt-out sweep removed more than the removal gate allows (or emptied an
        audience); it is applied all the same (opt-outs are never held). Once per sweep import."""
        lines = [
            f"Feed:      {record.feed}",
            f"Import:    {record.import_id} ({record.status}: the members are removed)",
            f"Registry:  sha256 {record.users_sha256}",
            "A new version of the users registry made these members ineligible for the feed (opted out, "
            "inactive, or gone from the registry):",
            *(f"  - {drop}" for drop in drops),
            "Opt-outs are applied without approval. If the registry upload was incomplete, fix it: users eligible "
            "again come back with the feed's next file that names them.",
        ]
        return self.send(f"eligibility:{record.import_id}", record.feed,
                         f"[audience_pipeline] {record.feed}: opt-out sweep {record.import_id} removed "
                         f"{record.disqualified} members", "\n".join(lines))

    def send(self, key: str, feed: str, subject: str, body: str) -> bool:
        recipients = self.recipients(feed)
        smtp = self.config.smtp
        if not recipients or smtp is None:
            return False
        if not self.catalog.claim_notification(key):
            return False  # already sent for this outcome
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = ", ".join(recipients)
        message["Subject"] = subject
        message.set_content(body + "\n")
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_seconds) as client:
                if smtp.starttls:
                    # verify the server's certificate (against ca_file when the server uses a private CA)
                    client.starttls(context=ssl.create_default_context(cafile=smtp.ca_file))
                if smtp.username_env:
                    client.login(os.environ.get(smtp.username_env, ""), os.environ.get(smtp.password_env or "", ""))
                client.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            # the outcome is recorded in the activity log either way; a later attempt may send it
            self.catalog.release_notification(key)
            log.warning("could not send the e-mail %r: %s", subject, type(exc).__name__)
            return False
        return True

    def silence(self, feed: str, now) -> bool:
        """Alert once per silent spell when the feed has delivered nothing for max_silence_hours."""
        limit = self.workspace.feed(feed).max_silence_hours
        last = self.catalog.last_delivery(feed)
        if limit is None or last is None:
            return False
        silent_hours = (now - last).total_seconds() / 3600
        if silent_hours <= limit:
            return False
        return self.send(
            f"silence:{feed}:{last.isoformat()}", feed,
            f"[audience_pipeline] {feed}: no file for {silent_hours:.1f} hours",
            f"Feed {feed} has delivered no file since {last.isoformat()} ({silent_hours:.1f} hours; the feed "
            f"allows {limit} hours).\nA silent exporter is an incident: check the export job and the drop "
            f"location ({self.workspace.source_location(feed)}).",
        )

    def source_refused(self, feed: str, reason: str) -> bool:
        """Alert once per incident when the feed's drop location refuses us (host key, login, credentials):
        polls of it fail until someone acts. The incident lasts until a poll reads the source again."""
        return self.send(
            self._refused_key(feed), feed,
            f"[audience_pipeline] {feed}: the drop location refuses access",
            f"Feed {feed} cannot read its drop location ({self.workspace.source_location(feed)}):\n{reason}\n"
            "No file of this feed is imported until this is fixed; retrying will not help. Every poll fails "
            "until then (see the feed's sensor in the Dagster UI); no further e-mail is sent for this incident.",
        )

    def source_readable(self, feed: str) -> None:
        """The feed's drop location was read: a later refusal is a new incident, and is e-mailed again."""
        if self.recipients(feed) and self.config.smtp is not None:  # else nothing was claimed: spare the write
            self.catalog.release_notification(self._refused_key(feed))

    @staticmethod
    def _refused_key(feed: str) -> str:
        return f"source-refused:{feed}"

    def run_failure(self, feed: str, run_id: str, partition_key: str | None, reason: str) -> bool:
        """A run that failed without recording its import's outcome (a crash, an error in our code)."""
        return self.send(
            f"run:{run_id}", feed, f"[audience_pipeline] {feed}: import run {run_id} failed",
            f"Run {run_id} of the import job failed before its import could report an outcome.\n"
            f"Partition: {partition_key}\nError: {reason}\nSee the run in the Dagster UI; re-executing it is safe.",
        )
