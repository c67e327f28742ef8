"""Loymax per-import profiles: a feed's named choices of mode/audience/identifier/action, picked by the drop
sub-folder a file lands in or by ``import --profile``, all updating the feed's own audiences."""

import itertools
import os
import subprocess
import sys

import boto3
import pytest
import yaml

from audience_pipeline.config import ConfigError, load_workspace
from audience_pipeline.defs.assets import TAG_PROFILE
from audience_pipeline_tests.conftest import base_config, over_both_catalogs

# Loymax's mode 2 (identifier;audience), as in the seed's second example
ASSIGN = "1;VIP\n2;VIP\n3;Gold\n"
PROFILES = {"add": {"mode": "per_row"}, "remove": {"mode": "per_row", "action": "remove"}}


def loymax_config(source: str = "drop/loymax", **feed) -> dict:
    config = base_config()
    # the feed's own options (no profile): mode 1, one audience per file named after the file
    config["feeds"] = {"loymax": {"format": "loymax", "source": source, "mode": "single",
                                  "max_reject_ratio": 0.5, "profiles": PROFILES, **feed}}
    return config


@pytest.fixture
def catalog_location(request):
    """The default DuckDB catalog, or both catalogs for a test parametrized over them (the skip key is SQL)."""
    return over_both_catalogs(request) if hasattr(request, "param") else None


@pytest.fixture
def loymax(make_env):
    env = make_env(loymax_config())
    env.drop = env.root / "drop" / "loymax"
    env.drop.mkdir(parents=True, exist_ok=True)
    return env


_DROPS = itertools.count(1)


def drop(env, key: str, content: str) -> None:
    """Land a file as a new version: its own mtime, whatever the clock's granularity (a rewrite within the
    same tick would otherwise keep the version and not be a new delivery)."""
    path = env.drop / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    stamp = path.stat().st_mtime_ns + next(_DROPS) * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def profile_tags(env) -> list[str]:
    return sorted((run.tags.get(TAG_PROFILE) or "") for run in env.instance.get_runs())


@pytest.mark.parametrize("catalog_location", ["duckdb", "postgresql"], indirect=True)
def test_polled_removal_of_applied_content_removes_and_the_add_applies_again(loymax):
    env = loymax
    drop(env, "add/assign.csv", ASSIGN)
    [added] = env.runner.poll("loymax")
    assert (added.status, added.profile, added.qualified) == ("succeeded", "add", 3)
    assert env.members("VIP") == {"1", "2"} and env.members("Gold") == {"3"}

    # the same bytes, the same file name: only the folder says it is a removal. It used to be `skipped`.
    drop(env, "remove/assign.csv", ASSIGN)
    [removed] = env.runner.poll("loymax")
    assert removed.partition_key == added.partition_key and removed.delivery != added.delivery
    assert (removed.status, removed.profile, removed.disqualified) == ("succeeded", "remove", 3)
    assert env.members("VIP") == set() and env.members("Gold") == set()

    # after the removal, the add's content is no longer what the audiences hold: it applies again
    drop(env, "add/assign.csv", ASSIGN)
    [again] = env.runner.poll("loymax")
    assert (again.status, again.qualified) == ("succeeded", 3)
    # ...and an identical add on top of it is skipped as before
    drop(env, "add/assign.csv", ASSIGN)
    [same] = env.runner.poll("loymax")
    assert same.status == "skipped"

    # files at the top and in folders that are not profiles keep the feed's options (mode 1), and land in
    # the same audiences as the profiles' files
    drop(env, "VIP.csv", "9;\n")
    drop(env, "archive/Gold.csv", "8;\n")
    records = env.runner.poll("loymax")
    assert sorted((r.file_name, r.status, r.profile) for r in records) == [
        ("Gold.csv", "succeeded", None), ("VIP.csv", "succeeded", None)]
    assert env.members("VIP") == {"1", "2", "9"} and env.members("Gold") == {"3", "8"}
    assert profile_tags(env) == ["", "", "add", "add", "add", "remove"]


def test_dry_run_folder_combines_with_a_profile(loymax):
    env = loymax
    drop(env, "add/assign.csv", ASSIGN)
    env.runner.poll("loymax")
    drop(env, "dryrun/remove/assign.csv", ASSIGN)
    [dry] = env.runner.poll("loymax")
    assert (dry.status, dry.profile, dry.qualified, dry.disqualified) == ("dry_run", "remove", 0, 3)
    assert env.members("VIP") == {"1", "2"} and env.members("Gold") == {"3"}  # nothing applied


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "200"})


def test_cli_profile_applies_and_an_unknown_profile_is_a_usage_error(loymax, tmp_path):
    env = loymax
    config = str(env.root / "feeds.yaml")
    path = tmp_path / "assign.csv"
    path.write_text(ASSIGN)

    done = cli("import", str(path), "--feed", "loymax", "--profile", "add", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert env.members("VIP") == {"1", "2"}

    done = cli("import", str(path), "--feed", "loymax", "--profile", "remove", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout and "-3 disqualified" in done.stdout
    assert env.members("VIP") == set() and env.members("Gold") == set()

    done = cli("import", str(path), "--feed", "loymax", "--profile", "purge", "--config", config, cwd=tmp_path)
    assert done.returncode == 2
    assert "'--profile'" in done.stderr and "no profile named 'purge' (profiles: add, remove)" in done.stderr
    assert env.query("SELECT count(*) FROM imports")[0][0] == 2  # nothing was started for it


def test_profiles_sharing_an_s3_version_are_separate_deliveries(make_env, moto_s3):
    # An unversioned bucket names a version by ETag and second: identical bytes uploaded to two profile
    # folders in the same second would be one delivery, and the removal a re-report of the add.
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="audiences")
    env = make_env(loymax_config("s3://audiences/drop/", s3={"endpoint_url": moto_s3, "region": "us-east-1"}))
    for folder in ("add", "remove"):
        client.put_object(Bucket="audiences", Key=f"drop/{folder}/assign.csv", Body=ASSIGN.encode())
    added, removed = env.runner.poll("loymax")  # arrival order, then key: add before remove
    assert [(r.profile, r.status, r.qualified, r.disqualified) for r in (added, removed)] == [
        ("add", "succeeded", 3, 0), ("remove", "succeeded", 0, 3)]
    assert removed.delivery == "profile:remove:" + added.delivery.removeprefix("profile:add:")
    assert env.members("VIP") == set()


@pytest.mark.parametrize("feed, message", [
    ({"profiles": {"dryrun": {"action": "remove"}}}, "profile name 'dryrun'"),
    ({"profiles": {"remove": {"action": None}}}, "action cannot be null"),
    ({"profiles": {"remove": {"action": "delete"}}}, "profiles.remove.action"),
    ({"format": "repro", "profiles": {"remove": {"action": "remove"}}}, "profiles are for loymax feeds"),
])
def test_profile_configuration_errors(tmp_path, feed, message):
    config = loymax_config(**feed)
    path = tmp_path / "feeds.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_workspace(path)
