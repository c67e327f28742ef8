"""Import benchmark: a 16M-ID (~500 MB) Repro file against a previous 16M list with 5% churn.

Prints wall time and peak RSS of each step, each measured as its own process:
  floor     plain DuckDB doing the same set work by hand (read, dedupe, check, two anti-joins, write Parquet)
  first     `audience-pipeline import` of the previous list into an empty audience (all qualify)
  churn     `audience-pipeline import` of the new list (5% disqualified, 5% qualified)
  redeliver the same new list again through the CLI (skipped: content identical to the applied list)

    python benchmarks/import_16m.py [--ids 16000000] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent

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


def generate(out: Path, n: int) -> tuple[Path, Path, Path]:
    """Seeded, deterministic: the previous list, the new list (5% out, 5% in) and the previous list as Parquet."""
    prev_csv, new_csv, prev_parquet = out / "previous" / "big.csv", out / "new" / "big.csv", out / "previous.parquet"
    if new_csv.exists() and prev_csv.exists() and prev_parquet.exists():
        return prev_csv, new_csv, prev_parquet
    prev_csv.parent.mkdir(parents=True, exist_ok=True)
    new_csv.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    churn = n // 20
    ident = "substr(md5(i::VARCHAR) || md5((i + 7)::VARCHAR), 1, 30)"
    con.execute(f"COPY (SELECT {ident} FROM range(0, {n}) t(i)) TO '{prev_csv}' (HEADER false)")
    con.execute(f"COPY (SELECT {ident} AS user_id FROM range(0, {n}) t(i)) TO '{prev_parquet}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT {ident} FROM range({churn}, {n + churn}) t(i)) TO '{new_csv}' (HEADER false)")
    return prev_csv, new_csv, prev_parquet


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` in a child of a fresh child, so ru_maxrss is this command's own peak."""
    probe = (
        "import resource, subprocess, sys, time, json;"
        "t = time.monotonic(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "w = time.monotonic() - t;"
        "print(json.dumps([w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode,"
        " p.stdout[-2000:] + p.stderr[-2000:]]))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True)
    wall, rss_kb, code, output = json.loads(done.stdout)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{output}")
    return wall, rss_kb / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=16_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    out = args.out.resolve() / f"n{args.ids}"
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    prev_csv, new_csv, prev_parquet = generate(out, args.ids)
    print(f"data: {args.ids:,} IDs, {new_csv.stat().st_size / 1e6:.0f} MB per file "
          f"(generated/reused in {time.monotonic() - t:.1f} s)")

    ws = out / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "drop").mkdir(parents=True)
    (ws / "feeds.yaml").write_text(
        "storage: {lake: lake, catalog: catalog.duckdb, analytics: analytics.duckdb, memory_limit: 1GB}\n"
        "feeds:\n  repro: {format: repro, source: drop}\n"
    )
    (ws / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(ws), "AUDIENCE_PIPELINE_CONFIG": str(ws / "feeds.yaml")}
    cli = [str(Path(sys.executable).with_name("audience-pipeline")), "import", "--feed", "repro"]

    floor_sql = FLOOR_SQL.format(new=new_csv, prev=prev_parquet, out=out)
    floor_script = out / "floor.sql"
    floor_script.write_text(floor_sql)
    floor_cmd = f"import duckdb; duckdb.connect().execute(open({str(floor_script)!r}).read())"
    floor = measure([sys.executable, "-c", floor_cmd])
    first = measure(cli + [str(prev_csv)], env)
    churn = measure(cli + [str(new_csv)], env)
    again = measure(cli + [str(new_csv)], env)

    rows = [("floor (plain DuckDB)", floor), ("first import", first), ("churn import (5%)", churn),
            ("re-delivery (skipped)", again)]
    print(f"{'step':<24}{'wall s':>9}{'peak RSS MB':>14}")
    for name, (wall, rss, _) in rows:
        print(f"{name:<24}{wall:>9.1f}{rss:>14.0f}")
    print(f"churn / floor = {churn[0] / floor[0]:.2f}x   re-delivery / churn = {again[0] / churn[0]:.2f}x")
    print("last CLI line:", churn[2].strip().splitlines()[-1] if churn[2].strip() else "")


if __name__ == "__main__":
    main()
