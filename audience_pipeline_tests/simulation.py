"""A concurrency simulation at the storage layer: many imports of many audiences committed by several
processes at once, against one catalog and one lake, then checked against the serial application of the
same files in the order they arrived.

Half the audiences come from a Repro feed (full lists with no list time: the last list to arrive wins),
half from an ODP feed (full lists stamped with `ts`, delivered out of order, with `skip_older_ts`: an older
list arriving after a newer one is skipped as stale). Run directly for figures:

    python -m audience_pipeline_tests.simulation --catalog postgresql://... --audiences 200 --imports 1000
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing
import queue
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import duckdb
import yaml

USER_POOL = 400


@dataclass(frozen=True)
class Delivery:
    seq: int  # position in the arrival order the generator intended (workers take them in this order)
    feed: str
    audience: str
    path: Path
    members: frozenset[str]
    ts: int | None  # ODP list time; None for Repro


def write_workspace(root: Path, catalog: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "storage": {"lake": "lake", "catalog": catalog or "catalog.duckdb", "analytics": "analytics.duckdb",
                    "lock_timeout_seconds": 600},
        "feeds": {
            "repro": {"format": "repro", "source": "drop/repro"},
            # a producer that stamps every row with the list's compute time: older lists are stale
            "odp": {"format": "odp", "source": "drop/odp", "id_field": "a_high_confidence_identifier",
                    "skip_older_ts": True},
        },
    }
    for feed in config["feeds"]:
        (root / "drop" / feed).mkdir(parents=True, exist_ok=True)
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def generate(root: Path, audiences: int, imports: int, seed: int = 7) -> list[Delivery]:
    """``imports`` files over ``audiences`` audiences (several each), in a seeded arrival order in which
    each ODP audience's lists come out of `ts` order."""
    rng = random.Random(seed)
    names = [("repro" if a % 2 == 0 else "odp", f"aud{a:03d}") for a in range(audiences)]
    per_audience = defaultdict(int)
    for i in range(imports):
        per_audience[names[i % audiences]] += 1
    plan = []
    for (feed, name), count in per_audience.items():
        stamps = rng.sample(range(1_700_000_000, 1_700_100_000), count)  # distinct, in shuffled order
        for ts in stamps:
            members = frozenset(f"user{u:04d}" for u in rng.sample(range(USER_POOL), rng.randint(1, 30)))
            plan.append((feed, name, members, ts if feed == "odp" else None))
    rng.shuffle(plan)
    deliveries = []
    for seq, (feed, name, members, ts) in enumerate(plan):
        folder = root / "incoming" / f"{seq:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        if feed == "repro":
            path = folder / f"{name}.csv"
            path.write_text("".join(f"{m}\n" for m in sorted(members)))
        else:
            path = folder / f"{name}.csv.gz"
            body = "type,action,a_high_confidence_identifier,audience_id,ts\n" + "".join(
                f"passthrough,qualify,{m},{name},{ts}\n" for m in sorted(members))
            path.write_bytes(gzip.compress(body.encode(), mtime=0))
        deliveries.append(Delivery(seq, feed, name, path, members, ts))
    return deliveries


def import_one(service, feed: str, path: Path, delivery: str):
    """One import through the storage layer (what each asset step of a run does), without Dagster."""
    from audience_pipeline.hashing import sha256_file
    from audience_pipeline.importer import ImportFailed
    from audience_pipeline.keys import partition_key

    pkey = partition_key(feed, path.name, sha256_file(path))
    try:
        record = service.receive(pkey, delivery, path.resolve().as_uri(), None)
        return service.apply(record)
    except ImportFailed as exc:
        return exc.record


# Widen the windows that matter: between validation and commit (imports overtake each other) and between
# reading an audience's current list and committing the new one (lost updates).
JITTER = {"AUDIENCE_PIPELINE_JITTER_AT": "validate.summary_written,diff.transitions",
          "AUDIENCE_PIPELINE_JITTER_SECONDS": "0.2"}


def _worker(config_path: str, todo, done) -> None:
    import os

    os.environ.update(JITTER)
    from audience_pipeline.config import load_workspace
    from audience_pipeline.importer import ImportService

    service = ImportService(load_workspace(config_path))
    while (item := todo.get()) is not None:
        seq, feed, path = item
        try:
            record = import_one(service, feed, Path(path), f"sim:{seq}")
        except Exception:  # reported, not raised: the other imports go on and the report names it
            import traceback

            done.put((seq, None, "error", traceback.format_exc()))
            continue
        done.put((seq, record.import_id, record.status, record.error))


