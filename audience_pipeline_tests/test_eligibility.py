"""Opt-outs act promptly: a new users registry version disqualifies the members it makes ineligible, through
users_registry_sensor's tick and registry_eligibility_job, as an import of their own (full-list and incremental
feeds); the same version never sweeps twice; a large drop is e-mailed. And `user-audiences`, as a user runs it."""

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from audience_pipeline.eligibility import EligibilitySweep
from audience_pipeline.keys import partition_key
from audience_pipeline.runner import sensor_context
from audience_pipeline_tests.conftest import base_config, over_both_catalogs
from audience_pipeline_tests.test_notifications import smtp  # noqa: F401 (fixture)

OPTED_IN = {"status": "active", "sms_opt_in": ["true", "yes"]}


def write_registry(path, rows: list[tuple[str, str, str]]) -> str:
    """A new registry version, moved into place as an upload would be: (user_id, status, sms_opt_in) rows."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("user_id,status,sms_opt_in\n" + "".join(f"{u},{s},{o}\n" for u, s, o in rows))
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def everyone(*users: str) -> list[tuple[str, str, str]]:
    return [(u, "active", "yes") for u in users]


@pytest.fixture
def catalog_location(request):
    """The DuckDB catalog file, or with ``indirect`` parametrization over both, a real PostgreSQL catalog too."""
    return over_both_catalogs(request) if hasattr(request, "param") else None


@pytest.fixture
def registry(tmp_path):
    return tmp_path / "users.csv"


def with_registry(config: dict, registry) -> dict:
    config["users"] = {"path": str(registry)}
    return config


def tick(env):
    """One evaluation of users_registry_sensor against the env's real Dagster instance."""
    sensor = env.runner.defs.resolve_sensor_def("users_registry_sensor")
    return sensor(sensor_context(env.workspace, env.instance, env.runner.defs, None))


def run_requested(env, request) -> dg.ExecuteInProcessResult:
    job = env.runner.defs.resolve_job_def("registry_eligibility_job")
    return job.execute_in_process(run_config=request.run_config, tags=request.tags, instance=env.instance)


def sweep_imports(env) -> list[tuple]:
    return env.query("SELECT import_id, feed, status, disqualified, ineligible, users_sha256 FROM imports "
                     "WHERE file_name = '(opt-out sweep)' ORDER BY import_id")


def test_an_opt_out_leaves_a_full_list_feed_at_the_next_tick_and_once(make_env, registry):
    write_registry(registry, everyone("U1", "U2", "U3", "U4"))
    env = make_env(with_registry(base_config(eligible=OPTED_IN), registry))
    first = env.import_file("sms.csv", "U1\nU2\nU3\nU4\nU9\n")
    assert first.status == "succeeded" and env.members("sms") == {"U1", "U2", "U3", "U4"}
    assert (first.unmatched, first.ineligible) == (1, 0)
    # the first tick sweeps the lists made before any sweep: nothing is ineligible, so no import, but recorded
    assert isinstance(tick(env), dg.RunRequest)
    run_requested(env, tick(env))
    assert isinstance(tick(env), dg.SkipReason) and sweep_imports(env) == []

    # U2 opts out, U3 is deactivated, U4 is gone from the registry
    sha = write_registry(registry, [("U1", "active", "true"), ("U2", "active", "no"), ("U3", "inactive", "yes")])
    request = tick(env)
    assert isinstance(request, dg.RunRequest)
    assert run_requested(env, request).success
    assert env.members("sms") == {"U1"}
    [(import_id, feed, status, disqualified, ineligible, users_sha256)] = sweep_imports(env)
    assert (feed, status, disqualified, ineligible, users_sha256) == ("repro", "succeeded", 3, 3, sha)
    record = env.runner.service.catalog.get_import(import_id)
    # the events happen at the sweep's one instant, and the analysts' history agrees with them
    events = env.query("SELECT user_id, action, event_at, source_file FROM membership_events WHERE import_id = ? "
                       "ORDER BY user_id", [import_id])
    assert events == [(u, "disqualify", record.applied_at, "(opt-out sweep)") for u in ("U2", "U3", "U4")]
    before = record.applied_at - timedelta(microseconds=1)
    assert {r[0] for r in env.query("SELECT user_id FROM members_as_of('sms', ?)", [before])} == {
        "U1", "U2", "U3", "U4"}
    assert {r[0] for r in env.query("SELECT user_id FROM members_as_of('sms', ?)", [record.applied_at])} == {"U1"}

    # the same registry version never sweeps again: the sensor skips, and a sweep by hand finds nothing due
    assert isinstance(tick(env), dg.SkipReason)
    assert EligibilitySweep(env.runner.service).sweep() == []
    assert len(sweep_imports(env)) == 1

    # the next list is validated against the new version: the opted-out rows are rejected and counted
    again = env.import_file("sms.csv", "U1\nU2\nU3\nU4\n")
    assert again.status == "succeeded" and env.members("sms") == {"U1"}
    row = env.query("SELECT ineligible, unmatched, rows_valid, resolved_by FROM imports WHERE import_id = ?",
                    [again.import_id])
    [(ineligible, unmatched, valid, resolved_by)] = row
    assert (ineligible, unmatched, valid) == (2, 1, 1)
    assert sum(json.loads(resolved_by).values()) == valid
    assert sorted(env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ?",
                            [again.import_id])) == [(2, "ineligible"), (3, "ineligible"), (4, "unmatched")]


