"""Phone benchmark (issue 12, part 5): a 1M-row Attentive file of French numbers, imported by the CLI.

    python benchmarks/phones_1m.py [--rows 1000000] [--seed 12] [--out benchmarks/out]

The file mixes the spellings a French CRM export holds: ``06 12 34 56 78``, ``0612345678``,
``06.12.34.56.78``, ``+33 6 12 34 56 78``, ``+33612345678``, ``0033 6 12 34 56 78``, ``+33 (0)6 12 34 56 78``,
``(0)6-12-34-56-78``, about 1% numbers of other countries (``+44 7700 900123``, ``+49 1512 3456789``,
``+1 212-555-0100``), and about 1% that cannot be phones (too short, too long, letters), over 20 segments.
The workspace's feed is ``format: attentive, default_region: FR``; ``audience-pipeline import`` runs once on
a fresh workspace, and its wall time (the whole command: start-up, validation, diff, commit) is printed with
the import's counts. The target is <= 60 s. The file is generated once per (rows, seed) under --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from import_16m import cli_import, last_line, workspace  # noqa: E402

# Spellings of a French mobile or fixed number n (9 national digits, first 1-7 or 9), chosen by i % 10.
SPELLINGS_SQL = """
COPY (
    WITH n AS (
        SELECT i, lpad(((hash(i, $seed) % 800000000) + 100000000)::VARCHAR, 9, '0') AS nsn,
               'segment ' || (i % 20)::VARCHAR AS segment
        FROM range($rows) r(i)
    ),
    p AS (
        SELECT i, segment,
               '0' || nsn AS nat,
               substr(nsn, 1, 1) AS a, substr(nsn, 2, 2) AS b, substr(nsn, 4, 2) AS c,
               substr(nsn, 6, 2) AS d, substr(nsn, 8, 2) AS e, nsn
        FROM n
    )
    SELECT CASE
               WHEN i % 1000 = 199 THEN '06 12 34'
               WHEN i % 1000 = 299 THEN '06 12 34 56 78 90 12'
               WHEN i % 1000 = 399 THEN '06 12 AB 56 78'
               WHEN i % 100 = 97 THEN '+44 7700 9' || lpad((i % 100000)::VARCHAR, 5, '0')
               WHEN i % 100 = 98 THEN '+49 1512 ' || lpad((i % 10000000)::VARCHAR, 7, '0')
               WHEN i % 200 = 99 THEN '+1 212-555-' || lpad((i % 10000)::VARCHAR, 4, '0')
               WHEN i % 10 = 0 THEN concat_ws(' ', '0' || a, b, c, d, e)
               WHEN i % 10 = 1 THEN nat
               WHEN i % 10 = 2 THEN concat_ws('.', '0' || a, b, c, d, e)
               WHEN i % 10 = 3 THEN concat_ws(' ', '+33', a, b, c, d, e)
               WHEN i % 10 = 4 THEN '+33' || nsn
               WHEN i % 10 = 5 THEN concat_ws(' ', '0033', a, b, c, d, e)
               WHEN i % 10 = 6 THEN concat_ws(' ', '+33 (0)' || a, b, c, d, e)
               WHEN i % 10 = 7 THEN concat_ws('-', '(0)' || a, b, c, d, e)
               WHEN i % 10 = 8 THEN '33' || nsn
               ELSE concat_ws(' ', '0' || a, b || c, d || e)
           END || ', ' || segment
    FROM p
    ORDER BY i
) TO '{path}' (FORMAT csv, HEADER false, QUOTE '', DELIMITER '\x01')
"""

FEED = ("  attentive: {format: attentive, source: drop, customer_domain: bench, default_region: FR,\n"
        "              max_reject_ratio: 0.5, max_file_bytes: 4000000000}\n")


def write_file(path: Path, rows: int, seed: int) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    con = duckdb.connect()
    try:
        # the path is ours (under --out); DuckDB cannot bind COPY's target
        con.execute(SPELLINGS_SQL.format(path=str(partial).replace("'", "''")), {"rows": rows, "seed": seed})
    finally:
        con.close()
    partial.rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    data = args.out / f"phones_{args.rows}_{args.seed}" / "bench_subscriber_segment_20261201.csv"
    started = time.monotonic()
    write_file(data, args.rows, args.seed)
    print(f"file: {data} ({data.stat().st_size / 1e6:.1f} MB, {args.rows} rows, "
          f"written in {time.monotonic() - started:.1f} s)")
    env = workspace(args.out / "phones_workspace", FEED)
    wall, rss, output = cli_import(env, "attentive", data)
    print(f"import (default_region FR): {wall:.1f} s wall, peak RSS {rss:.0f} MB  (target <= 60 s)")
    print(f"  {last_line(output)}")
    con = duckdb.connect(str(args.out / "phones_workspace" / "analytics.duckdb"), read_only=True)
    try:
        counts = con.execute("SELECT rows_valid, rows_rejected, warnings, duplicates FROM imports").fetchall()
        reasons = con.execute("SELECT reason, count(*) FROM rejected_rows GROUP BY ALL ORDER BY ALL").fetchall()
    finally:
        con.close()
    print(f"  imports (rows_valid, rows_rejected, warnings, duplicates): {counts}")
    print(f"  rejected by reason: {reasons}")


if __name__ == "__main__":
    main()
