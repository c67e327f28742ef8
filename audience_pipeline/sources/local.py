"""A local (or mounted) drop folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from audience_pipeline.sources.base import SourceChanged, SourceError, SourceObject, SourceRefused, SourceTransient


class LocalDropSource:
    """Files in one folder and its sub-folders; hidden files (``.name``) are partial uploads.

    A file's arrival time is the later of its mtime and ctime: a file moved in with ``mv`` or copied
    with ``cp -p`` keeps an old mtime, but its ctime is the moment it appeared, so it is not missed.
    """

    default_lookback_seconds = 2.0

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder)
        self.location = str(self.root)

    def _object(self, path: Path, st: os.stat_result) -> SourceObject:
        return SourceObject(
            key=path.relative_to(self.root).as_posix(),
            size=st.st_size,
            arrived_ns=max(st.st_mtime_ns, st.st_ctime_ns),
            version=f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}",
            uri=path.resolve().as_uri(),
        )

    def close(self) -> None:
        return None

    def _walk_error(self, exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError) and Path(exc.filename) != self.root:
            return  # a sub-folder removed while we walked: its files are gone, not unreadable
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            raise SourceRefused(f"drop folder {self.root} does not exist") from None
        if isinstance(exc, PermissionError):
            raise SourceRefused(f"drop folder {exc.filename} is not readable: permission denied") from None
        # an I/O error or a stale handle on a mounted folder: the mount may come back
        raise SourceTransient(f"cannot list drop folder {exc.filename}: {exc.strerror or exc}") from None

    def list(self) -> Iterator[SourceObject]:
        # os.walk skips a folder it cannot read unless told otherwise: an unreadable drop would look empty
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                except PermissionError:
                    raise SourceRefused(f"{path} is not readable: permission denied") from None
                yield self._object(path, st)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise SourceError(f"key {key!r} points outside the drop folder {self.root}")
        return path

    @contextmanager
    def open(self, key: str, version: str | None = None) -> Iterator[tuple[BinaryIO, SourceObject]]:
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise SourceError(f"{path} no longer exists") from None
        except PermissionError:
            raise SourceRefused(f"{path} is not readable: permission denied") from None
        with fh:
            obj = self._object(path, os.fstat(fh.fileno()))
            if version is not None and obj.version != version:
                raise SourceChanged(f"{path} was replaced after it was listed")
            yield fh, obj

    def fingerprint(self, key: str) -> tuple[str, SourceObject]:
        digest = hashlib.sha256()
        with self.open(key) as (stream, obj):
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest(), obj