@pytest.fixture
def loymax(make_env, registry):
    config = with_registry(base_config(), registry)
    config["feeds"]["loymax"] = {"format": "loymax", "source": "drop/loymax", "mode": "per_row", "action": "add",
                                 "max_reject_ratio": 0.5, "eligible": OPTED_IN}
    env = make_env(config)
    (env.root / "drop" / "loymax").mkdir(parents=True, exist_ok=True)
    return env


def test_an_incremental_feed_loses_its_opted_out_members_and_takes_them_back_from_a_file(loymax, registry):
    env = loymax
    write_registry(registry, everyone("U1", "U2", "U3"))
    env.import_file("assign.csv", "U1; Gold\nU2; Gold\nU2; Silver\nU3; Silver\n", feed="loymax")
    env.import_file("more.csv", "U1; Silver\n", feed="loymax")  # adds: Gold keeps its members
    assert env.members("Gold") == {"U1", "U2"} and env.members("Silver") == {"U1", "U2", "U3"}
    EligibilitySweep(env.runner.service).sweep()

    write_registry(registry, [("U1", "active", "yes"), ("U2", "active", "false"), ("U3", "active", "yes")])
    [result] = EligibilitySweep(env.runner.service).sweep()
    # one import for the feed, naming both audiences U2 was in; the repro feed (no eligible:) is not swept
    assert (result.feed, result.ineligible, result.record.disqualified) == ("loymax", 2, 2)
    assert sorted(result.record.audiences) == ["Gold", "Silver"]
    assert env.members("Gold") == {"U1"} and env.members("Silver") == {"U1", "U3"}
    assert env.query("SELECT audience_name, user_id, action FROM membership_events WHERE import_id = ? ORDER BY 1",
                     [result.record.import_id]) == [("Gold", "U2", "disqualify"), ("Silver", "U2", "disqualify")]

    # U2 opts in again: nobody is ineligible (no import), and the feed's next file adds U2 back
    write_registry(registry, everyone("U1", "U2", "U3"))
    [result] = EligibilitySweep(env.runner.service).sweep()
    assert result.record is None and result.ineligible == 0
    assert env.import_file("back.csv", "U2; Gold\n", feed="loymax").qualified == 1
    assert env.members("Gold") == {"U1", "U2"}
    assert len(sweep_imports(env)) == 1


@pytest.mark.parametrize("catalog_location", ["duckdb", "postgresql"], indirect=True)
def test_an_import_validated_before_the_change_and_committed_after_the_sweep_is_swept_again(make_env, registry):
    """The import read the old registry (U2 opted in), the sweep of the new one ran before it committed: the
    import's U2 is taken out again by the next sweep of the same registry version."""
    write_registry(registry, everyone("U1", "U2"))
    env = make_env(with_registry(base_config(eligible=OPTED_IN), registry))
    env.import_file("sms.csv", "U1\n")
    service = env.runner.service
    EligibilitySweep(service).sweep()
    path = env.drop_file("sms.csv", "U1\nU2\n")
    pkey = partition_key("repro", "sms.csv", hashlib.sha256(path.read_bytes()).hexdigest())
    record = service.receive(pkey, "cli:late", path.as_uri(), None)
    service.validate(record)  # against the registry where U2 is opted in
    write_registry(registry, [("U1", "active", "yes"), ("U2", "active", "no"), ("U3", "active", "yes")])
    [first] = EligibilitySweep(service).sweep()
    assert first.record is None  # U2 is not a member yet
    applied = service.apply(service.catalog.get_import(record.import_id))
    assert applied.status == "succeeded" and env.members("sms") == {"U1", "U2"}

    [again] = EligibilitySweep(service).sweep()
    assert again.users_sha256 == first.users_sha256 and again.record.disqualified == 1
    assert env.members("sms") == {"U1"}
    assert EligibilitySweep(service).sweep() == []


