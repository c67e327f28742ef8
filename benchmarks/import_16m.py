"""Import benchmark (issue #7): one command generates seeded data and prints every figure side by side.

    python benchmarks/import_16m.py [--ids 16000000] [--sizes 1000000,4000000,16000000] [--seed 7]
                                    [--parts a,b,c,d,growth,analyst] [--out benchmarks/out]

Every step runs as its own process; its wall time and its own peak RSS are printed (the probe measures
the command as a child of a fresh child, so ru_maxrss is that command's alone). On the same files:

  (a) naive     pandas + Python sets: read the CSV, strip, dedupe, regex check, set differences against the
                previous list (Parquet), write members and events as Parquet (pandas and pyarrow are installed
                with uv into a venv of their own under --out on first use)
  (b) floor     plain DuckDB doing the same set work by hand (read, dedupe, check, two anti-joins, write)
  (c) import    `audience-pipeline import` of the new list (5% out, 5% in) into an audience holding the
                previous list; no users registry, so (a), (b) and (c) do the same work. The workspace sets
                `memory_limit: 1GB`, so the run also shows a 1 GB limit does not make it fail.
                Also printed: the first import (all qualify) and a re-delivery of the same content (skipped).
                Then its results are checked, through the analyst views: the members and the events (with
                their line numbers) against what the generator says they must be, against (b)'s and (a)'s
                outputs where those ran, and qualified_at kept for members who stayed. A difference prints
                MISMATCH.
  (d) registry  the same churn import with a users registry of 1.25 x --ids users (20M at 16M IDs) in which
                1% of the new list's IDs are missing (rejected as `unmatched`), reported on its own
  growth        (c) at each of --sizes, to show cost grows linearly with the number of IDs
  analyst       from a fresh read-only connection to the analytics file (a new process per query):
                  SELECT sum(length(user_id)) FROM members_as_of('big', ts)      (target <= 1 s)
                  SELECT sum(length(user_id)) FROM members WHERE audience_name = 'big'   (target <= 0.5 s)
                on an audience of --ids members with 30 versions of history.

How the history is built: 30 full 16M-ID imports would take ~20 minutes, so the audience lives in a
mediarithmics feed (incremental UPDATE/DELETE commands, docs/formats.md). One command file of --ids UPDATE
lines creates it (version 1); then 29 small command files, each deleting --ids/2000 members and adding
twice as many new users, are imported by one `audience-pipeline import` process. Every one is a real import through
the real path (receive, validate, diff, commit): each commits a new version with its own full member list
file in the lake, exactly as 30 deliveries would. `ts` is the midpoint between versions 15 and 16, so
the as-of query must find version 15 among 30; its answer is checked against that version's member count.

Data: IDs are 30 hex characters from md5 of (seed, i), so a seed always gives the same files; the
previous list holds i in [0, n), the new list i in [n/20, n + n/20). Files are generated once per
(size, seed) under --out and reused. Run it on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("audience-pipeline"))
MEMORY_LIMIT = "1GB"
HISTORY_VERSIONS = 30
AS_OF_VERSION = 15

FLOOR_SQL = """
SET memory_limit = '1GB';
CREATE TEMP TABLE new_ids AS
  SELECT DISTINCT trim(column0) AS user_id FROM read_csv('{new}', header = false, columns = {{'column0': 'VARCHAR'}},
                                                        delim = '\x01', quote = '', escape = '', auto_detect = false)
  WHERE regexp_full_match(trim(column0), '[^\\x00-\\x1F,]{{1,256}}');
COPY new_ids TO '{out}/floor_members.parquet' (FORMAT parquet);
COPY (SELECT n.user_id, 'qualify' AS action FROM new_ids n ANTI JOIN read_parquet('{prev}') p USING (user_id)
      UNION ALL
      SELECT p.user_id, 'disqualify' FROM read_parquet('{prev}') p ANTI JOIN new_ids n USING (user_id))
  TO '{out}/floor_events.parquet' (FORMAT parquet);
