"""Audience lifecycle: the per-feed audience limit, and deletion (a deleted name cannot come back)."""

import pytest

from audience_pipeline_tests.conftest import base_config, over_both_catalogs


# Every test here runs over the DuckDB catalog file and over a real PostgreSQL catalog.
@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def test_audience_limit(make_env):
    env = make_env(base_config(max_audiences=2))
    assert env.import_file("a.csv", "u1\n").status == "succeeded"
    assert env.import_file("b.csv", "u2\n").status == "succeeded"
    third = env.import_file("c.csv", "u3\n")
    assert third.status == "failed" and "audience limit 2 reached" in third.error
    assert env.import_file("a.csv", "u1\nu4\n").status == "succeeded"  # existing audiences keep updating
    assert env.query("SELECT name FROM audiences ORDER BY 1") == [("a",), ("b",)]


def test_delete_audience_then_recreate_is_refused(env):
    env.import_file("gone.csv", "u1\nu2\n")
    job = env.runner.defs.resolve_job_def("audience_delete_job")
    result = job.execute_in_process(
        instance=env.instance,
        run_config={"ops": {"delete_audience": {"config": {"feed": "repro", "name": "gone"}}}},
    )
    assert result.success
    assert env.members("gone") == set()
    assert env.query("SELECT status, member_count FROM audiences WHERE name = 'gone'") == [("deleted", 0)]
    assert sorted(env.query("SELECT action, user_id FROM membership_events WHERE audience_name = 'gone' "
                            "AND action = 'disqualify'")) == [("disqualify", "u1"), ("disqualify", "u2")]
    again = env.import_file("gone.csv", "u1\n")
    assert again.status == "failed" and "was deleted; a deleted name cannot be re-created" in again.error
    assert env.members("gone") == set()