def test_a_large_drop_is_applied_and_emailed_to_the_admins(make_env, registry, smtp):  # noqa: F811
    write_registry(registry, everyone("U1", "U2", "U3", "U4", "U5", "U6"))
    config = with_registry(base_config(eligible=OPTED_IN, admins=["crm-admin@example.com"],
                                       gate={"max_removed": 1, "max_removed_share": 0.5}), registry)
    config["notifications"] = {"smtp": smtp.settings}
    env = make_env(config)
    env.import_file("sms.csv", "U1\nU2\nU3\nU4\nU5\nU6\n")
    EligibilitySweep(env.runner.service).sweep()

    # one opt-out: under the gate, no e-mail
    write_registry(registry, everyone("U1", "U2", "U3", "U4", "U5") + [("U6", "active", "no")])
    [small] = EligibilitySweep(env.runner.service).sweep()
    assert small.record.disqualified == 1 and small.large_drops == [] and smtp.messages == []

    # a truncated upload: four of five members gone at once, over both thresholds; applied, not held
    sha = write_registry(registry, everyone("U1"))
    [large] = EligibilitySweep(env.runner.service).sweep()
    assert large.record.status == "succeeded" and env.members("sms") == {"U1"}
    [(to, message)] = smtp.messages
    assert to == ["crm-admin@example.com"]
    assert message["Subject"] == (f"[audience_pipeline] repro: opt-out sweep {large.record.import_id} removed "
                                  "4 members")
    body = message.get_content()
    assert "'sms': 4 of 5 members removed (80%), 1 left" in body and f"sha256 {sha}" in body
    # re-publishing the same sweep sends nothing more
    assert not env.runner.service.notifier.eligibility_drop(large.record, large.large_drops)
    assert len(smtp.messages) == 1


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "200"})


def test_user_audiences_now_and_as_of_and_registry_sweep_as_commands(make_env, registry, tmp_path):
    write_registry(registry, everyone("U1", "U2"))
    env = make_env(with_registry(base_config(eligible=OPTED_IN), registry))
    config = str(env.workspace.path)
    env.import_file("gold.csv", "U1\nU2\n")
    silver = env.import_file("silver.csv", "U1\n")
    qualified = {name: at for name, at in env.query(
        "SELECT audience_name, qualified_at FROM members WHERE user_id = 'U1'")}

    done = cli("user-audiences", "U1", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "feed,audience,qualified_at,expires_at",
        f"repro,gold,{qualified['gold'].isoformat()},",
        f"repro,silver,{qualified['silver'].isoformat()},",
    ]

    write_registry(registry, [("U1", "active", "no"), ("U2", "active", "yes")])
    swept = cli("registry", "sweep", "--config", config, cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    assert "repro: import" in swept.stdout and "-2 disqualified" in swept.stdout
    assert "already swept" in cli("registry", "sweep", "--config", config, cwd=tmp_path).stdout
    gone = cli("user-audiences", "U1", "--config", config, cwd=tmp_path)
    assert gone.returncode == 0 and gone.stdout.splitlines() == ["feed,audience,qualified_at,expires_at"]
    assert "'U1' is in no audience" in gone.stderr

    # as of the instant silver was applied (before the sweep), U1 was in both
    at = env.runner.service.catalog.get_import(silver.import_id).applied_at
    naive = at.astimezone(UTC).replace(tzinfo=None).isoformat()  # no offset: read as UTC
    past = cli("user-audiences", "U1", "--as-of", naive, "--config", config, cwd=tmp_path)
    assert past.returncode == 0, past.stderr
    assert [line.split(",")[:2] for line in past.stdout.splitlines()[1:]] == [["repro", "gold"], ["repro", "silver"]]
    just_before = (at - timedelta(microseconds=1)).isoformat()
    earlier = cli("user-audiences", "U1", "--as-of", just_before, "--config", config, cwd=tmp_path)
    assert [line.split(",")[1] for line in earlier.stdout.splitlines()[1:]] == ["gold"]

    # usage errors exit 2, as click's: not a timestamp, or older than the member lists are kept
    assert cli("user-audiences", "U1", "--as-of", "yesterday", "--config", config, cwd=tmp_path).returncode == 2
    old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
    too_old = cli("user-audiences", "U1", "--as-of", old, "--config", config, cwd=tmp_path)
    assert too_old.returncode == 2 and "retention_days" in too_old.stderr
