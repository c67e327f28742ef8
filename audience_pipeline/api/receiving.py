"""Request bodies into the staging folder: streamed under a generated name, hashed on the way, and cut off
at the feed's ``max_file_bytes``. Nothing from the request becomes a path: the client's file name is only
ever the delivery's name, reduced to its base name.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16  # the page's form has five; a body of endless small fields is refused early
MAX_FILE_NAME_CHARS = 255


class BadUpload(ValueError):
    """The request is refused: ``status`` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Disconnected(Exception):
    """The client went away before the whole body arrived."""


def base_name(name: str | None) -> str:
    """The client's file name without any folder part; refused when nothing of a file name is left."""
    if name is None or not name.strip():
        raise BadUpload("a file name is required (name=...)")
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if base in ("", ".", ".."):
        raise BadUpload(f"{name!r} names no file: give a file name, without a path")
    if any(ord(c) < 32 or ord(c) == 127 for c in base):
        raise BadUpload(f"the file name {name!r} holds control characters")
    if len(base) > MAX_FILE_NAME_CHARS:
        raise BadUpload(f"the file name is longer than {MAX_FILE_NAME_CHARS} characters")
    return base


class StagedFile:
    """One upload being written into ``folder`` under a generated name."""

    def __init__(self, folder: Path, limit: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"upload_{uuid.uuid4().hex}"
        self.limit = limit
        self.size = 0
        self._digest = hashlib.sha256()
        self._out = open(self.path, "xb")  # noqa: SIM115 -- closed by finish() or discard()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BadUpload(f"the file is over the feed's limit of {self.limit} bytes (max_file_bytes)", 413)
        self._digest.update(chunk)
        self._out.write(chunk)

    def finish(self) -> str:
        self._out.close()
        if self.size == 0:
            self.discard()
            raise BadUpload("the file is empty")
        return self._digest.hexdigest()

    def discard(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)


async def stage_body(chunks: AsyncIterator[bytes], staged: StagedFile) -> str:
    """The request body into ``staged``; its sha256. The staged file is gone if anything goes wrong."""
    try:
        async for chunk in chunks:
            staged.write(chunk)
        return staged.finish()
    except BaseException:
        staged.discard()
        raise


class FormStream:
    """A multipart/form-data body parsed as it streams: small fields kept in memory, the one file part
    written into a StagedFile that ``open_file`` makes once the fields before it are known (so a form must
    put its file input last)."""

    def __init__(self, content_type: str, open_file: Callable[[dict[str, str], str], StagedFile]):
        media, params = parse_options_header(content_type)
        if media != b"multipart/form-data" or not params.get(b"boundary"):
            raise BadUpload("the form must be sent as multipart/form-data", 415)
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None
        self.staged: StagedFile | None = None
        self._open_file = open_file
        self._error: BaseException | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._filename: str | None = None
        self._value = bytearray()
        self._in_file = False
        self._parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def _guard(self, action) -> None:
        if self._error is None:
            try:
                action()
            except BadUpload as exc:
                self._error = exc

    def _part_begin(self) -> None:
        self._name = self._filename = None
        self._value.clear()
        self._in_file = False

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.decode("latin-1").lower() == "content-disposition":
            _, options = parse_options_header(bytes(self._header_value))
            self._name = options.get(b"name", b"").decode("utf-8", "replace")
            filename = options.get(b"filename")
            self._filename = None if filename is None else filename.decode("utf-8", "replace")
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        def start_file():
            if self.staged is not None:
                raise BadUpload("the form holds more than one file")
            self.file_name = self._filename
            self.staged = self._open_file(dict(self.fields), self._filename)
            self._in_file = True

        if self._filename is not None:
            self._guard(start_file)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        def add():
            if self._in_file:
                self.staged.write(data[start:end])
            else:
                self._value += data[start:end]
                if len(self._value) > MAX_FIELD_BYTES:
                    raise BadUpload(f"form field {self._name!r} is over {MAX_FIELD_BYTES} bytes", 413)

        self._guard(add)

    def _part_end(self) -> None:
        def keep():
            if len(self.fields) >= MAX_FIELDS:
                raise BadUpload(f"the form has more than {MAX_FIELDS} fields", 413)
            self.fields[self._name] = self._value.decode("utf-8", "replace")

        if not self._in_file and self._name:
            self._guard(keep)

    async def read(self, chunks: AsyncIterator[bytes]) -> str:
        """Parse the whole body; the staged file's sha256. Nothing stays staged if anything goes wrong."""
        try:
            async for chunk in chunks:
                self._parser.write(chunk)
                if self._error is not None:
                    raise self._error
            self._parser.finalize()
            if self.staged is None:
                raise BadUpload("the form holds no file: choose one")
            return self.staged.finish()
        except BaseException:
            if self.staged is not None:
                self.staged.discard()
            raise
