"""The removal gate: held imports, approve / reject, supersede, the incremental queue, dry runs, rollback."""

import pytest

from audience_pipeline_tests.conftest import base_config, over_both_catalogs


# Every test here runs over the DuckDB catalog file and over a real PostgreSQL catalog.
@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def users(prefix: str, n: int, start: int = 0) -> str:
    return "".join(f"{prefix}{i:05d}\n" for i in range(start, start + n))


@pytest.fixture
def gated(make_env):
    # held when more than 10 members AND more than 50% of the audience would go
    return make_env(base_config(gate={"max_removed": 10, "max_removed_share": 0.5}, max_reject_ratio=0.5))


@pytest.mark.parametrize(
    ("size", "keep", "held"),
    [
        (100, 60, False),  # big audience, 40 removed: over the count, under the share
        (100, 40, True),  # big audience, 60 removed: over both
        (16, 4, True),  # small audience, 12 removed = 75%: over both
        (8, 1, False),  # tiny audience, 7 removed = 88%: over the share, under the count
        (14, 4, False),  # small audience, exactly 10 removed: not more than the count
    ],
)
def test_both_thresholds_must_be_exceeded(gated, size, keep, held):
    gated.import_file("aud.csv", users("u", size))
    record = gated.import_file("aud.csv", users("u", keep))
    assert record.status == ("held" if held else "succeeded")
    expected = set(users("u", size).split()) if held else set(users("u", keep).split())
    assert gated.members("aud") == expected
    if held:
        assert (record.qualified, record.disqualified) == (0, size - keep)  # the would-be counts are logged
        assert "over the removal gate" in record.error
        assert gated.query("SELECT status FROM imports WHERE import_id = ?", [record.import_id]) == [("held",)]


def test_emptying_an_audience_is_always_held(make_env):
    env = make_env(base_config(max_reject_ratio=1.0))  # no gate thresholds configured
    env.import_file("e.csv", "a\nb\n")
    record = env.import_file("e.csv", "x,y\n")  # every row rejected: the list would be empty
    assert record.status == "held" and "would empty audience 'e'" in record.error
    assert env.members("e") == {"a", "b"}


def test_approve_and_reject(gated):
    gated.import_file("big.csv", users("u", 100))
    held = gated.import_file("big.csv", users("u", 20))
    service = gated.runner.service
    approved = service.approve(held.import_id)
    assert approved.status == "succeeded" and approved.disqualified == 80
    assert gated.members("big") == set(users("u", 20).split())
    assert gated.query("SELECT count(*) FROM membership_events WHERE import_id = ?", [held.import_id]) == [(80,)]

    gated.import_file("big2.csv", users("v", 100))
    held2 = gated.import_file("big2.csv", users("v", 1))
    rejected = service.reject(held2.import_id)
    assert rejected.status == "rejected"
    assert gated.members("big2") == set(users("v", 100).split())
    with pytest.raises(ValueError):
        service.approve(held2.import_id)


def test_a_newer_list_supersedes_a_held_one_and_is_gated_itself(gated):
    gated.import_file("s.csv", users("u", 100))
    first = gated.import_file("s.csv", users("u", 10))
    second = gated.import_file("s.csv", users("u", 5))
    assert (first.status, second.status) == ("held", "held")
    assert gated.query("SELECT status FROM imports WHERE import_id = ?", [first.import_id]) == [("superseded",)]
    fine = gated.import_file("s.csv", users("u", 90))  # a sane list: applies, and supersedes the held one
    assert fine.status == "succeeded"
    assert gated.query("SELECT status FROM imports WHERE import_id = ?", [second.import_id]) == [("superseded",)]
    assert gated.members("s") == set(users("u", 90).split())


def test_incremental_imports_wait_behind_a_held_one(make_env):
    import json

    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.5,
                                "gate": {"max_removed": 2, "max_removed_share": 0.3}}}
    env = make_env(config)
    (env.root / "drop" / "mics").mkdir(parents=True, exist_ok=True)

    def cmds(op, ids):
        return "".join(json.dumps({"operation": op, "expiration_duration": 0, "user_account_id": u,
                                   "segment_technical_name": "q"}) + "\n" for u in ids)

    env.import_file("1.ndjson", cmds("UPDATE", ["a", "b", "c", "d", "e"]), feed="mics")
    held = env.import_file("2.ndjson", cmds("DELETE", ["a", "b", "c"]), feed="mics")
    assert held.status == "held"
    waiting = env.import_file("3.ndjson", cmds("UPDATE", ["a", "z"]), feed="mics")
    assert waiting.status == "waiting" and f"held import {held.import_id}" in waiting.error
    assert env.members("q") == {"a", "b", "c", "d", "e"}
    env.runner.service.approve(held.import_id)  # applies the held one, then the queued one, in order
    assert env.members("q") == {"a", "d", "e", "z"}
    assert env.query("SELECT status FROM imports WHERE import_id = ?", [waiting.import_id]) == [("succeeded",)]


def test_dry_run_changes_nothing(gated, tmp_path):
    gated.import_file("d.csv", users("u", 100))
    before = gated.query("SELECT count(*) FROM membership_events")
    path = tmp_path / "d.csv"
    path.write_text(users("u", 10))
    record = gated.runner.import_file("repro", path, dry_run=True)
    assert record.status == "dry_run" and (record.qualified, record.disqualified) == (0, 90)
    assert "held: would remove 90 of 100" in record.error
    assert gated.members("d") == set(users("u", 100).split())
    assert gated.query("SELECT count(*) FROM membership_events") == before
    assert gated.query("SELECT member_count FROM audiences WHERE name = 'd'") == [(100,)]
    # files under a feed's dryrun/ prefix are dry runs too
    (gated.drop / "dryrun").mkdir()
    (gated.drop / "dryrun" / "d.csv").write_text(users("u", 95))
    [polled] = [r for r in gated.runner.poll("repro") if r.file_name == "d.csv" and r.status == "dry_run"]
    assert "passes the removal gate" in polled.error
    assert gated.members("d") == set(users("u", 100).split())


def test_reimport_rolls_back_through_the_gate(gated):
    first = gated.import_file("r.csv", users("u", 30))
    gated.import_file("r.csv", users("u", 30, start=100))  # 30 removed = 100%: over both -> held
    approved = gated.runner.service.approve(
        gated.query("SELECT max(import_id) FROM imports")[0][0])
    assert approved.status == "succeeded"
    rollback = gated.runner.reimport(first.import_id)
    assert rollback.status == "held"  # it would remove all 30 again: the gate applies to rollbacks too
    assert rollback.file_name == "r.csv" and rollback.sha256 == first.sha256
    gated.runner.service.approve(rollback.import_id)
    assert gated.members("r") == set(users("u", 30).split())
