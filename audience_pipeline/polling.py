"""One poll of a feed's drop source: which deliveries are new, and the cursor after them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from audience_pipeline.config import FeedConfig
from audience_pipeline.cursor import Cursor, plan_tick
from audience_pipeline.formats import get_format
from audience_pipeline.keys import partition_key
from audience_pipeline.sources import DropSource, SourceError, SourceObject


@dataclass(frozen=True)
class Delivery:
    """A file version to import: the partition it belongs to and the delivery that identifies it."""

    partition_key: str
    delivery: str
    source_uri: str
    key: str
    size: int

    @property
    def run_key(self) -> str:
        return f"{self.partition_key}|{self.delivery}"


@dataclass(frozen=True)
class PollResult:
    deliveries: list[Delivery]
    cursor: Cursor
    ignored: list[str]
    vanished: list[str]
    backlog: int
    listed: int


def content_sha256(source: DropSource, key: str) -> tuple[str, SourceObject]:
    digest = hashlib.sha256()
    with source.open(key) as (stream, obj):
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), obj


def poll_feed(feed_name: str, feed: FeedConfig, source: DropSource, cursor: Cursor) -> PollResult:
    fmt = get_format(feed.format)
    listed = list(source.list())
    accepted, ignored = [], []
    for obj in listed:
        (accepted if fmt.accepts(obj.name) else ignored).append(obj)
    plan = plan_tick(accepted, cursor, int(feed.cursor_lookback_seconds * 1e9), feed.max_runs_per_tick)
    deliveries, vanished = [], []
    for obj in plan.new:
        try:
            sha256, seen = content_sha256(source, obj.key)
        except SourceError:
            vanished.append(obj.key)
            continue
        deliveries.append(
            Delivery(
                partition_key=partition_key(feed_name, obj.name, sha256),
                delivery=f"source:{seen.version}",
                source_uri=seen.uri,
                key=obj.key,
                size=seen.size,
            )
        )
    return PollResult(deliveries=deliveries, cursor=plan.cursor, ignored=[o.key for o in ignored],
                      vanished=vanished, backlog=plan.backlog, listed=len(listed))
