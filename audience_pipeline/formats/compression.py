"""Streamed, capped decompression: a small .gz can expand to gigabytes (a gzip bomb)."""

from __future__ import annotations

import zlib
from pathlib import Path

from audience_pipeline.formats.errors import FileRejected

CHUNK = 1 << 20


def gunzip_capped(src: Path, dest: Path, max_bytes: int, file_name: str) -> Path:
    """Decompress ``src`` (one or more gzip members) into ``dest``, failing beyond ``max_bytes``.

    Each step inflates at most CHUNK bytes of output, so memory stays bounded whatever the ratio.
    """
    written = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        inflater = zlib.decompressobj(wbits=31)
        pending = b""
        while True:
            if not pending:
                pending = fin.read(CHUNK)
                if not pending:
                    break
            try:
                out = inflater.decompress(pending, CHUNK)
            except zlib.error as exc:
                raise FileRejected(f"{file_name}: not a valid gzip file ({exc})") from None
            pending = inflater.unconsumed_tail
            written += len(out)
            if written > max_bytes:
                raise FileRejected(f"{file_name}: decompresses to more than {max_bytes} bytes, the feed's "
                                   "max_decompressed_bytes")
            fout.write(out)
            if inflater.eof:
                rest = inflater.unused_data + pending
                pending = b""
                if rest.strip(b"\x00"):
                    inflater = zlib.decompressobj(wbits=31)  # a further gzip member
                    pending = rest
                else:
                    inflater = None
                    break
        if inflater is not None and not inflater.eof:
            raise FileRejected(f"{file_name}: truncated gzip file (ends before its end-of-stream marker)")
    return dest
