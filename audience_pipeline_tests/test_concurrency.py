"""Concurrency at the storage layer: 1,000 imports of 200 audiences, several per audience and out of order,
committed at once by four worker processes and by 20 real Dagster runs drained from the production queue,
against one PostgreSQL catalog and one lake. The result must be the serial application in arrival order,
with every event exactly once (see simulation.py, which also runs standalone for figures)."""

from collections import Counter
from pathlib import Path

import psycopg
import pytest

from audience_pipeline.config import load_workspace
from audience_pipeline.workspace_setup import prepare
from audience_pipeline_tests.simulation import generate, observe, run_concurrently, serial_expectation, write_workspace
from audience_pipeline_tests.test_deployment import (  # noqa: F401 (fixture)
    production_instance,
    queue_imports,
    running_daemon,
    wait_for_runs,
)

AUDIENCES, IMPORTS, PROCESSES, DAGSTER_RUNS = 200, 1000, 4, 20


@pytest.mark.timeout(1200)
def test_concurrent_imports_equal_the_serial_application(tmp_path, production_instance, postgres,  # noqa: F811
                                                         monkeypatch):
    instance, _ = production_instance
    catalog = postgres()
    ws = tmp_path / "ws"
    config = write_workspace(ws, catalog)
    (ws / "workspace.yaml").write_text("load_from:\n  - python_module: audience_pipeline.definitions\n")
    monkeypatch.setenv("AUDIENCE_PIPELINE_CONFIG", str(config))
    workspace = load_workspace(config)
    prepare(workspace)
    deliveries = generate(ws, AUDIENCES, IMPORTS)
    assert max(Counter(d.audience for d in deliveries).values()) >= 5
    # ODP lists of one audience arrive out of their `ts` order
    assert any(a.ts > b.ts for a, b in zip(deliveries, deliveries[1:], strict=False)
               if a.audience == b.audience and a.ts is not None)

    step = IMPORTS // DAGSTER_RUNS
    by_dagster = [d for d in deliveries if d.seq % step == step // 2]
    by_workers = [d for d in deliveries if d.seq % step != step // 2]
    run_ids = queue_imports(instance, ws / "workspace.yaml", [(d.feed, d.path) for d in by_dagster])
    with running_daemon(ws / "workspace.yaml", tmp_path / "daemon.log"):
        results = run_concurrently(config, by_workers, PROCESSES)
        records = wait_for_runs(instance, run_ids, tmp_path / "daemon.log", 600)
    assert {r.dagster_run.status.value for r in records} == {"SUCCESS"}

    with psycopg.connect(catalog) as con:
        imports = con.execute("SELECT import_id, source_uri, status, error, run_id FROM imports "
                              "ORDER BY import_id").fetchall()
        assert con.execute("SELECT count(*) FROM audience_locks").fetchone() == (0,)
    seq_of = {d.path.resolve().as_uri(): d.seq for d in deliveries}
    assert len(imports) == IMPORTS and {seq_of[uri] for _, uri, *_ in imports} == set(seq_of.values())
    assert {run_id for *_, run_id in imports if run_id} == set(run_ids)
    statuses = Counter(status for _, _, status, _, _ in imports)
    assert set(statuses) == {"succeeded", "skipped"}, [i for i in imports if i[2] not in ("succeeded", "skipped")]
    # the stale ODP lists, at least, were skipped, with that reason
    assert all(error.startswith(("stale", "content identical")) for _, _, s, error, _ in imports if s == "skipped")
    assert len(results) == len(by_workers) and all(import_id for import_id, _, _ in results.values())

    arrival = [seq_of[uri] for _, uri, *_ in imports]
    expected = serial_expectation(deliveries, arrival)
    observed = observe(workspace.analytics)
    assert observed.problems == []
    assert len(expected) == AUDIENCES
    assert {a: sorted(m) for a, m in observed.members.items()} == {a: sorted(m) for a, m in expected.items()}


def test_the_expectation_follows_arrival_order_and_list_time():
    """The oracle itself: Repro lists replace in arrival order, an ODP list older than the applied one is skipped."""
    from audience_pipeline_tests.simulation import Delivery

    deliveries = [Delivery(0, "repro", "a", Path("x"), frozenset({"u1"}), None),
                  Delivery(1, "repro", "a", Path("y"), frozenset({"u2"}), None),
                  Delivery(2, "odp", "b", Path("z"), frozenset({"u3"}), 5),
                  Delivery(3, "odp", "b", Path("w"), frozenset({"u4"}), 4)]
    assert serial_expectation(deliveries, [0, 1, 2, 3]) == {"a": {"u2"}, "b": {"u3"}}
    assert serial_expectation(deliveries, [1, 0, 3, 2]) == {"a": {"u1"}, "b": {"u3"}}


@pytest.mark.timeout(600)
def test_concurrent_imports_on_one_machine_with_the_duckdb_catalog(tmp_path):
    """The default catalog file, shared by three processes on one machine (fewer imports: each catalog
    session holds the whole file, so processes queue for it)."""
    ws = tmp_path / "ws"
    config = write_workspace(ws, None)
    workspace = load_workspace(config)
    prepare(workspace)
    deliveries = generate(ws, 20, 60, seed=11)
    results = run_concurrently(config, deliveries, 3)
    assert {status for _, status, _ in results.values()} == {"succeeded", "skipped"}, [
        r for r in results.values() if r[1] not in ("succeeded", "skipped")]
    arrival = sorted(results, key=lambda seq: results[seq][0])
    observed = observe(workspace.analytics)
    assert observed.problems == []
    expected = serial_expectation(deliveries, arrival)
    assert {a: sorted(m) for a, m in observed.members.items()} == {a: sorted(m) for a, m in expected.items()}
