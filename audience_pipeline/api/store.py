"""The upload server's own state, in a small SQLite file (``api.database``): mediarithmics document imports,
uploads with the import each became, and the Idempotency-Keys that make a retried upload the same upload.

The catalog stays the record of imports; an upload row keeps the import's id and the outcome the server
reported, so a status request never waits on the catalog while another import holds it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS document_imports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    datamart_id TEXT NOT NULL,
    feed TEXT NOT NULL,
    client TEXT NOT NULL,
    name TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    encoding TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feed TEXT NOT NULL,
    file_name TEXT NOT NULL,
    profile TEXT,
    client TEXT NOT NULL,
    idempotency_key TEXT,
    document_import_id INTEGER REFERENCES document_imports (id),
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    staged TEXT NOT NULL,
    state TEXT NOT NULL,
    import_id INTEGER,
    outcome TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    UNIQUE (client, idempotency_key)
);
"""

INSERT_DOCUMENT_IMPORT = """
INSERT INTO document_imports (datamart_id, feed, client, name, mime_type, encoding, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"""
SELECT_DOCUMENT_IMPORT = "SELECT * FROM document_imports WHERE id = ? AND datamart_id = ?"
INSERT_UPLOAD = """
INSERT INTO uploads (feed, file_name, profile, client, idempotency_key, document_import_id, sha256, size_bytes,
                     staged, state, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?) RETURNING id"""
SELECT_UPLOAD = "SELECT * FROM uploads WHERE id = ?"
SELECT_UPLOAD_BY_KEY = "SELECT * FROM uploads WHERE client = ? AND idempotency_key = ?"
SELECT_UNFINISHED = "SELECT id FROM uploads WHERE state IN ('received', 'running') ORDER BY id"
MARK_RUNNING = "UPDATE uploads SET state = 'running', started_at = ? WHERE id = ?"
MARK_DONE = "UPDATE uploads SET state = ?, import_id = ?, outcome = ?, error = ?, finished_at = ? WHERE id = ?"

# upload states: received (stored, waiting for its run), running, finished (its import has a catalog record),
# not_recorded (the run failed before the import existed)
STATES = ("received", "running", "finished", "not_recorded")


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Upload:
    id: int
    feed: str
    file_name: str
    profile: str | None
    client: str
    idempotency_key: str | None
    document_import_id: int | None
    sha256: str
    size_bytes: int
    staged: str
    state: str
    import_id: int | None
    outcome: dict | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class IdempotencyConflict(ValueError):
    """An Idempotency-Key already names an upload of other content or to another target."""


class UploadStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._con.row_factory = sqlite3.Row
        self._con.execute("PRAGMA journal_mode = WAL")
        self._con.executescript(SCHEMA)

    def close(self) -> None:
        self._con.close()

    def add_document_import(self, datamart_id: str, feed: str, client: str, name: str, mime_type: str,
                            encoding: str) -> dict:
        with self._lock:
            (new_id,) = self._con.execute(INSERT_DOCUMENT_IMPORT, [datamart_id, feed, client, name, mime_type,
                                                                   encoding, _now()]).fetchone()
            return dict(self._con.execute(SELECT_DOCUMENT_IMPORT, [new_id, datamart_id]).fetchone())

    def document_import(self, document_import_id: int, datamart_id: str) -> dict | None:
        with self._lock:
            row = self._con.execute(SELECT_DOCUMENT_IMPORT, [document_import_id, datamart_id]).fetchone()
        return dict(row) if row else None

    def by_key(self, client: str, key: str) -> Upload | None:
        with self._lock:
            row = self._con.execute(SELECT_UPLOAD_BY_KEY, [client, key]).fetchone()
        return _upload(row)

    def add_upload(self, feed: str, file_name: str, profile: str | None, client: str, key: str | None,
                   document_import_id: int | None, sha256: str, size_bytes: int, staged: Path) -> tuple[Upload, bool]:
        """The new upload and True; or, for a key already used by this client, that upload and False."""
        with self._lock:
            try:
                (new_id,) = self._con.execute(INSERT_UPLOAD, [
                    feed, file_name, profile, client, key, document_import_id, sha256, size_bytes, str(staged),
                    _now()]).fetchone()
            except sqlite3.IntegrityError:
                row = self._con.execute(SELECT_UPLOAD_BY_KEY, [client, key]).fetchone()
                earlier = _upload(row)
                same = (earlier.feed, earlier.file_name, earlier.profile, earlier.document_import_id,
                        earlier.sha256) == (feed, file_name, profile, document_import_id, sha256)
                if not same:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {key!r} was used for upload {earlier.id} of other content or to another "
                        "target: use a new key for a new upload") from None
                return earlier, False
            return _upload(self._con.execute(SELECT_UPLOAD, [new_id]).fetchone()), True

    def get(self, upload_id: int) -> Upload | None:
        with self._lock:
            return _upload(self._con.execute(SELECT_UPLOAD, [upload_id]).fetchone())

    def unfinished(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._con.execute(SELECT_UNFINISHED).fetchall()]

    def mark_running(self, upload_id: int) -> None:
        with self._lock:
            self._con.execute(MARK_RUNNING, [_now(), upload_id])

    def mark_done(self, upload_id: int, state: str, import_id: int | None, outcome: dict | None,
                  error: str | None) -> None:
        with self._lock:
            self._con.execute(MARK_DONE, [state, import_id, json.dumps(outcome) if outcome else None, error,
                                          _now(), upload_id])


def _upload(row) -> Upload | None:
    if row is None:
        return None
    values = dict(row)
    values["outcome"] = json.loads(values["outcome"]) if values["outcome"] else None
    return Upload(**values)
