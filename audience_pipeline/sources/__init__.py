"""Drop sources: where feeds land their files. Every source lists objects and streams one into a file."""

from __future__ import annotations

from pathlib import Path

from audience_pipeline.sources.base import DropSource, SourceError, SourceObject
from audience_pipeline.sources.local import LocalDropSource


def open_source(location: str) -> DropSource:
    """The drop source for a feed's (resolved) source location."""
    if "://" in location and not location.startswith("file://"):
        scheme = location.split("://", 1)[0]
        raise SourceError(f"unsupported source scheme {scheme!r} in {location!r}")
    return LocalDropSource(location.removeprefix("file://"))


def source_for_uri(uri: str) -> tuple[DropSource, str]:
    """The source and key that can re-open an object from its URI (as recorded on a delivery)."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(uri).path))
        return LocalDropSource(path.parent), path.name
    raise SourceError(f"cannot open {uri!r}: unsupported scheme")


__all__ = ["DropSource", "LocalDropSource", "SourceError", "SourceObject", "open_source"]