"""

# What a user who knows pandas would write first: object columns, Python sets for the differences.
NAIVE_PANDAS = """
import csv, sys
import pandas as pd
new_csv, prev_parquet, out = sys.argv[1:4]
lines = pd.read_csv(new_csv, header=None, names=["user_id"], dtype=str, sep="\\x01", quoting=csv.QUOTE_NONE,
                    keep_default_na=False, skip_blank_lines=False, encoding_errors="replace")
ids = lines["user_id"].str.strip()
ids = ids[ids.str.fullmatch(r"[^\\x00-\\x1F,]{1,256}")].drop_duplicates()
previous = set(pd.read_parquet(prev_parquet)["user_id"])
current = set(ids)
qualify, disqualify = current - previous, previous - current
pd.DataFrame({"user_id": ids}).to_parquet(out + "/naive_members.parquet", index=False)
pd.DataFrame({"user_id": list(qualify) + list(disqualify),
              "action": ["qualify"] * len(qualify) + ["disqualify"] * len(disqualify)}).to_parquet(
    out + "/naive_events.parquet", index=False)
print(len(current), len(qualify), len(disqualify))
"""

# A fresh process with a fresh read-only connection per query: nothing cached from an earlier query.
ANALYST_PROBE = """
import json, sys, time
import duckdb
path, sql = sys.argv[1:3]
t0 = time.monotonic()
con = duckdb.connect(path, read_only=True)
t1 = time.monotonic()
value = con.execute(sql).fetchone()[0]
t2 = time.monotonic()
print(json.dumps([t1 - t0, t2 - t1, value]))
"""


def naive_python(out_root: Path) -> str:
    """A Python with pandas for (a), in a venv of its own under --out: installed into the project's environment,
    pandas would slow every `audience-pipeline` start (pandera imports it when it is there)."""
    venv = out_root / "naive-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        uv = [shutil.which("uv")] if shutil.which("uv") else ["python3", "-m", "uv"]
        subprocess.run([*uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
        subprocess.run([*uv, "pip", "install", "--quiet", "--python", str(python), "pandas>=2.2", "pyarrow>=18"],
                       check=True)
    return str(python)


def ident(seed: int) -> str:
    """SQL for a 30-character ID of row ``i``, the same for a given seed."""
    return (f"substr(md5('{seed}:' || i::VARCHAR) || md5('{seed}:' || (i + 7)::VARCHAR), 1, 30)")


def generate(out: Path, n: int, seed: int, registry_users: int | None, history: bool) -> dict[str, Path]:
    """Seeded, deterministic files, written once per (size, seed) and reused."""
    out.mkdir(parents=True, exist_ok=True)
    churn = n // 20
    files = {
        "prev_csv": out / "previous" / "big.csv",
        "new_csv": out / "new" / "big.csv",
        "prev_parquet": out / "previous.parquet",
    }
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{out / 'duckdb_tmp'}'")
    uid = ident(seed)
    if not all(p.exists() for p in files.values()):
        for p in files.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY (SELECT {uid} FROM range(0, {n}) t(i)) TO '{files['prev_csv']}' (HEADER false)")
        con.execute(f"COPY (SELECT {uid} AS user_id FROM range(0, {n}) t(i)) TO '{files['prev_parquet']}' "
                    "(FORMAT parquet)")
        con.execute(f"COPY (SELECT {uid} FROM range({churn}, {n + churn}) t(i)) TO '{files['new_csv']}' "
                    "(HEADER false)")
    if registry_users:
        # Every ID of both lists except 1% of the new list's (i % 100 = 0 among the new list's rows), then
        # other users up to the registry's size.
        registry = files["registry"] = out / f"users_{registry_users}.parquet"
        if not registry.exists():
            known = n + churn - ((n + churn - 1) // 100 - (churn - 1) // 100)
            con.execute(
                f"""COPY (SELECT {uid} AS user_id FROM range(0, {n + churn}) t(i)
                          WHERE NOT (i >= {churn} AND i % 100 = 0)
                          UNION ALL
                          SELECT {uid} FROM range({2 * n + churn}, {2 * n + churn + registry_users - known}) t(i))
                    TO '{registry}' (FORMAT parquet)""")
    if history:
        folder = files["history"] = out / "history"
        step = max(1, n // 1000) // 2 * 2 or 2
        if not (folder / f"big_{HISTORY_VERSIONS - 1:02d}.csv").exists():
            folder.mkdir(parents=True, exist_ok=True)
            header = "operation,expiration_duration,user_account_id,segment_technical_name"
            con.execute(f"""COPY (SELECT 'UPDATE' AS operation, 0 AS expiration_duration,
                                         {uid} AS user_account_id, 'big' AS segment_technical_name
                                  FROM range(0, {n}) t(i))
                            TO '{folder / 'big_00.csv'}' (HEADER true)""")
            for v in range(1, HISTORY_VERSIONS):
                # version v+1 deletes the `step / 2` oldest remaining members and adds `step` new users, so
                # every version has its own size and the as-of answer tells which one was read
                half = step // 2
                gone, added = (v - 1) * half, n + (v - 1) * step
                con.execute(f"""COPY (SELECT 'DELETE' AS operation, 0 AS expiration_duration, {uid} AS user_account_id,
                                             'big' AS segment_technical_name FROM range({gone}, {gone + half}) t(i)
                                      UNION ALL
                                      SELECT 'UPDATE', 0, {uid}, 'big' FROM range({added}, {added + step}) t(i))
                                TO '{folder / f'big_{v:02d}.csv'}' (HEADER true)""")
            assert (folder / "big_00.csv").read_text(encoding="utf-8", errors="replace")[:len(header)] == header
    con.close()
    shutil.rmtree(out / "duckdb_tmp", ignore_errors=True)
    return files


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` in a child of a fresh child, so ru_maxrss is this command's own peak: (wall s, MB, output)."""
    probe = (
        "import resource, subprocess, sys, time, json;"
        "t = time.monotonic(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "w = time.monotonic() - t;"
        "print(json.dumps([w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode,"
        " p.stdout[-3000:] + p.stderr[-3000:]]))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env,
                          cwd=cwd, check=True)
    wall, rss_kb, code, output = json.loads(done.stdout)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{output}")
    return wall, rss_kb / 1024, output


