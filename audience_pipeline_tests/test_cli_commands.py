"""Every operator command run as a command (a subprocess of the installed CLI, as cron or a person runs it),
asserting on what it prints, its exit code and the data the analyst views show afterwards."""

import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from audience_pipeline_tests.conftest import base_config

ROOT = Path(__file__).resolve().parent.parent


def run(cwd: Path, *args, config: Path | None = None):
    extra = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args, *extra], cwd=cwd,
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "250"})


@pytest.fixture
def gated(make_env):
    return make_env(base_config(gate={"max_removed": 1}))


def cli(env, *args):
    return run(env.root, *args, config=env.workspace.path)


def write(tmp_path, name: str, content: str) -> str:
    folder = tmp_path / "incoming" / str(len(list((tmp_path).glob("incoming/*"))))
    folder.mkdir(parents=True)
    (folder / name).write_text(content)
    return str(folder / name)


def test_demo_refuses_a_staged_folder_that_names_no_feed_and_changes_nothing(tmp_path):
    shutil.copyfile(ROOT / "feeds.yaml", tmp_path / "feeds.yaml")
    shutil.copytree(ROOT / "data" / "demo", tmp_path / "data" / "demo")
    shutil.copyfile(ROOT / "data" / "users.csv", tmp_path / "data" / "users.csv")
    shutil.copyfile(ROOT / "data" / "mediarithmics_segments.csv", tmp_path / "data" / "mediarithmics_segments.csv")
    stray = tmp_path / "data" / "demo" / "2-second-delivery" / "tiktok"
    stray.mkdir()
    (stray / "list.csv").write_text("a\n")

    done = run(tmp_path, "demo", config=tmp_path / "feeds.yaml")
    assert done.returncode == 1
    assert f"{stray}: {tmp_path / 'feeds.yaml'} has no feed named 'tiktok'" in done.stderr.replace("\n", "")
    assert not (tmp_path / "data" / "drop").exists()  # nothing landed, nothing imported
    con = duckdb.connect(str(tmp_path / "data" / "analytics.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM imports").fetchone() == (0,)
    finally:
        con.close()

    shutil.rmtree(tmp_path / "data" / "demo")
    done = run(tmp_path, "demo", config=tmp_path / "feeds.yaml")
    assert done.returncode == 1 and "data/demo does not exist" in done.stderr.replace("\n", "")


def test_dry_run_activity_members_as_of_and_reimport(gated, tmp_path):
    assert cli(gated, "import", write(tmp_path, "l.csv", "a\nb\nc\n"), "--feed", "repro").returncode == 0
    first_at = gated.query("SELECT max(finished_at) FROM imports")[0][0]
    second = cli(gated, "import", write(tmp_path, "l.csv", "b\nc\nd\n"), "--feed", "repro")
    assert second.returncode == 0 and "+1 qualified, -1 disqualified" in second.stdout, second.stdout

    dry = cli(gated, "import", write(tmp_path, "l.csv", "z\n"), "--feed", "repro", "--dry-run")
    assert dry.returncode == 0 and "dry_run" in dry.stdout, dry.stdout
    assert gated.members("l") == {"b", "c", "d"}  # a dry run changes nothing

    activity = cli(gated, "activity")
    assert activity.returncode == 0
    assert [s for s in ("dry_run", "succeeded") if s in activity.stdout] == ["dry_run", "succeeded"]

    as_of = cli(gated, "members", "l", "--as-of", first_at.isoformat())
    assert as_of.returncode == 0 and as_of.stdout.split() == ["user_id", "a", "b", "c"]  # piped: CSV
    now = cli(gated, "members", "l")
    assert [line.split(",")[0] for line in now.stdout.split()] == ["user_id", "b", "c", "d"]

    [(first_id,)] = gated.query("SELECT min(import_id) FROM imports")
    back = cli(gated, "reimport", str(first_id))
    assert back.returncode == 0, back.stdout + back.stderr
    assert gated.members("l") == {"a", "b", "c"}


def test_approve_and_reject_held_imports(gated, tmp_path):
    cli(gated, "import", write(tmp_path, "g.csv", "a\nb\nc\nd\n"), "--feed", "repro")
    held = cli(gated, "import", write(tmp_path, "g.csv", "a\n"), "--feed", "repro")
    assert held.returncode == 3 and "held" in held.stdout
    [(held_id,)] = gated.query("SELECT import_id FROM imports WHERE status = 'held'")
    rejected = cli(gated, "reject", str(held_id))
    assert rejected.returncode == 0 and "rejected" in rejected.stdout
    assert gated.members("g") == {"a", "b", "c", "d"}

    cli(gated, "import", write(tmp_path, "g.csv", "b\n"), "--feed", "repro")
    [(held_id,)] = gated.query("SELECT import_id FROM imports WHERE status = 'held'")
    approved = cli(gated, "approve", str(held_id))
    assert approved.returncode == 0 and "succeeded" in approved.stdout, approved.stdout + approved.stderr
    assert gated.members("g") == {"b"}
    assert cli(gated, "approve", "9999").returncode != 0  # no such import: an error, not a silent success

    # each decision was a run of its job on the workspace's instance, and the approval shows on the audience
    with dg.DagsterInstance.from_config(str(gated.root)) as instance:
        for job in ("audience_reject_job", "audience_approve_job"):
            runs = instance.get_run_records(dg.RunsFilter(job_name=job))
            assert [r.dagster_run.status for r in runs] == [dg.DagsterRunStatus.SUCCESS], job
        reported = instance.fetch_materializations(dg.AssetKey("audience"), limit=100).records
        assert held_id in [r.asset_materialization.metadata["import_id"].value for r in reported]


def test_delete_audience_forget_user_and_views(env, tmp_path):
    for name, content in (("keep.csv", "u1\nu2\n"), ("gone.csv", "u1\nu3\n")):
        assert cli(env, "import", write(tmp_path, name, content), "--feed", "repro").returncode == 0

    deleted = cli(env, "delete-audience", "gone", "--feed", "repro")
    assert deleted.returncode == 0 and "2 members disqualified" in deleted.stdout, deleted.stdout
    assert env.query("SELECT status, member_count FROM audiences WHERE name = 'gone'") == [("deleted", 0)]
    assert cli(env, "delete-audience", "nothing", "--feed", "repro").returncode != 0

    forgot = cli(env, "forget-user", "u1")
    assert forgot.returncode == 0 and "removed from 1 audience(s)" in forgot.stdout, forgot.stdout
    assert env.members("keep") == {"u2"}
    assert env.query("SELECT count(*) FROM membership_events WHERE user_id = 'u1'") == [(0,)]

    kept = cli(env, "views")
    assert kept.returncode == 0 and kept.stdout.startswith("kept ")
    replaced = cli(env, "views", "--replace")
    assert replaced.returncode == 0 and replaced.stdout.startswith("wrote ")
    assert env.members("keep") == {"u2"}  # the rewritten views read the same lake
