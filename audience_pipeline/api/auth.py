"""Tokens, page sessions and CSRF tokens of the upload server.

Only sha256 hashes of tokens are configured; a presented token is hashed and compared with every configured
hash in constant time. Sessions live in the server's memory (a restart signs everybody out), so the cookie
holds a random session id and nothing derived from the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

from audience_pipeline.config import ApiConfig

SESSION_COOKIE = "audience_pipeline_session"
LOGIN_COOKIE = "audience_pipeline_login"  # double-submit CSRF token of the sign-in form, before any session


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Client:
    """Who a request comes from: the configured token's name and the feeds it may write."""

    name: str
    feeds: tuple[str, ...]

    def may_write(self, feed: str) -> bool:
        return feed in self.feeds


def token_from_header(value: str | None) -> str | None:
    """``Authorization: <token>`` as mediarithmics' API takes it, or ``Bearer <token>``."""
    if not value:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return value


class Tokens:
    def __init__(self, config: ApiConfig):
        self._hashes = [(name, bytes.fromhex(t.sha256), tuple(t.feeds)) for name, t in config.tokens.items()]

    def client(self, token: str | None) -> Client | None:
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for name, digest, feeds in self._hashes:  # no early exit: every hash is compared
            if hmac.compare_digest(presented, digest):
                found = Client(name, feeds)
        return found


@dataclass(frozen=True)
class Session:
    client: Client
    csrf: str


class Sessions:
    """Signed-in page users, by a random session id."""

    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, client: Client) -> tuple[str, Session]:
        session_id, session = secrets.token_urlsafe(32), Session(client, secrets.token_urlsafe(32))
        with self._lock:
            self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            return self._sessions.get(session_id)

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


def same_secret(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
