"""The drop-source sensor's cursor: which listed objects are new, without missing or repeating any.

A high-water mark alone loses files: timestamps have coarse resolution (S3's LastModified is whole
seconds, and dagster_aws's ``since_last_modified`` is a strict ``>``), so a file landing in the same
second as the last tick would be skipped. The cursor therefore keeps the high-water mark *and* the
(key, version) of every object already handled within ``lookback`` of it. An object is new when it
arrived after ``hwm - lookback`` and its (key, version) is not in that set. A rewrite of the same key
is a new version; a deleted object simply stops being listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from audience_pipeline.sources.base import SourceObject

CURSOR_FORMAT = 1


@dataclass
class Cursor:
    hwm_ns: int = 0
    edge: dict[str, str] = field(default_factory=dict)  # key -> version handled within the lookback
    edge_arrived: dict[str, int] = field(default_factory=dict)
    listed: int = 0  # objects in the last listing, to notice a listing that suddenly shrinks

    def dumps(self) -> str:
        return json.dumps(
            {"v": CURSOR_FORMAT, "hwm_ns": self.hwm_ns, "listed": self.listed,
             "edge": {k: [self.edge[k], self.edge_arrived[k]] for k in sorted(self.edge)}},
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        data = json.loads(text)
        if data.get("v") != CURSOR_FORMAT:
            raise ValueError(f"unsupported sensor cursor format {data.get('v')!r}")
        edge = {k: v[0] for k, v in data["edge"].items()}
        arrived = {k: int(v[1]) for k, v in data["edge"].items()}
        return cls(hwm_ns=int(data["hwm_ns"]), edge=edge, edge_arrived=arrived, listed=int(data.get("listed", 0)))


@dataclass(frozen=True)
class TickPlan:
    new: list[SourceObject]
    cursor: Cursor
    backlog: int  # new objects left for later ticks by max_new


def plan_tick(objects: Iterable[SourceObject], cursor: Cursor, lookback_ns: int, max_new: int) -> TickPlan:
    floor = cursor.hwm_ns - lookback_ns
    fresh = sorted(
        (o for o in objects if o.arrived_ns >= floor and cursor.edge.get(o.key) != o.version),
        key=lambda o: (o.arrived_ns, o.key),
    )
    taken = fresh[:max_new]
    if not taken:
        return TickPlan(new=[], cursor=Cursor(cursor.hwm_ns, dict(cursor.edge), dict(cursor.edge_arrived)),
                        backlog=0)
    hwm = max(cursor.hwm_ns, taken[-1].arrived_ns)
    keep_from = hwm - lookback_ns
    edge = {k: v for k, v in cursor.edge.items() if cursor.edge_arrived[k] >= keep_from}
    arrived = {k: cursor.edge_arrived[k] for k in edge}
    for o in taken:
        if o.arrived_ns >= keep_from:
            edge[o.key] = o.version
            arrived[o.key] = o.arrived_ns
    return TickPlan(new=taken, cursor=Cursor(hwm_ns=hwm, edge=edge, edge_arrived=arrived),
                    backlog=len(fresh) - len(taken))
