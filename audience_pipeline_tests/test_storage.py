"""Storage guarantees: old versions expire, and a run waits for another process's hold on the catalog."""

import subprocess
import sys
import time

from audience_pipeline.storage.lake import Lake
from audience_pipeline_tests.conftest import base_config


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
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(3)",
         str(env.workspace.catalog)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    record = env.import_file("w.csv", "a\nb\n")
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert record.status == "succeeded" and env.members("w") == {"a", "b"}
    assert waited > 1.5  # it really waited for the lock instead of failing or bypassing it
