"""The drop-folder sensor, evaluated by Dagster against a real instance, and the runs it requests."""

import os
import time

import pytest

from audience_pipeline.runner import sensor_context
from audience_pipeline.sources import SourceRefused
from audience_pipeline_tests.conftest import base_config


def evaluate(env, cursor=None):
    sensor = env.runner.defs.resolve_sensor_def("repro_audience_sensor")
    return sensor(sensor_context(env.workspace, env.instance, env.runner.defs, cursor))


def set_times(path, seconds: float):
    os.utime(path, ns=(int(seconds * 1e9), int(seconds * 1e9)))


def test_sensor_requests_one_run_per_new_file_version(env):
    env.drop_file("one.csv", "u1\nu2\n")
    env.drop_file("two.csv", "u3\n")
    env.drop_file("notes.txt", "not an audience file\n")
    result = evaluate(env)
    assert sorted(r.partition_key.split(":")[1] for r in result.run_requests) == ["one.csv", "two.csv"]
    assert all(r.run_key.startswith(r.partition_key + "|source:") for r in result.run_requests)
    [add] = result.dynamic_partitions_requests
    assert sorted(add.partition_keys) == sorted(r.partition_key for r in result.run_requests)
    again = evaluate(env, result.cursor)
    assert not again.run_requests  # nothing new: no run asked twice


def test_a_listed_file_is_asked_for_once_and_a_later_one_is_found(env):
    """Through the sensor: the first file, listed again, is not requested again; the second is. (A local
    file's arrival is max(mtime, ctime) and ctime cannot be set back, so a file landing at exactly the
    cursor's high-water mark cannot be made here: test_cursor.py covers that edge on plan_tick.)"""
    env.drop_file("a.csv", "u1\n")
    result = evaluate(env)
    assert [r.partition_key.split(":")[1] for r in result.run_requests] == ["a.csv"]
    env.drop_file("b.csv", "u2\n")
    later = evaluate(env, result.cursor)
    assert [r.partition_key.split(":")[1] for r in later.run_requests] == ["b.csv"]


def test_rewrite_is_a_new_import_and_deletion_changes_nothing(env):
    env.drop_file("list.csv", "u1\nu2\n")
    records = env.runner.poll("repro")
    assert [r.status for r in records] == ["succeeded"]
    assert env.members("list") == {"u1", "u2"}
    time.sleep(0.01)
    env.drop_file("list.csv", "u2\nu3\n")  # same name, new content
    records = env.runner.poll("repro")
    assert [(r.status, r.qualified, r.disqualified) for r in records] == [("succeeded", 1, 1)]
    assert env.members("list") == {"u2", "u3"}
    (env.drop / "list.csv").unlink()
    assert env.runner.poll("repro") == []
    assert env.members("list") == {"u2", "u3"}


def test_a_file_moved_in_with_an_old_mtime_is_imported(env, tmp_path):
    env.drop_file("first.csv", "u1\n")
    env.runner.poll("repro")
    outside = tmp_path / "old.csv"
    outside.write_text("u9\n")
    set_times(outside, time.time() - 86400)  # like `cp -p` or `mv` of an old file
    os.replace(outside, env.drop / "old.csv")
    records = env.runner.poll("repro")
    assert [r.file_name for r in records] == ["old.csv"]
    assert env.members("old") == {"u9"}


def test_backlog_is_spread_over_ticks(make_env):
    env = make_env(base_config(max_runs_per_tick=3))
    for i in range(7):
        env.drop_file(f"f{i}.csv", f"u{i}\n")
    seen, cursor = [], None
    for expected in (3, 3, 1, 0):
        result = evaluate(env, cursor)
        seen += [r.partition_key for r in result.run_requests]
        assert len(result.run_requests) == expected
        cursor = result.cursor
    assert len(set(seen)) == 7


def test_redelivery_by_daemon_and_poll_applies_once(env):
    """The same file version requested twice (two pollers, a retried tick) is one import."""
    env.drop_file("dup.csv", "u1\nu2\n")
    [request] = evaluate(env).run_requests
    first = env.runner.run(request.partition_key, request.tags["audience_pipeline/delivery"],
                           request.tags["audience_pipeline/source_uri"])
    second = env.runner.run(request.partition_key, request.tags["audience_pipeline/delivery"],
                            request.tags["audience_pipeline/source_uri"])
    assert first.import_id == second.import_id
    assert env.query("SELECT count(*) FROM imports")[0][0] == 1
    assert env.query("SELECT count(*) FROM membership_events")[0][0] == 2


def test_missing_drop_folder_fails_the_tick(env):
    """A skip would read as "no new files": a drop folder that is not there fails the tick and says why."""
    env.drop.rename(env.drop.with_name("gone"))
    with pytest.raises(SourceRefused, match="drop folder .* does not exist"):
        evaluate(env)
