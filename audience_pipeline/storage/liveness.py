"""Who is working on an import, and whether that process is still alive.

A process that works on an import holds a lock tied to its own life, so a crash (SIGKILL, OOM kill, lost
node) frees the import at once instead of after a lease, and a live holder is never taken over however
long its diff runs:

- DuckDB catalog (one machine): an ``flock`` on a file per import in progress, beside the catalog file.
  The kernel drops it when the process dies, however it dies.
- PostgreSQL catalog (several nodes): a session advisory lock on a connection the holder keeps open. A
  process that dies closes its socket, so the server ends its session and the lock with it; a node that
  is lost stops answering the server's TCP keepalives, which end the session within the liveness timeout.

Locks are keyed by the delivery (partition key and delivery id), known before its import row exists, so
that there is no moment where a new import is in the catalog without a live holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Protocol

HOST = socket.gethostname()


def holder_key(partition_key: str, delivery: str) -> int:
    """A positive 62-bit key for the delivery (a PostgreSQL advisory lock takes a bigint)."""
    digest = hashlib.sha256(f"{partition_key}\0{delivery}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def describe_holder(run_id: str | None) -> str:
    """How a holder names itself in the catalog: enough to find its run, its process and its machine."""
    return f"run {run_id or '-'}, pid {os.getpid()} on {HOST}"


class Hold(Protocol):
    def release(self) -> None: ...


class _FileHold:
    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        # unlinked while still locked, so that no other process can lock the old inode after us
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


class FileLiveness:
    """flock files in one folder; only processes of one machine share a DuckDB catalog."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: int) -> Path:
        return self.folder / f"{key:016x}.lock"

    def try_hold(self, key: int) -> Hold | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _same_file(fd, path):
                return _FileHold(fd, path)
            os.close(fd)  # its holder let go and removed it between our open and our lock: open it again

    def alive(self, key: int) -> bool:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            if _same_file(fd, path):
                os.unlink(path)  # a dead holder's file: removed while locked, as a holder does
            return False
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class _AdvisoryHold:
    def __init__(self, con):
        self.con = con

    def release(self) -> None:
        self.con.close()  # the session's advisory locks end with it


class AdvisoryLiveness:
    """Session advisory locks of a PostgreSQL catalog, visible to every node."""

    def __init__(self, url: str, timeout_seconds: float):
        import psycopg

        self.url = url
        self._psycopg = psycopg
        self.timeout = max(3, int(timeout_seconds))

    def try_hold(self, key: int) -> Hold | None:
        # The server probes the holder's socket: idle for a third of the timeout, then three probes a ninth
        # apart, so a lost node's session (and lock) ends within two thirds of it. Unacknowledged data gives
        # up within half of it. A server-wide idle_session_timeout must not end a holder that is only busy.
        idle, interval = max(1, self.timeout // 3), max(1, self.timeout // 9)
        con = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self.timeout,
                                    keepalives=1, keepalives_idle=idle, keepalives_interval=interval,
                                    keepalives_count=3)
        try:
            for setting, value in (("tcp_keepalives_idle", idle), ("tcp_keepalives_interval", interval),
                                   ("tcp_keepalives_count", 3), ("tcp_user_timeout", self.timeout * 500),
                                   ("idle_session_timeout", 0)):
                con.execute("SELECT set_config(%s, %s, false)", [setting, str(value)])
            (held,) = con.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
        except BaseException:
            con.close()
            raise
        if not held:
            con.close()
            return None
        return _AdvisoryHold(con)

    def alive(self, key: int) -> bool:
        with self._psycopg.connect(self.url, autocommit=True, connect_timeout=self.timeout) as con:
            (count,) = con.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s "
                "AND objid = %s AND objsubid = 1", [key >> 32, key & 0xFFFFFFFF]).fetchone()
        return count > 0


class Holds:
    """The holds this process has, by catalog and key: a process works on several imports over its life (the
    CLI, a test), and each step of one import may build its own catalog object."""

    _lock = threading.Lock()
    _held: dict[tuple[str, int], Hold] = {}

    @classmethod
    def has(cls, key: tuple[str, int]) -> bool:
        with cls._lock:
            return key in cls._held

    @classmethod
    def add(cls, key: tuple[str, int], hold: Hold) -> None:
        with cls._lock:
            cls._held[key] = hold

    @classmethod
    def release(cls, key: tuple[str, int]) -> None:
        with cls._lock:
            hold = cls._held.pop(key, None)
        if hold is not None:
            hold.release()
