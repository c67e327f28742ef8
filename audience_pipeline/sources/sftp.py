"""An SFTP folder as a drop location (Attentive's delivery channel), read with paramiko.

Credentials come from environment variables named in the feed config, never from the config itself;
the server's host key must be in the configured known-hosts file (no trust on first use).
A file is listed only once it is complete: its mtime is older than the quiet period, or its marker file
(``<name><marker_suffix>``) exists. "Stable across two listings" would delay a daily feed by a day.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import paramiko

from audience_pipeline.sources.base import SourceChanged, SourceError, SourceObject, SourceRefused, SourceTransient

CHUNK = 1 << 20


class UnknownHostKey(paramiko.SSHException):
    """The server's host key is not in the known-hosts file at all."""

    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(hostname, key)
        self.hostname = hostname
        self.key = key


class _RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    # paramiko's RejectPolicy raises a bare SSHException, which looks like any network fault; ours has a class
    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key)


def parse_sftp_uri(uri: str) -> tuple[str, str, int, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "sftp" or not parsed.hostname or not parsed.username:
        raise SourceError(f"expected sftp://user@host[:port]/path, got {uri!r}")
    if parsed.password:
        raise SourceError("an sftp:// location must not carry a password; name an environment variable instead")
    return parsed.username, parsed.hostname, parsed.port or 22, unquote(parsed.path) or "/"


class SftpDropSource:
    default_lookback_seconds = 2.0

    def __init__(self, location: str, options):
        self.user, self.host, self.port, root = parse_sftp_uri(location)
        self.root = root.rstrip("/") or "/"
        self.location = f"sftp://{self.user}@{self.host}:{self.port}{self.root}/"
        self.options = options
        self._ssh: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ----------------------------------------------------------------------------------
    def _credentials(self) -> dict:
        opts = self.options
        kwargs: dict = {}
        if opts.private_key_env:
            value = os.environ.get(opts.private_key_env)
            if not value:
                raise SourceRefused(f"{self.location}: environment variable {opts.private_key_env} is not set")
            if value.lstrip().startswith("-----BEGIN"):
                kwargs["pkey"] = _load_key(io.StringIO(value))
            elif not os.access(value, os.R_OK):
                # paramiko would raise a bare OSError from inside connect(), which reads as a network fault
                raise SourceRefused(f"{self.location}: the key file named by {opts.private_key_env} is not readable")
            else:
                kwargs["key_filename"] = value
        if opts.password_env:
            value = os.environ.get(opts.password_env)
            if value is None:
                raise SourceRefused(f"{self.location}: environment variable {opts.password_env} is not set")
            kwargs["password"] = value
        return kwargs

    def _client(self) -> paramiko.SFTPClient:
        if self._sftp is not None:
            return self._sftp
        if not self.options.known_hosts:
            raise SourceRefused(f"{self.location}: sftp.known_hosts is required (host keys are verified)")
        known_hosts = os.path.expanduser(self.options.known_hosts)
        credentials = self._credentials()
        ssh = paramiko.SSHClient()
        try:
            ssh.load_host_keys(known_hosts)
        except (OSError, paramiko.SSHException) as exc:
            raise SourceRefused(f"{self.location}: cannot read the known_hosts file {known_hosts}: "
                                f"{type(exc).__name__}") from None
        ssh.set_missing_host_key_policy(_RejectUnknownHostKey())
        try:
            ssh.connect(self.host, port=self.port, username=self.user, timeout=self.options.timeout_seconds,
                        allow_agent=False, look_for_keys=False, **credentials)
            self._sftp = ssh.open_sftp()
        except paramiko.BadHostKeyException as exc:
            ssh.close()
            raise SourceRefused(
                f"host key mismatch for {self.location}: the server presents {exc.key.get_name()} key "
                f"{exc.key.fingerprint}, not the one in {known_hosts} ({exc.expected_key.fingerprint}); the server "
                "changed or is an impostor: confirm the new key with the feed's owner before updating known_hosts"
            ) from None
        except UnknownHostKey as exc:
            ssh.close()
            raise SourceRefused(
                f"unknown host key for {self.location}: {exc.hostname} is not in {known_hosts} (the server "
                f"presents {exc.key.get_name()} key {exc.key.fingerprint}); add it once confirmed with the feed's owner"
            ) from None
        except paramiko.AuthenticationException as exc:
            ssh.close()
            if "timeout" in str(exc).lower():
                # paramiko's only signal for a server too slow to answer the login is this message
                raise SourceTransient(f"cannot log in to {self.location}: {exc}") from None
            raise SourceRefused(f"login refused by {self.location}: {type(exc).__name__}: {exc}") from None
        except paramiko.IncompatiblePeer as exc:
            ssh.close()
            raise SourceRefused(f"cannot connect to {self.location}: no common algorithm: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            ssh.close()
            # the exception text never holds the password; its class and message name the cause
            raise SourceTransient(f"cannot connect to {self.location}: {type(exc).__name__}: {exc}") from None
        self._ssh = ssh
        return self._sftp

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
        self._ssh = self._sftp = None

    def __del__(self) -> None:
        self.close()

    # -- listing -------------------------------------------------------------------------------------
    def _uri(self, key: str) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}{posixpath.join(self.root, key)}"

    def _object(self, key: str, attrs) -> SourceObject:
        return SourceObject(key=key, size=attrs.st_size, arrived_ns=int(attrs.st_mtime) * 1_000_000_000,
                            version=f"{attrs.st_size}-{int(attrs.st_mtime)}", uri=self._uri(key))

    def list(self) -> Iterator[SourceObject]:
        client = self._client()
        quiet_before = time.time() - self.options.quiet_period_seconds
        marker = self.options.marker_suffix
        try:
            entries = self._walk(client, "")
        except FileNotFoundError:
            raise SourceRefused(f"cannot list {self.location}: the folder does not exist on the server") from None
        except PermissionError:
            raise SourceRefused(f"cannot list {self.location}: permission denied") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SourceTransient(f"cannot list {self.location}: {type(exc).__name__}: {exc}") from None
        names = {key for key, _ in entries}
        for key, attrs in entries:
            name = posixpath.basename(key)
            if name.startswith(".") or (marker and key.endswith(marker)):
                continue
            complete = attrs.st_mtime < quiet_before or (marker is not None and key + marker in names)
            if complete:
                yield self._object(key, attrs)

    def _walk(self, client: paramiko.SFTPClient, prefix: str) -> list:
        found = []
        try:
            listing = client.listdir_attr(posixpath.join(self.root, prefix))
        except FileNotFoundError:
            if not prefix:
                raise
            return found  # a sub-folder removed while we walked: its files are gone, not unreadable
        for attrs in sorted(listing, key=lambda a: a.filename):
            key = posixpath.join(prefix, attrs.filename) if prefix else attrs.filename
            if stat.S_ISDIR(attrs.st_mode or 0):
                if not attrs.filename.startswith("."):
                    found.extend(self._walk(client, key))
            elif stat.S_ISREG(attrs.st_mode or 0):
                found.append((key, attrs))
        return found

    @contextmanager
    def open(self, key: str, version: str | None = None) -> Iterator[tuple[BinaryIO, SourceObject]]:
        client = self._client()
        path = posixpath.normpath(posixpath.join(self.root, key))
        if not (path + "/").startswith(self.root.rstrip("/") + "/"):
            raise SourceError(f"key {key!r} points outside {self.location}")
        try:
            handle = client.open(path, "rb")
        except FileNotFoundError as exc:
            raise SourceError(f"cannot read {self._uri(key)}: {exc}") from None
        except PermissionError:
            raise SourceRefused(f"cannot read {self._uri(key)}: permission denied") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SourceTransient(f"cannot read {self._uri(key)}: {type(exc).__name__}: {exc}") from None
        with handle:
            obj = self._object(key, handle.stat())
            if version is not None and obj.version != version:
                raise SourceChanged(f"{self._uri(key)} was replaced after it was listed")
            handle.prefetch(obj.size)
            yield handle, obj

    def fingerprint(self, key: str) -> tuple[str, SourceObject]:
        import hashlib

        digest = hashlib.sha256()
        with self.open(key) as (stream, obj):
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest(), obj


def _load_key(text: io.StringIO) -> paramiko.PKey:
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        text.seek(0)
        try:
            return key_class.from_private_key(text)
        except paramiko.SSHException:
            continue
    raise SourceRefused("the private key in the environment is not an Ed25519, ECDSA or RSA key")
