"""Hostile audience names, file names and keys: stored verbatim or rejected with a reason, never a path."""

import json

from audience_pipeline_tests.conftest import base_config

NAMES = [
    "it's \"quoted\"; DROP TABLE imports; --",
    "../../etc/passwd",
    "/absolute/path",
    "ünïcødé 😀 名前",
    "n" * 1000,
]


def test_segment_names_are_data(make_env, tmp_path):
    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.9}}
    env = make_env(config)
    lines = [json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": f"u{i}",
                         "segment_technical_name": name}) for i, name in enumerate(NAMES)]
    lines.append(json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "x",
                             "segment_technical_name": "bell\x07name"}))
    lines.append(json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "y",
                             "segment_technical_name": "n" * 1001}))
    record = env.import_file("names.ndjson", "\n".join(lines) + "\n", feed="mics")
    assert record.status == "succeeded"
    stored = {r[0] for r in env.query("SELECT name FROM audiences")}
    assert stored == set(NAMES)  # read back unchanged
    for i, name in enumerate(NAMES):
        assert env.members(name) == {f"u{i}"}
    assert env.query("SELECT line_number, reason FROM rejected_rows ORDER BY 1") == [
        (6, "audience_name_control_character"), (7, "audience_name_too_long")]
    # nothing was written outside the workspace's lake (member lists are filed by audience id)
    outside = [p for p in tmp_path.rglob("*") if "passwd" in p.name or p.name == "path"]
    assert outside == []
    assert all(p.name.startswith("audience_id=") for p in (env.workspace.lake / "members").iterdir())


def test_hostile_file_names(env):
    name = "it's; \"odd\" ünï 😀.csv"
    record = env.import_file(name, "a\n")
    assert record.status == "succeeded"
    assert env.members("it's; \"odd\" ünï 😀") == {"a"}
    feed, sanitized, digest = record.partition_key.split(":")
    assert sanitized == "it_s_odd_n_.csv" and len(digest) == 8
    long_name = "L" * 200 + ".csv"
    record = env.import_file(long_name, "b\n")
    assert len(record.partition_key.split(":")[1]) == 60
    assert env.members("L" * 200) == {"b"}