def run_concurrently(config_path: Path, deliveries: list[Delivery], processes: int) -> dict[int, tuple]:
    """Several worker processes take the deliveries in arrival order from one queue."""
    ctx = multiprocessing.get_context("spawn")
    todo, done = ctx.Queue(), ctx.Queue()
    for d in deliveries:
        todo.put((d.seq, d.feed, str(d.path)))
    for _ in range(processes):
        todo.put(None)
    workers = [ctx.Process(target=_worker, args=(str(config_path), todo, done)) for _ in range(processes)]
    for w in workers:
        w.start()
    results = {}
    while len(results) < len(deliveries):
        try:
            seq, import_id, status, error = done.get(timeout=5)
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                raise RuntimeError(f"every worker exited ({[w.exitcode for w in workers]}) with "
                                   f"{len(deliveries) - len(results)} imports left") from None
            continue
        results[seq] = (import_id, status, error)
    for w in workers:
        w.join(60)
        if w.exitcode != 0:
            raise RuntimeError(f"worker exited with {w.exitcode}")
    return results


def serial_expectation(deliveries: list[Delivery], arrival: list[int]) -> dict[str, frozenset[str]]:
    """The final lists of applying the deliveries one after another in ``arrival`` order (their seqs):
    a Repro list replaces the audience; an ODP list does too unless it is older than the applied one."""
    by_seq = {d.seq: d for d in deliveries}
    state: dict[str, frozenset[str]] = {}
    applied_ts: dict[str, int] = {}
    for seq in arrival:
        d = by_seq[seq]
        if d.ts is not None:
            if d.audience in applied_ts and d.ts < applied_ts[d.audience]:
                continue
            applied_ts[d.audience] = d.ts
        state[d.audience] = d.members
    return state


@dataclass
class Observed:
    members: dict[str, frozenset[str]]
    problems: list[str]


def observe(analytics: Path) -> Observed:
    """The final lists from the analysts' views, and every inconsistency between events and versions:
    replaying each audience's events in commit order must rebuild every version (a lost or duplicated event
    cannot), and each version's counts must be its events'."""
    con = duckdb.connect(str(analytics), read_only=True)
    try:
        members = defaultdict(set)
        for name, user in con.execute("SELECT audience_name, user_id FROM members").fetchall():
            members[name].add(user)
        versions = con.execute(
            """SELECT audience_name, import_id, qualified, disqualified, member_count, valid_to IS NULL
               FROM audience_versions ORDER BY audience_name, valid_from, import_id""").fetchall()
        events = defaultdict(list)
        for name, import_id, action, user in con.execute(
                "SELECT audience_name, import_id, action, user_id FROM membership_events").fetchall():
            events[(name, import_id)].append((action, user))
    finally:
        con.close()
    problems = []
    replay: dict[str, set[str]] = defaultdict(set)
    current_seen = defaultdict(int)
    for name, import_id, qualified, disqualified, count, current in versions:
        state = replay[name]
        got = events.pop((name, import_id), [])
        for action, user in got:
            if action == "qualify" and user in state or action == "disqualify" and user not in state:
                problems.append(f"{name}: import {import_id} {action} {user} does not follow the previous version")
            (state.add if action == "qualify" else state.discard)(user)
        n_q = sum(a == "qualify" for a, _ in got)
        if (n_q, len(got) - n_q, len(state)) != (qualified, disqualified, count):
            problems.append(f"{name}: import {import_id} has {n_q}/{len(got) - n_q} events for counts "
                            f"{qualified}/{disqualified}, replayed size {len(state)} for {count}")
        current_seen[name] += current
    problems += [f"{n}: {k} current versions" for n, k in current_seen.items() if k != 1]
    problems += [f"{n}: events of import {i} belong to no version" for n, i in events]
    problems += [f"{n}: replayed events give {sorted(replay[n] ^ members[n])[:5]}... more or less than members"
                 for n in replay if replay[n] != members[n]]
    return Observed({k: frozenset(v) for k, v in members.items()}, problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--catalog", help="postgresql:// URL (default: a DuckDB file in the workspace)")
    parser.add_argument("--audiences", type=int, default=200)
    parser.add_argument("--imports", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    from audience_pipeline.config import load_workspace
    from audience_pipeline.workspace_setup import prepare

    config = write_workspace(args.root, args.catalog)
    prepare(load_workspace(config))
    deliveries = generate(args.root, args.audiences, args.imports)
    t = time.monotonic()
    results = run_concurrently(config, deliveries, args.processes)
    wall = time.monotonic() - t
    for seq, (_, status, error) in sorted(results.items()):
        if status == "error":
            print(f"  delivery {seq} raised:\n{error}")
    arrival = sorted(results, key=lambda seq: results[seq][0] or 0)
    expected = serial_expectation(deliveries, arrival)
    observed = observe(load_workspace(config).analytics)
    statuses = defaultdict(int)
    for _, status, _ in results.values():
        statuses[status] += 1
    mismatched = [a for a in expected if observed.members.get(a, frozenset()) != expected[a]]
    print(f"{len(deliveries)} imports of {args.audiences} audiences by {args.processes} processes in "
          f"{wall:.1f} s ({len(deliveries) / wall:.1f} imports/s); statuses {dict(statuses)}; "
          f"{len(mismatched)} audiences differ from the serial application; "
          f"{len(observed.problems)} event problems")
    for problem in observed.problems[:10]:
        print(" ", problem)

    raise SystemExit(1 if mismatched or observed.problems else 0)


if __name__ == "__main__":
    main()
