"""Catalog growth benchmark (issue #16): does a commit's cost grow with the history?

    python benchmarks/catalog_growth.py [--sizes 1000,100000,1000000] [--backends duckdb,postgresql]
                                        [--audiences 1000] [--out benchmarks/out/growth] [--catalog-only]

For each backend and each history size it builds a workspace, imports one real file (which creates the
catalog, the lake and the analysts' views), then synthesizes a history of that many imports straight into
the catalog and the lake, shaped like one feed of --audiences audiences each updated every ten minutes
(1,000 audiences: 144,000 imports a day):

  catalog   one succeeded import per (audience, ten minutes), each the audience's new version; older versions
            are closed, their member files pruned (as retention does)
  lake      the current member list of every audience (50 IDs), 10 membership events per import (5 in,
            5 out), 2 rejected rows for every tenth import -- merged into chunks of 1,000 imports as the
            exports merge them, the newest imports (at least 1,000) in a folder each, as imports write them

Then it times, each a fresh process or connection:

  publish   the first export of the synthesized history (written straight into the tables, every row is
            marked changed: one delta of the whole catalog, compacted into a base, as on the upgrade of a
            workspace from whole-catalog snapshots); each later commit exports only what it changed
  import    `audience-pipeline import` of a real small list (50 IDs, 5 in, 5 out) into an existing audience,
            end to end (CLI start-up included); twice, on two audiences
  queries   the analyst queries of the issue's targets, on a fresh read-only connection to the views file

With --catalog-only, no events or rejected-rows files are written (the slow part of the synthesis: about a
millisecond a file) and the two queries over them are left out.
The PostgreSQL catalog is a throwaway cluster started from /usr/lib/postgresql/*/bin, as the test suite does.
The load average is printed before and after: the figures are only comparable on a comparable load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow.compute as pc

from audience_pipeline.config import load_workspace
from audience_pipeline.sql import quote_literal
from audience_pipeline.storage import chunks
from audience_pipeline.storage.catalog import Catalog
from audience_pipeline.storage.lake import Lake

ROOT = Path(__file__).resolve().parent.parent

CLI = str(Path(sys.executable).with_name("audience-pipeline"))
MEMBERS = 50
EVENTS_PER_IMPORT = 10
PERIOD_SECONDS = 600
PROBE_AUDIENCES = (42, 77)

QUERIES = {
    "SELECT * FROM audiences": "SELECT * FROM audiences",
    "imports ORDER BY import_id DESC LIMIT 100": "SELECT * FROM imports ORDER BY import_id DESC LIMIT 100",
    "one audience's audience_versions": "SELECT * FROM audience_versions WHERE audience_name = {name}",
    "its membership_events of the last day": "SELECT * FROM membership_events WHERE audience_name = {name} "
                                             "AND event_at > now() - INTERVAL 1 DAY",
    "one import's rejected_rows": "SELECT * FROM rejected_rows WHERE import_id = {rejected_import}",
}
HISTORY_FILE_QUERIES = ("its membership_events of the last day", "one import's rejected_rows")


def audience_name(index: int) -> str:
    return f"syn_{index:05d}"


# -- a throwaway PostgreSQL cluster (the test suite's way: audience_pipeline_tests/conftest.py) ------------------
class Postgres:
    def __init__(self):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            raise SystemExit("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = found[-1].parent
        self.base = Path(tempfile.mkdtemp(prefix="catalog-growth-pg-"))
        self.data = self.base / "data"
        self.data.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.data, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        subprocess.run([*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                        str(self.data / "server.log"), "-o",
                        f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
        self.count = 0

    def new_database(self) -> str:
        import psycopg

        self.count += 1
        name = f"growth{self.count}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


# -- workspace and history ---------------------------------------------------------------------------------
def make_workspace(folder: Path, catalog: str) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "drop").mkdir(parents=True)
    (folder / "feeds.yaml").write_text(
        f"storage: {{lake: lake, catalog: '{catalog}', analytics: analytics.duckdb}}\n"
        f"feeds:\n  repro: {{format: repro, source: drop}}\n")
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(folder), "AUDIENCE_PIPELINE_CONFIG": str(folder / "feeds.yaml")}


def cli_import(env: dict, path: Path) -> float:
    start = time.monotonic()
    done = subprocess.run([CLI, "import", "--feed", "repro", str(path)], env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"import of {path} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall


def reserve(con, sequence: str, count: int) -> int:
    """Take ``count`` numbers of a catalog sequence in one statement; the first of them (contiguous here:
    nothing else runs on this catalog)."""
    (first,) = con.execute(f"SELECT min(x) FROM (SELECT nextval('{sequence}') AS x "
                           f"FROM generate_series(1, ?) t(g)) s", [count]).fetchone()
    return first


def synthesize_catalog(catalog: Catalog, n: int, audiences: int, end_epoch: float) -> tuple[int, int]:
    """Insert ``n`` succeeded imports, their audiences and versions; returns the first import and audience id."""
    step = PERIOD_SECONDS / audiences
    with catalog.session() as con:
        first_audience = reserve(con, "audience_ids", audiences)
        first_import = reserve(con, "import_ids", n)
        con.execute(
            "INSERT INTO audiences (audience_id, feed, name, status, created_at) "
            "SELECT ? + g, 'repro', 'syn_' || lpad(CAST(g AS VARCHAR), 5, '0'), 'active', to_timestamp(?) "
            "FROM generate_series(0, ? - 1) t(g)",
            [first_audience, end_epoch - n * step - 1, audiences])
        con.execute(
            "INSERT INTO imports (import_id, partition_key, delivery, feed, source_uri, file_name, sha256, "
            "  size_bytes, semantics, status, rows_total, rows_valid, rows_rejected, duplicates, unmatched, "
            "  qualified, disqualified, members, noops, warnings, audiences, received_at, finished_at, applied_at) "
            "SELECT ? + g, 'repro/syn/' || CAST(g AS VARCHAR), 'd' || CAST(g AS VARCHAR), 'repro', "
            "  'file:///drop/' || name || '.csv', name || '.csv', 'syn' || CAST(g AS VARCHAR), 1500, 'replace', "
            "  'succeeded', 52, 50, CASE WHEN g % 10 = 0 THEN 2 ELSE 0 END, 0, 0, 5, 5, 50, 0, 0, "
            "  ARRAY[name], to_timestamp(t0), to_timestamp(t0), to_timestamp(t0) "
            "FROM (SELECT g, 'syn_' || lpad(CAST(g % ? AS VARCHAR), 5, '0') AS name, ? - (? - 1 - g) * ? AS t0 "
            "      FROM generate_series(0, ? - 1) t(g)) s",
            [first_import, audiences, end_epoch, n, step, n])
        con.execute(
            "INSERT INTO audience_versions (audience_id, version, import_id, sha256, member_count, qualified, "
            "  disqualified, valid_from, valid_to, files_deleted) "
            "SELECT audience_id, import_id, import_id, sha256, 50, 5, 5, applied_at, valid_to, valid_to IS NOT NULL "
            "FROM (SELECT ? + (import_id - ?) % ? AS audience_id, import_id, sha256, applied_at, "
            "             lead(applied_at) OVER (PARTITION BY (import_id - ?) % ? ORDER BY import_id) AS valid_to "
            "      FROM imports WHERE import_id >= ?) s",
            [first_audience, first_import, audiences, first_import, audiences, first_import])
    return first_import, first_audience


def synthesize_lake(lake_root: Path, n: int, audiences: int, first_import: int, first_audience: int,
                    end_epoch: float, history_files: bool = True) -> int:
    """The current member list of every audience, each import's events and every tenth import's rejected rows,
    in chunks and per-import files as the exports leave them; returns the highest import id merged into a
    chunk. (DuckDB's partitioned COPY manages ~10 folders a second with 100,000 partitions, so the rows are
    made in DuckDB and sliced into files here.)"""
    step = PERIOD_SECONDS / audiences
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    imports = (f"(SELECT {first_import} + g AS import_id, {first_audience} + g % {audiences} AS audience_id, "
               f"g % {audiences} AS idx, to_timestamp({end_epoch} - ({n} - 1 - g) * {step}) AS at_ts "
               f"FROM generate_series(0, {n} - 1) t(g))")
    current = f"(SELECT * FROM {imports} WHERE import_id >= {first_import} + {n} - {audiences})"
    members = con.sql(f"""SELECT audience_id, import_id AS version, 'u' || idx || '_' || j AS user_id,
                                 at_ts AS qualified_at, NULL::TIMESTAMPTZ AS expires_at, NULL::VARCHAR AS data_bag
                          FROM {current}, generate_series(0, {MEMBERS} - 1) m(j) ORDER BY import_id, j""")
    write_groups(members.to_arrow_table(), MEMBERS, ["audience_id", "version"],
                 lambda a, v: Lake(lake_root).members_file(a, v))
    if not history_files:
        return 0
    events = con.sql(f"""SELECT import_id, audience_id, 'u' || idx || '_' || j AS user_id,
                                CASE WHEN j < {EVENTS_PER_IMPORT // 2} THEN 'disqualify' ELSE 'qualify' END AS action,
                                at_ts AS event_at, j + 1 AS source_line, at_ts AS observed_at
                         FROM {imports}, generate_series(0, {EVENTS_PER_IMPORT} - 1) e(j) ORDER BY import_id, j""")
    rejected = con.sql(f"""SELECT import_id, j + 1 AS line_number, 'blank line' AS reason, '' AS raw
                           FROM {imports}, generate_series(0, 1) r(j)
                           WHERE (import_id - {first_import}) % 10 = 0 ORDER BY import_id, j""")
    # As the exports leave them: settled ranges merged into chunks (storage.chunks), the newest imports (at
    # least a chunk's worth) in files of their own.
    lake = Lake(lake_root)
    upto = max(0, ((first_import + n - 1) // chunks.CHUNK - 1) * chunks.CHUNK)
    for kind, rows, size in (("events", events, EVENTS_PER_IMPORT), ("rejected", rejected, 2)):
        table = rows.to_arrow_table()
        con.register("rows_table", table)
        for lo in range(1, upto + 1, chunks.CHUNK):
            hi = lo + chunks.CHUNK - 1
            dest = chunks.chunk_file(lake, kind, lo, hi)
            dest.parent.mkdir(parents=True, exist_ok=True)
            earlier = chunks.per_import_file(lake, kind, 1)  # the warm-up import's own file, if any
            extra = (f" UNION ALL BY NAME SELECT * FROM read_parquet({quote_literal(earlier)}, "
                     f"hive_partitioning = true)" if lo == 1 and earlier.exists() else "")
            con.execute(f"COPY (SELECT * FROM rows_table WHERE import_id BETWEEN {lo} AND {hi}{extra} "
                        f"ORDER BY import_id) TO {quote_literal(dest)} (FORMAT parquet)")
        con.unregister("rows_table")
        if upto:
            shutil.rmtree(chunks.per_import_file(lake, kind, 1).parent, ignore_errors=True)
        newest = table.filter(pc.greater(table.column("import_id"), upto))
        write_groups(newest, size, ["import_id"], lambda i, kind=kind: chunks.per_import_file(lake, kind, i))
    con.close()
    return upto


def write_groups(table, size: int, keys: list[str], path_of) -> None:
    """Write each run of ``size`` rows (sorted by ``keys``) to ``path_of(*keys)``, without the key columns
    (they are the hive folders)."""
    import pyarrow.parquet as pq

    body = table.drop_columns(keys)
    columns = [table.column(k) for k in keys]
    for start in range(0, table.num_rows, size):
        path = path_of(*(c[start].as_py() for c in columns))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(body.slice(start, size), path)


def small_list(drop: Path, index: int, tag: str) -> Path:
    """The audience's list with 5 members out and 5 new ones in (relative to the synthesized list)."""
    path = drop / tag / f"{audience_name(index)}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"u{index}_{j}\n" for j in range(5, MEMBERS + 5)))
    return path


def time_query(analytics: Path, sql: str) -> tuple[float, int]:
    con = duckdb.connect(str(analytics), read_only=True)
    try:
        start = time.monotonic()
        rows = con.execute(sql).fetchall()
        return time.monotonic() - start, len(rows)
    finally:
        con.close()


def run_case(out: Path, backend: str, n: int, audiences: int, postgres: Postgres | None,
             catalog_only: bool = False) -> dict:
    folder = out / f"{backend}_{n}"
    location = postgres.new_database() if backend == "postgresql" else "catalog.duckdb"
    env = make_workspace(folder, location)
    warmup = folder / "drop" / "warmup.csv"
    warmup.write_text("w1\nw2\n")
    cli_import(env, warmup)
    workspace = load_workspace(folder / "feeds.yaml")
    lake = Lake(workspace.lake)
    catalog = Catalog(workspace.catalog, lake)
    end_epoch = time.time() - 60
    start = time.monotonic()
    first_import, first_audience = synthesize_catalog(catalog, n, audiences, end_epoch)
    upto = synthesize_lake(workspace.lake, n, audiences, first_import, first_audience, end_epoch, not catalog_only)
    with catalog.session() as con:
        con.execute("UPDATE publication SET chunks_upto = ?", [upto])
        if backend == "postgresql":
            con.execute("ANALYZE")  # a database grown by imports has statistics; a bulk load has none yet
    figures = {"synthesis": time.monotonic() - start}
    start = time.monotonic()
    catalog.publish()
    figures["publish"] = time.monotonic() - start
    for tag, index in zip(("first", "second"), PROBE_AUDIENCES, strict=True):
        figures[f"import ({tag})"] = cli_import(env, small_list(folder / "drop", index, tag))
    params = {"name": quote_literal(audience_name(PROBE_AUDIENCES[0])), "rejected_import": first_import + n - 10}
    rows = {}
    for label, text in QUERIES.items():
        if catalog_only and label in HISTORY_FILE_QUERIES:
            continue
        figures[label], rows[label] = time_query(workspace.analytics, text.format(**params))
    versions = rows["one audience's audience_versions"]
    expected = n // audiences + (1 if PROBE_AUDIENCES[0] < n % audiences else 0) + 1
    if versions != expected:
        raise SystemExit(f"{backend} {n}: expected {expected} versions of the probe audience, found {versions}")
    if rows["SELECT * FROM audiences"] != audiences + 1:
        raise SystemExit(f"{backend} {n}: expected {audiences + 1} audiences, found {rows['SELECT * FROM audiences']}")
    if not catalog_only and rows["its membership_events of the last day"] < EVENTS_PER_IMPORT:
        raise SystemExit(f"{backend} {n}: the probe audience's events of the last day are missing")
    figures["rows"] = rows
    return figures


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--backends", default="duckdb,postgresql")
    parser.add_argument("--audiences", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "growth"))
    parser.add_argument("--keep", action="store_true", help="keep the workspaces (they are deleted otherwise)")
    parser.add_argument("--catalog-only", action="store_true",
                        help="no events or rejected-rows files (the catalog and the current lists only)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {load()}  ({os.cpu_count()} cores)", flush=True)
    postgres = Postgres() if "postgresql" in backends else None
    results: dict[tuple[str, int], dict] = {}
    try:
        for backend in backends:
            for n in sizes:
                results[backend, n] = figures = run_case(out, backend, n, args.audiences, postgres, args.catalog_only)
                shown = ", ".join(f"{k} {v:.2f} s" for k, v in figures.items() if k != "rows")
                print(f"  {backend} {n:,} imports: {shown}", flush=True)
                if not args.keep:
                    shutil.rmtree(out / f"{backend}_{n}", ignore_errors=True)
    finally:
        if postgres is not None:
            postgres.stop()
    print(f"load average after: {load()}")
    labels = [k for k in next(iter(results.values())) if k not in ("rows", "synthesis")]
    columns = [(b, n) for b in backends for n in sizes]
    print()
    print(f"{'seconds':<44}" + "".join(f"{b[:6] + ' ' + f'{n:,}':>18}" for b, n in columns))
    for label in ["synthesis", *labels]:
        print(f"{label:<44}" + "".join(f"{results[c][label]:>18.2f}" for c in columns))
    for backend in backends:
        small, large = results[backend, sizes[0]], results[backend, sizes[-1]]
        ratio = large["import (second)"] / small["import (second)"]
        print(f"{backend}: small import at {sizes[-1]:,} = {ratio:.2f}x its time at {sizes[0]:,} (target <= 1.5x)")


if __name__ == "__main__":
    main()
