"""Partition keys: one dynamic partition per imported file version, readable in the Dagster UI."""

from __future__ import annotations

import re

MAX_NAME_CHARS = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")


def sanitize_file_name(name: str) -> str:
    """File name reduced to characters every Dagster surface accepts; Dagster refuses keys with control
    characters or ``...``, and a long key makes the partition list unreadable."""
    cleaned = _DOTS.sub(".", _UNSAFE.sub("_", name)).strip("._-") or "file"
    return cleaned[:MAX_NAME_CHARS]


def partition_key(feed: str, file_name: str, sha256: str) -> str:
    return f"{feed}:{sanitize_file_name(file_name)}:{sha256[:8]}"


def parse_partition_key(key: str) -> tuple[str, str, str]:
    feed, name, digest = key.split(":")
    return feed, name, digest
