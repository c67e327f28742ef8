"""Storage guarantees: old versions expire, and a run waits for another process's hold on the catalog."""

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from audience_pipeline.storage.lake import Lake
from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture
def catalog_location(request):
    """DuckDB unless a test asks for both backends (the catalog-hold test is about the DuckDB file)."""
    if getattr(request, "param", "duckdb") == "duckdb":
        return None
    return over_both_catalogs(request)


@pytest.mark.parametrize("catalog_location", ["duckdb", "postgresql"], indirect=True)
def test_old_versions_are_pruned_after_retention(make_env):
    config = base_config()
    config["storage"]["retention_days"] = 1 / 86400  # one second
    env = make_env(config)
    v1 = env.import_file("r.csv", "a\nb\n")
    v2 = env.import_file("r.csv", "b\nc\n")
    lake = Lake(env.workspace.lake)
    assert lake.members_dir(1, v1.import_id).exists() and v2.status == "succeeded"
    time.sleep(1.2)
    v3 = env.import_file("r.csv", "c\nd\n")
    audience_id = env.query("SELECT audience_id FROM audiences WHERE name = 'r'")[0][0]
    assert not lake.members_dir(audience_id, v1.import_id).exists()
    assert lake.members_dir(audience_id, v3.import_id).exists()
    assert env.members("r") == {"c", "d"}
    # events and the activity log are kept
    assert env.query("SELECT count(*) FROM membership_events WHERE audience_name = 'r'")[0][0] == 2 + 2 + 2
    assert env.query("SELECT count(*) FROM imports")[0][0] == 3


def test_import_waits_while_another_process_holds_the_catalog(env):
    env.import_file("w.csv", "a\n")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(3);"
         " print(time.time(), flush=True); c.close()",
         str(env.workspace.catalog)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    record = env.import_file("w.csv", "a\nb\n")
    released = float(holder.stdout.readline())
    holder.wait(timeout=30)
    assert record.status == "succeeded" and env.members("w") == {"a", "b"}
    # it waited for the lock instead of failing: its commit came after the holder let go
    assert record.applied_at.timestamp() >= released


@pytest.mark.parametrize("catalog_location", ["duckdb", "postgresql"], indirect=True)
def test_retention_job_keeps_what_current_lists_need(make_env):
    config = base_config()
    config["storage"].update(retention_days=1 / 86400, raw_retention_days=1 / 86400,
                             partition_retention_days=1 / 86400)
    env = make_env(config)
    a = env.import_file("ret.csv", "a\nb\n")
    b = env.import_file("ret.csv", "b\nc\n")
    current = env.import_file("ret.csv", "c\nd\n")
    failed = env.import_file("other.csv", b"")
    time.sleep(1.2)
    job = env.runner.defs.resolve_job_def("audience_retention_job")
    result = job.execute_in_process(instance=env.instance)
    assert result.success
    lake = Lake(env.workspace.lake)
    assert lake.raw_path(current.sha256).exists()
    assert not lake.raw_path(a.sha256).exists() and not lake.raw_path(b.sha256).exists()
    assert lake.validated_rows(current.import_id).exists()
    assert not lake.validated_rows(a.import_id).exists()
    partitions = set(env.instance.get_dynamic_partitions("audience_files"))
    assert current.partition_key in partitions
    assert not {a.partition_key, b.partition_key, failed.partition_key} & partitions
    # the activity log, events and the current list are untouched
    assert env.query("SELECT count(*) FROM imports")[0][0] == 4
    assert env.query("SELECT count(*) FROM membership_events WHERE audience_name = 'ret'")[0][0] == 6
    assert env.members("ret") == {"c", "d"}
    # and the current list still re-materializes (its raw file and partition are there)
    again = env.runner.defs.resolve_job_def("audience_import_job").execute_in_process(
        partition_key=current.partition_key, instance=env.instance)
    assert again.success


def _ensure_after(barrier, root: str) -> None:
    barrier.wait()
    Lake(Path(root)).ensure()


def test_processes_starting_together_on_a_fresh_lake_all_start(tmp_path):
    # Workers of one workspace that start at once all find the placeholders missing and write them;
    # each must write its own temporary file (a shared name was moved away under the others).
    context = multiprocessing.get_context("spawn")
    for round_ in range(8):
        root = tmp_path / f"lake{round_}"
        barrier = context.Barrier(4)
        workers = [context.Process(target=_ensure_after, args=(barrier, str(root))) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0, 0, 0, 0], f"round {round_}"
        lake = Lake(root)
        assert all(path.exists() for path in (lake.members_file(0, 0), lake.events(0), lake.rejected(0)))
        assert not [p.name for p in root.rglob("*.tmp")]


def test_ensure_rewrites_only_a_placeholder_of_another_schema(tmp_path):
    # every import calls ensure: a placeholder already in its schema must not be written (nor uploaded) again
    lake = Lake(tmp_path / "lake")
    lake.ensure()
    placeholders = (lake.members_file(0, 0), lake.events(0), lake.rejected(0))
    inodes = [path.stat().st_ino for path in placeholders]
    lake.ensure()
    assert [path.stat().st_ino for path in placeholders] == inodes
    # an older schema's placeholder (fewer columns) is rewritten: it gives the views their columns
    duckdb.execute(f"COPY (SELECT 1 AS import_id) TO '{lake.events(0)}' (FORMAT parquet)")
    older = lake.events(0).stat().st_ino
    lake.ensure()
    assert lake.events(0).stat().st_ino != older
    assert [path.stat().st_ino for path in placeholders[::2]] == inodes[::2]
    assert len(duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{lake.events(0)}', hive_partitioning = false)"
                          ).fetchall()) > 1
