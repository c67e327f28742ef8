"""The CLI's exit codes, as a script or scheduler sees them: 0 done, 1 failed, 3 held for an operator, 75
retry later; with several files the most severe wins (1, 75, 3, 0), and unfinished work never exits 0."""

import subprocess
import sys

import pytest

from audience_pipeline_tests.conftest import base_config
from audience_pipeline_tests.test_audience_locks import Holder


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *args, "--config", str(env.workspace.path)],
                          cwd=env.root, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(env.root), "COLUMNS": "200"})


@pytest.fixture
def gated(make_env):
    config = base_config(gate={"max_removed": 0})
    config["storage"]["lock_timeout_seconds"] = 1
    return make_env(config)


def test_exit_codes(gated, tmp_path):
    def file(name: str, content: str):
        (tmp_path / name).write_text(content)
        return str(tmp_path / name)

    done = cli(gated, "import", file("a.csv", "u1\nu2\n"), "--feed", "repro")
    assert done.returncode == 0 and "succeeded" in done.stdout
    assert cli(gated, "import", file("a.csv", "u1\n"), "--feed", "repro", "--dry-run").returncode == 0

    held = cli(gated, "import", file("a.csv", "u1\n"), "--feed", "repro")
    assert held.returncode == 3 and "held" in held.stdout and "over the removal gate" in held.stdout

    failed = cli(gated, "import", file("empty.csv", ""), "--feed", "repro")
    assert failed.returncode == 1 and "empty file" in failed.stderr

    # a failed and a held file: the failure wins
    both = cli(gated, "import", file("empty.csv", ""), file("a.csv", "u2\n"), "--feed", "repro")
    assert both.returncode == 1, both.stdout + both.stderr

    usage = cli(gated, "import", "--feed", "repro")
    assert usage.returncode == 2

    holder = Holder(gated, "b")
    try:
        busy = cli(gated, "import", file("b.csv", "u9\n"), "--feed", "repro")
        # a busy file and a held one: retry-later wins over held
        mixed = cli(gated, "import", file("b.csv", "u9\n"), file("a.csv", "u2\n"), "--feed", "repro")
    finally:
        holder.kill()
    assert busy.returncode == 75, busy.stdout + busy.stderr
    # it names what blocked it, never "None"
    assert "not finished" in busy.stdout and f"import {holder.import_id}" in busy.stdout
    assert f"pid {holder.process.pid}" in busy.stdout and "None" not in busy.stdout + busy.stderr
    assert mixed.returncode == 75 and "held" in mixed.stdout, mixed.stdout + mixed.stderr
    # the holder is gone: the file goes through at once
    assert cli(gated, "import", file("b.csv", "u9\n"), "--feed", "repro").returncode == 0


def test_an_old_config_with_a_lease_gets_a_clear_message(make_env, tmp_path):
    env = make_env(base_config())
    (env.root / "feeds.yaml").write_text((env.root / "feeds.yaml").read_text().replace(
        "storage:\n", "storage:\n  lock_lease_seconds: 900\n"))
    done = cli(env, "audiences")
    assert done.returncode == 1
    assert "lock_lease_seconds is gone" in done.stderr and "liveness_timeout_seconds" in done.stderr