def workspace(folder: Path, feeds: str, users: Path | None = None) -> dict:
    """A fresh workspace (catalog, lake, Dagster instance) and the environment that points the CLI at it."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "drop").mkdir(parents=True)
    users_line = f"users: {{path: {users}}}\n" if users else ""
    (folder / "feeds.yaml").write_text(
        f"storage: {{lake: lake, catalog: catalog.duckdb, analytics: analytics.duckdb, "
        f"memory_limit: {MEMORY_LIMIT}}}\n{users_line}feeds:\n{feeds}"
    )
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(folder), "AUDIENCE_PIPELINE_CONFIG": str(folder / "feeds.yaml")}


REPRO_FEED = "  repro: {format: repro, source: drop}\n"
MICS_FEED = ("  mics: {format: mediarithmics, source: drop, max_file_bytes: 4000000000,\n"
             "         identifiers: {user_account_id: user_id}}\n")


def cli_import(env: dict, feed: str, *files: Path) -> tuple[float, float, str]:
    return measure([CLI, "import", "--feed", feed, *map(str, files)], env)


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return " ".join(lines[-2:]) if lines else ""


def churn_imports(out: Path, files: dict, name: str, users: Path | None = None) -> dict:
    """First import of the previous list, then the churn import of the new list, in a fresh workspace."""
    env = workspace(out / name, REPRO_FEED, users)
    first = cli_import(env, "repro", files["prev_csv"])
    churn = cli_import(env, "repro", files["new_csv"])
    return {"env": env, "first": first, "churn": churn}


def analyst_figures(out: Path, files: dict, n: int) -> dict:
    env = workspace(out / "ws_history", MICS_FEED)
    history = sorted(files["history"].glob("big_*.csv"))
    initial = cli_import(env, "mics", history[0])
    increments = cli_import(env, "mics", *history[1:])
    analytics = str(out / "ws_history" / "analytics.duckdb")
    con = duckdb.connect(analytics, read_only=True)
    versions = con.execute("""SELECT version, member_count, valid_from FROM audience_versions
                              WHERE audience_name = 'big' ORDER BY valid_from""").fetchall()
    con.close()
    if len(versions) != HISTORY_VERSIONS:
        raise SystemExit(f"expected {HISTORY_VERSIONS} versions of 'big', found {len(versions)}")
    _, expected_members, from_v = versions[AS_OF_VERSION - 1]
    ts = from_v + (versions[AS_OF_VERSION][2] - from_v) / 2
    as_of_sql = (f"SELECT sum(length(user_id)) FROM members_as_of('big', "
                 f"TIMESTAMPTZ '{ts.astimezone(UTC).isoformat()}')")
    members_sql = "SELECT sum(length(user_id)) FROM members WHERE audience_name = 'big'"
    figures = {"initial": initial, "increments": increments, "versions": len(versions),
               "expected_as_of_members": expected_members, "current_members": versions[-1][1]}
    for key, sql in (("as_of", as_of_sql), ("members", members_sql)):
        done = subprocess.run([sys.executable, "-c", ANALYST_PROBE, analytics, sql], capture_output=True,
                              text=True, check=True)
        figures[key] = json.loads(done.stdout)
        figures[key + "_sql"] = sql
    return figures


def check_outputs(out: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """The churn import's results against what the generator says they must be, and against the other
    strategies' outputs where they ran: the same members, the same events, the right line numbers.
    Returns the mismatches (none when every strategy agrees) and what was compared."""
    churn = n // 20
    uid = ident(seed)
    con = duckdb.connect(str(out / "ws_c" / "analytics.duckdb"), read_only=True)
    con.execute(f"SET temp_directory = '{out / 'duckdb_tmp'}'")
    con.execute("SET enable_progress_bar = false")
    con.execute(f"CREATE TEMP TABLE expected_members AS SELECT {uid} AS user_id FROM range({churn}, {n + churn}) t(i)")
    # qualify: the new list's last `churn` lines; disqualify: the previous list's first `churn` IDs, no line
    con.execute(f"""CREATE TEMP TABLE expected_events AS
                    SELECT {uid} AS user_id, 'qualify' AS action, i - {churn} + 1 AS source_line
                    FROM range({n}, {n + churn}) t(i)
                    UNION ALL SELECT {uid}, 'disqualify', NULL FROM range(0, {churn}) t(i)""")
    con.execute("""CREATE TEMP TABLE got_events AS
                   SELECT user_id, action, source_line FROM membership_events
                   WHERE import_id = (SELECT max(import_id) FROM membership_events)""")
    members = "SELECT user_id FROM members WHERE audience_name = 'big'"
    comparisons = {
        "members (import vs expected)": (members, "SELECT user_id FROM expected_members"),
        "events with lines (import vs expected)": ("SELECT * FROM got_events", "SELECT * FROM expected_events"),
    }
    for name in ("floor", "naive"):
        if (out / f"{name}_members.parquet").exists():
            comparisons[f"members (import vs {name})"] = (members,
                                                          f"SELECT user_id FROM '{out}/{name}_members.parquet'")
            comparisons[f"events (import vs {name})"] = ("SELECT user_id, action FROM got_events",
                                                         f"SELECT user_id, action FROM '{out}/{name}_events.parquet'")
    problems = []
    for label, (got, want) in comparisons.items():
        [(extra, missing)] = con.execute(f"SELECT (SELECT count(*) FROM ({got} EXCEPT ALL {want})), "
                                         f"(SELECT count(*) FROM ({want} EXCEPT ALL {got}))").fetchall()
        if extra or missing:
            problems.append(f"{label}: {extra:,} rows too many, {missing:,} missing")
    # members who stayed keep the instant they first qualified; only the churn's newcomers qualified now
    [(new_now,)] = con.execute("""SELECT count(*) FROM members WHERE audience_name = 'big'
                                  AND qualified_at = (SELECT max(qualified_at) FROM members
                                                      WHERE audience_name = 'big')""").fetchall()
    if new_now != churn:
        problems.append(f"qualified_at: {new_now:,} members qualified at the churn import, expected {churn:,}")
    con.close()
    shutil.rmtree(out / "duckdb_tmp", ignore_errors=True)
    return problems, sorted(comparisons)


def print_row(label: str, figure: tuple | None, note: str = "") -> None:
    if figure is None:
        return
    wall, rss = figure[0], figure[1]
    print(f"  {label:<58}{wall:>9.1f}{rss:>12.0f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=16_000_000, help="IDs per list for (a)-(d) and the analyst queries")
    parser.add_argument("--sizes", default="1000000,4000000,16000000", help="list sizes for the growth figures")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--parts", default="a,b,c,d,growth,analyst")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    n = args.ids
    sizes = sorted({int(s) for s in args.sizes.split(",") if s}) if "growth" in parts else []
    out = args.out.resolve() / f"n{n}_seed{args.seed}"
    registry_users = n * 5 // 4
    load_before = os.getloadavg()

    started = time.monotonic()
    files = generate(out, n, args.seed, registry_users if "d" in parts else None, "analyst" in parts)
    print(f"data: {n:,} IDs of 30 characters, {files['new_csv'].stat().st_size / 1e6:.0f} MB per list, seed "
          f"{args.seed} (generated or reused in {time.monotonic() - started:.1f} s); {os.cpu_count()} cores, "
          f"load average {load_before[0]:.2f} at start")

    results: dict = {"ids": n, "seed": args.seed, "load_before": load_before, "at": datetime.now(UTC).isoformat()}
    if "a" in parts:
        results["a"] = measure([naive_python(args.out.resolve()), "-c", NAIVE_PANDAS, str(files["new_csv"]),
                                str(files["prev_parquet"]), str(out)])
    if "b" in parts:
        floor_script = out / "floor.sql"
        floor_script.write_text(FLOOR_SQL.format(new=files["new_csv"], prev=files["prev_parquet"], out=out))
        floor_cmd = f"import duckdb; duckdb.connect().execute(open({str(floor_script)!r}).read())"
        results["b"] = measure([sys.executable, "-c", floor_cmd], cwd=out)
    if "c" in parts:
        c = churn_imports(out, files, "ws_c")
        results["c_first"], results["c"] = c["first"], c["churn"]
        results["redeliver"] = cli_import(c["env"], "repro", files["new_csv"])
        results["checks"] = check_outputs(out, n, args.seed)
    if "d" in parts:
        d = churn_imports(out, files, "ws_d", files["registry"])
        results["d_first"], results["d"] = d["first"], d["churn"]
    growth = {}
    for size in sizes:
        if size == n and "c" in results:
            growth[size] = results["c"]
            continue
        size_out = args.out.resolve() / f"n{size}_seed{args.seed}"
        size_files = generate(size_out, size, args.seed, None, False)
        growth[size] = churn_imports(size_out, size_files, "ws_c")["churn"]
    if "analyst" in parts:
        results["analyst"] = analyst_figures(out, files, n)
    load_after = os.getloadavg()

    print(f"\n  {'step (' + format(n, ',') + ' IDs)':<58}{'wall s':>9}{'peak MB':>12}")
    print_row("(a) pandas + Python sets", results.get("a"))
    print_row("(b) plain DuckDB floor", results.get("b"))
    print_row("(c) audience-pipeline import, 5% churn, no registry", results.get("c"))
    print_row("    first import of the previous list (all qualify)", results.get("c_first"))
    print_row("    re-delivery of the same content (skipped)", results.get("redeliver"))
    print_row(f"(d) import, 5% churn, {registry_users:,}-user registry, 1% unregistered", results.get("d"))
    print_row("    first import of the previous list with the registry", results.get("d_first"))
    a, b, c = (results[k][0] if k in results else None for k in ("a", "b", "c"))
    print()
    if b and c:
        print(f"  c / b = {c / b:.2f}x (target <= 1.3x)")
    if a and c:
        print(f"  a / c = {a / c:.2f}x (for information: 5x would mean beating plain DuckDB itself)")
    if c and "redeliver" in results:
        print(f"  re-delivery / c = {results['redeliver'][0] / c:.2f}x (target <= 0.15x)")
    for key in ("c", "d"):
        if key in results:
            print(f"  peak RSS ({key}) = {results[key][1] / 1024:.2f} GB with memory_limit {MEMORY_LIMIT} "
                  f"(target <= 1.5 GB)")
    if "c" in results:
        print(f"  (c) says: {last_line(results['c'][2])}")
    if "checks" in results:
        problems, compared = results["checks"]
        print("  outputs: " + (f"MISMATCH: {'; '.join(problems)}" if problems else
                               f"identical ({', '.join(compared)}; qualified_at kept for members who stayed)"))
    if "d" in results:
        print(f"  (d) says: {last_line(results['d'][2])}")
    if growth:
        print("\n  growth of (c)                wall s    peak MB    s per million IDs")
        for size, figure in sorted(growth.items()):
            print(f"  {size:>14,} IDs      {figure[0]:>10.1f} {figure[1]:>10.0f} {figure[0] / size * 1e6:>16.2f}")
    if "analyst" in results:
        h = results["analyst"]
        print(f"\n  analyst queries on 'big', {n:,} members, {h['versions']} versions (mediarithmics feed)")
        print(f"    history: version 1 ({n:,} UPDATE lines) imported in {h['initial'][0]:.1f} s "
              f"(peak {h['initial'][1]:.0f} MB); versions 2-{h['versions']} ({h['versions'] - 1} command files "
              f"in one process) in {h['increments'][0]:.1f} s, {h['increments'][0] / (h['versions'] - 1):.1f} s each")
        for key, target in (("as_of", 1.0), ("members", 0.5)):
            connect, query, value = h[key]
            print(f"    {h[key + '_sql']}")
            print(f"      query {query:.3f} s (target <= {target} s), connect {connect:.3f} s, "
                  f"answer {value} = {value // 30 if value else 0:,} members of 30 characters")
        answered = (h["as_of"][2] or 0) // 30, (h["members"][2] or 0) // 30
        expected = h["expected_as_of_members"], h["current_members"]
        print(f"    expected {expected[0]:,} members at version {AS_OF_VERSION} and {expected[1]:,} now: "
              + ("answers match" if answered == expected else f"MISMATCH, answered {answered}"))
    # The load at the end counts this benchmark's own processes; only the load before it says whether the
    # machine was quiet.
    print(f"\n  load average {load_before[0]:.2f} before the run"
          + (" (NOT QUIET: figures are inflated)" if load_before[0] > 1.5 else " (quiet)")
          + f", {load_after[0]:.2f} at its end (including its own processes)")
    results["load_after"] = load_after
    results["growth"] = {str(k): v[:2] for k, v in growth.items()}
    for key in ("a", "b", "c", "c_first", "redeliver", "d", "d_first"):
        if key in results:
            results[key] = results[key][:2]
    if "analyst" in results:
        for key in ("initial", "increments"):
            results["analyst"][key] = results["analyst"][key][:2]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
