"""The drop-source interface shared by the local folder and the remote stores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol


class SourceError(RuntimeError):
    pass


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

    def list(self) -> Iterator[SourceObject]: ...

    def stat(self, key: str) -> SourceObject: ...

    def open(self, key: str) -> AbstractContextManager[tuple[BinaryIO, SourceObject]]:
        """The object's content as a binary stream, with what is being read (size, version)."""
        ...
