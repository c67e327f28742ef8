"""Drop sources: where feeds land their files. Every source lists objects and streams one on request."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError

from audience_pipeline.sources.base import (
    DropSource,
    SourceChanged,
    SourceError,
    SourceObject,
    SourceRefused,
    SourceTransient,
)
from audience_pipeline.sources.local import LocalDropSource
from audience_pipeline.sources.s3 import S3DropSource, parse_s3_uri, source_error
from audience_pipeline.sources.sftp import SftpDropSource, parse_sftp_uri

S3ClientFactory = Callable[[], Any]


def open_source(location: str, s3_client: S3ClientFactory | None = None, sftp=None) -> DropSource:
    """The drop source for a feed's (resolved) source location; ``sftp`` is the feed's SFTP options."""
    if location.startswith("sftp://"):
        return SftpDropSource(location, sftp)
    if location.startswith("s3://"):
        if s3_client is None:
            raise SourceError(f"{location}: no S3 client configured")
        return S3DropSource(_s3_client(s3_client, location), location if location.endswith("/") else location + "/")
    if "://" in location and not location.startswith("file://"):
        raise SourceError(f"unsupported source scheme {location.split('://', 1)[0]!r} in {location!r}")
    return LocalDropSource(location.removeprefix("file://"))


def _s3_client(factory: S3ClientFactory, location: str) -> Any:
    # a named profile that does not exist fails here, before any request
    try:
        return factory()
    except BotoCoreError as exc:
        raise source_error(exc, f"cannot connect to {location}") from None


def source_for_uri(uri: str, s3_client: S3ClientFactory | None = None, sftp=None) -> tuple[DropSource, str]:
    """The source and key that re-open an object from its URI (as recorded on a delivery)."""
    if uri.startswith("sftp://"):
        user, host, port, path = parse_sftp_uri(uri)
        folder, name = posixpath.split(path)
        return SftpDropSource(f"sftp://{user}@{host}:{port}{folder}", sftp), name
    if uri.startswith("file://"):
        path = Path(unquote(urlparse(uri).path))
        return LocalDropSource(path.parent), path.name
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        if s3_client is None:
            raise SourceError(f"{uri}: no S3 client configured")
        return S3DropSource(_s3_client(s3_client, uri), f"s3://{bucket}/"), key
    raise SourceError(f"cannot open {uri!r}: unsupported scheme")


__all__ = [
    "DropSource", "LocalDropSource", "S3ClientFactory", "S3DropSource", "SftpDropSource", "SourceChanged",
    "SourceError", "SourceObject", "SourceRefused", "SourceTransient", "open_source", "source_for_uri",
]
