"""The drop-source interface shared by the local folder and the remote stores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol


class SourceError(RuntimeError):
    """The object cannot be read (gone, denied, unreachable)."""


class SourceTransient(SourceError):
    """A network fault or an overloaded server: trying again later may succeed."""


class SourceRefused(SourceError):
    """The source refuses us for good until someone changes configuration or credentials (host key, login,
    missing credential variable, a bucket or folder that is not there): retrying will not help, a person must."""


class SourceChanged(SourceError):
    """The object was replaced after it was listed: the listed version no longer exists to be read."""


@dataclass(frozen=True)
class SourceObject:
    """One listed object. ``version`` changes whenever the object's content may have changed;
    ``arrived_ns`` is when it landed (the sensor's cursor orders objects by it)."""

    key: str
    size: int
    arrived_ns: int
    version: str
    uri: str

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


class DropSource(Protocol):
    location: str
    # Default for feeds.<feed>.cursor_lookback_seconds: how late, relative to the newest arrival seen,
    # an object of this source can still show up with an older arrival time.
    default_lookback_seconds: float

    def list(self) -> Iterator[SourceObject]:
        """Every object under the location, in pages; keys relative to the location."""
        ...

    def fingerprint(self, key: str) -> tuple[str, SourceObject]:
        """A hex content digest that names the partition (sha256 locally, the ETag on S3), and the exact
        version it belongs to."""
        ...

    def close(self) -> None:
        """Release connections (SFTP); a no-op for stateless sources."""
        ...

    def open(self, key: str, version: str | None = None) -> AbstractContextManager[tuple[BinaryIO, SourceObject]]:
        """The object's content as a binary stream. With ``version``, exactly that version, or
        :class:`SourceChanged` if it is no longer there."""
        ...
