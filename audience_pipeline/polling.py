"""One poll of a feed's drop source: which deliveries are new, and the cursor after them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from audience_pipeline.config import DRY_RUN_FOLDER, FeedConfig
from audience_pipeline.cursor import Cursor, plan_tick
from audience_pipeline.formats import get_format
from audience_pipeline.keys import partition_key
from audience_pipeline.sources import DropSource, SourceError, SourceRefused, SourceTransient

# A listing with less than this share of the previous one's objects is reported as an anomaly (narrowed
# permissions, a prefix typo, a bucket lifecycle rule); the audiences stay as they are either way.
SHRINK_ALERT_RATIO = 0.5
SHRINK_ALERT_MIN_OBJECTS = 10


@dataclass(frozen=True)
class Delivery:
    """A file version to import: the partition it belongs to and the delivery that identifies it."""

    partition_key: str
    delivery: str
    source_uri: str
    key: str
    size: int
    profile: str | None = None  # the feed profile whose options apply (Loymax), from the file's folder

    @property
    def dry_run(self) -> bool:
        """Files under a feed's ``dryrun/`` prefix are diffed and gated, never applied."""
        return self.key.startswith(f"{DRY_RUN_FOLDER}/")

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
    anomaly: str | None


def poll_feed(feed_name: str, feed: FeedConfig, source: DropSource, cursor: Cursor) -> PollResult:
    fmt = get_format(feed.format)
    accepted, ignored, listed = [], [], 0
    for obj in source.list():
        listed += 1
        if fmt.accepts(obj.name, feed):
            accepted.append(obj)
        else:
            ignored.append(obj.key)
    lookback = feed.cursor_lookback_seconds
    if lookback is None:
        lookback = source.default_lookback_seconds
    plan = plan_tick(accepted, cursor, int(lookback * 1e9), feed.max_runs_per_tick)
    deliveries, vanished = [], []
    for obj in plan.new:
        try:
            digest, seen = source.fingerprint(obj.key)
        except (SourceRefused, SourceTransient):
            raise  # the object may well be there: passing over it would move the cursor past it unread
        except SourceError:
            vanished.append(obj.key)
            continue
        profile = profile_of(obj.key, feed)
        deliveries.append(
            Delivery(
                partition_key=partition_key(feed_name, obj.name, digest),
                delivery=profile_delivery(profile, f"source:{seen.version}"),
                source_uri=seen.uri,
                key=obj.key,
                size=seen.size,
                profile=profile,
            )
        )
    if hasattr(fmt, "group_name"):
        deliveries = _group_parts(feed_name, feed, fmt, deliveries)
    anomaly = None
    if cursor.listed >= SHRINK_ALERT_MIN_OBJECTS and listed < cursor.listed * SHRINK_ALERT_RATIO:
        anomaly = (f"{source.location} listed {listed} objects, down from {cursor.listed}: check permissions and "
                   "the prefix; no audience was changed")
    plan.cursor.listed = listed
    return PollResult(deliveries=deliveries, cursor=plan.cursor, ignored=ignored, vanished=vanished,
                      backlog=plan.backlog, listed=listed, anomaly=anomaly)


def profile_of(key: str, feed: FeedConfig) -> str | None:
    """The profile a file's folder names: the first folder of its key (after ``dryrun/``), when the feed has
    a profile of that name. Deeper folders inside a profile's folder are the profile's too, so a removal file
    filed away one level down is never read as an add. Any other folder keeps its old meaning (none)."""
    folders = key.split("/")[:-1]
    if folders[:1] == [DRY_RUN_FOLDER]:
        folders = folders[1:]
    return folders[0] if folders and folders[0] in feed.profiles else None


def profile_delivery(profile: str | None, delivery: str) -> str:
    """The delivery id of a file read with a profile: the same object read with another profile (same
    content, same version on S3 or SFTP) is another delivery, never a re-run of the first."""
    return delivery if profile is None else f"profile:{profile}:{delivery}"


def source_delivery(delivery: str) -> str:
    """The delivery id without its profile: what names the object's version at the source."""
    if delivery.startswith("profile:"):
        return delivery.split(":", 2)[2]  # profile names have no ':' (config checks them)
    return delivery


def _group_parts(feed_name: str, feed: FeedConfig, fmt, deliveries: list[Delivery]) -> list[Delivery]:
    """Files that are parts of one list (Attentive: one date, ``_1``, ``_2``...) found in the same listing
    become one import, so an analyst never sees the list with only some of its parts."""
    groups: dict[str, list[Delivery]] = {}
    for d in deliveries:
        name = fmt.group_name(d.key.rsplit("/", 1)[-1], feed)
        groups.setdefault(name or f"\0{d.key}", []).append(d)
    merged = []
    for name, parts in groups.items():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        parts.sort(key=lambda d: d.key)
        digest = hashlib.sha256("".join(p.partition_key for p in parts).encode()).hexdigest()
        merged.append(Delivery(
            partition_key=partition_key(feed_name, name, digest),
            delivery="parts:" + json.dumps([p.delivery for p in parts], separators=(",", ":")),
            source_uri=json.dumps([p.source_uri for p in parts], separators=(",", ":")),
            key=name,
            size=sum(p.size for p in parts),
        ))
    return merged
