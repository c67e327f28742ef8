"""Audience lifecycle: the per-feed audience limit, and deletion (a deleted name comes back only where the
feed reuses names)."""

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


def test_a_deleted_name_is_reused_where_the_format_creates_segments(mics_env):
    """mediarithmics (like Attentive: a segment that does not exist "will be created when this file is
    processed") reuses a deleted name by default: a new audience with a new id, while the deleted one keeps
    its history under its own id. Lookups by name answer for the live audience."""
    import json

    env = mics_env

    def commands(*users):
        return "".join(json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": u,
                                   "segment_technical_name": "seg"}) + "\n" for u in users)

    first = env.import_file("a.ndjson", commands("u1", "u2"), feed="mics")
    service = env.runner.service
    old_id = service.catalog.find_audience("mics", "seg")
    service.delete_audience("mics", "seg")
    assert service.catalog.find_audience("mics", "seg") is None
    again = env.import_file("b.ndjson", commands("u3"), feed="mics")
    assert again.status == "succeeded", again.error
    new_id = service.catalog.find_audience("mics", "seg")
    assert new_id not in (None, old_id)
    assert env.members("seg") == {"u3"}
    assert env.query("SELECT audience_id, status, member_count FROM audiences WHERE name = 'seg' ORDER BY 1") == [
        (old_id, "deleted", 0), (new_id, "active", 1)]
    # the deleted audience's history, by its id
    assert env.query("SELECT import_id, member_count, status FROM audience_versions WHERE audience_id = ? "
                     "ORDER BY version", [old_id])[0] == (first.import_id, 2, "deleted")
    # by name, the live audience: before it existed it had no members
    assert env.query("SELECT count(*) FROM members_as_of('seg', ?)", [first.applied_at]) == [(0,)]
    assert {u for (u,) in env.query("SELECT user_id FROM members_as_of('seg', now(), 'mics')")} == {"u3"}
    # and delete-audience deletes the live one
    service.delete_audience("mics", "seg")
    assert env.query("SELECT count(*) FROM audiences WHERE name = 'seg' AND status = 'active'") == [(0,)]


def test_repro_can_opt_in_to_reusing_deleted_names(make_env):
    env = make_env(base_config(reuse_deleted_names=True))
    env.import_file("x.csv", "u1\n")
    env.runner.service.delete_audience("repro", "x")
    assert env.import_file("x.csv", "u2\n").status == "succeeded"
    assert env.members("x") == {"u2"}
    assert env.query("SELECT status FROM audiences WHERE name = 'x' ORDER BY audience_id") == [
        ("deleted",), ("active",)]
