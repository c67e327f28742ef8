"""Property-based: hostile and broken files for every format end `succeeded` (with explained rejects) or
`failed` with a reason, and a committed audience changes only through valid rows."""

import gzip
import hashlib
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience_pipeline.importer import ImportFailed
from audience_pipeline.keys import partition_key
from audience_pipeline_tests.conftest import base_config

FEEDS = {
    "repro": ({"format": "repro"}, "list.csv"),
    "odp": ({"format": "odp", "id_field": "ident"}, "aud.csv.gz"),
    "mics": ({"format": "mediarithmics"}, "cmds.ndjson"),
    "att": ({"format": "attentive", "customer_domain": "dom"}, "dom_subscriber_segment_20201125.csv"),
    "lmx": ({"format": "loymax", "mode": "per_row"}, "assign.csv"),
}
OUTCOMES = {"succeeded", "failed", "skipped", "held", "waiting"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    import dagster as dg

    from audience_pipeline_tests.conftest import Env

    root = tmp_path_factory.mktemp("hostile")
    (root / "home").mkdir()
    config = base_config()
    config["feeds"] = {name: {**options, "source": f"drop/{name}", "max_reject_ratio": 0.5}
                       for name, (options, _) in FEEDS.items()}
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        env = Env(root / "ws", instance, config)
        canary = env.import_file("canary.csv", "c1\nc2\n")
        assert canary.status == "succeeded"
        yield env


def run(env, feed: str, data: bytes):
    _, name = FEEDS[feed]
    if name.endswith(".gz") and data[:2] != b"\x1f\x8b":
        data = gzip.compress(data)
    path = env.root / "incoming" / uuid.uuid4().hex / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    service = env.runner.service
    key = partition_key(feed, name, hashlib.sha256(data).hexdigest())
    try:
        record = service.apply(service.receive(key, f"cli:{uuid.uuid4().hex}", path.as_uri(), None))
    except ImportFailed as exc:
        record = exc.record
    return record


def check(env, record):
    assert record.status in OUTCOMES
    if record.status == "failed":
        assert record.error and record.file_name in record.error
    assert env.members("canary") == {"c1", "c2"}  # no stray write ever touches another audience


lines = st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), max_size=30).map(
    lambda ls: "\n".join(ls).encode())
odd = st.sampled_from([b"\x00", b'"', b"'", b";", b",", b"\r", b"\t", b"\xff\xfe", b"{", b"[", b"\\", b"\xe2\x80"])
noisy = st.lists(st.one_of(st.binary(max_size=30), odd), max_size=60).map(b"".join)
numbers = st.lists(st.integers() | st.floats(allow_nan=True), max_size=20).map(
    lambda xs: "\n".join(f"{x};{x}" for x in xs).encode())


@pytest.mark.parametrize("feed", sorted(FEEDS))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=3000), lines, noisy, numbers))
def test_random_input_never_breaks_an_import(hostile, feed, data):
    check(hostile, run(hostile, feed, data))


def test_extreme_shapes(hostile):
    nested = {"a": None}
    for _ in range(500):
        nested = {"a": nested}
    cases = {
        "repro": [b"x" * 10_000_000 + b"\nok_id\n", b'"unbalanced\nquote"s\n' * 10],
        "lmx": [b";" * 1_000_000 + b"\n", b"12;Audience\n13\n"],
        "odp": [b"type,action,ident,audience_id,ts\n" + b"," * 1_000_000 + b"\n",
                b"type,action,ident,audience_id,ts\npassthrough,qualify,\"open,aud,1\n"],
        "mics": [json.dumps({"operation": "UPDATE", "expiration_duration": 0, "user_account_id": "n",
                             "segment_id": "deep", "data_bag": json.dumps(nested)}).encode() + b"\n",
                 json.dumps({"operation": 5, "expiration_duration": "x", "user_account_id": 7,
                             "segment_id": [1]}).encode() + b"\n"],
        "att": [b"12345678901234567890, seg\n", b"\x00\x00\x00"],
    }
    for feed, payloads in cases.items():
        for data in payloads:
            check(hostile, run(hostile, feed, data))


def test_the_sensor_survives_a_hostile_drop_folder(hostile):
    drop = hostile.drop
    (drop / "bin.csv").write_bytes(b"\x00\xff" * 100)
    (drop / "名前 'x'; \"y\".csv").write_text("a\n")
    (drop / ".partial.csv").write_text("hidden upload\n")
    records = hostile.runner.poll("repro")
    assert {r.file_name for r in records} >= {"bin.csv", "名前 'x'; \"y\".csv"}
    assert ".partial.csv" not in {r.file_name for r in records}


BOUNDED = """
import sys, uuid
from pathlib import Path
from audience_pipeline.hashing import sha256_file
from audience_pipeline.config import load_workspace
from audience_pipeline.importer import ImportFailed, ImportService
from audience_pipeline.keys import partition_key
def peak_mb():
    # VmHWM belongs to this process image; ru_maxrss would include the parent that forked it
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
service = ImportService(load_workspace(sys.argv[1]))
baseline = peak_mb()
path = Path(sys.argv[3])
key = partition_key(sys.argv[2], path.name, sha256_file(path))
try:
    record = service.apply(service.receive(key, "cli:" + uuid.uuid4().hex, path.as_uri(), None))
except ImportFailed as exc:
    record = exc.record
print(record.status, peak_mb() - baseline, record.error, sep="|")
"""


def test_bomb_and_oversize_are_refused_in_bounded_memory(make_env, tmp_path):
    import subprocess
    import sys

    config = base_config(max_file_bytes=5_000_000)
    config["feeds"]["odp"] = {"format": "odp", "source": "drop/odp", "id_field": "ident",
                              "max_decompressed_bytes": 20_000_000}
    env = make_env(config)
    bomb = tmp_path / "bomb.csv.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(b"type,action,ident,audience_id,ts\n")
        for _ in range(400):  # 400 MB of decompressed zeros from a file of ~400 KB
            fh.write(b"0" * 1_000_000)
    big = tmp_path / "big.csv"
    with open(big, "wb") as fh:
        for i in range(2_000_000):  # ~40 MB, over the 5 MB limit
            fh.write(b"user%014d\n" % i)
    growth = {}
    for feed, path, reason in (("odp", bomb, "decompresses to more than"), ("repro", big, "over the feed's limit")):
        done = subprocess.run([sys.executable, "-c", BOUNDED, str(env.workspace.path), feed, str(path)],
                              capture_output=True, text=True, timeout=300)
        status, growth_mb, error = done.stdout.strip().split("|", 2)
        assert status == "failed" and reason in error, done.stderr[-2000:]
        growth[feed] = int(growth_mb)
    # the bomb expands to 400 MB and the file is 40 MB: neither is ever held in memory (growth of the peak
    # RSS over the process's own after start-up, which depends on the libraries loaded)
    assert max(growth.values()) < 100, growth


ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:@"
valid_ids = st.lists(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=30), min_size=1, max_size=40)
# lines Repro must reject, each for its own reason: a second column, a control character, over 256
# characters, bytes that are not UTF-8
hostile_lines = st.one_of(
    st.tuples(st.text(alphabet=ID_ALPHABET, max_size=10), st.text(max_size=10)).map(
        lambda t: f"{t[0]},{t[1]}".replace("\n", "").replace("\r", "").encode()),
    st.text(alphabet=ID_ALPHABET, min_size=1, max_size=10).map(lambda s: f"{s}\x01{s}".encode()),
    st.integers(min_value=257, max_value=400).map(lambda n: b"x" * n),
    st.binary(min_size=1, max_size=10).map(lambda b: b"\xff" + b.replace(b"\n", b"").replace(b"\r", b"")),
)
padding = st.sampled_from(["", " ", "\t", " \t ", "\t\t"])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ids=valid_ids, pads=st.lists(st.tuples(padding, padding), min_size=40, max_size=40),
       hostile_rows=st.lists(hostile_lines, max_size=20), order=st.randoms(use_true_random=False))
def test_members_are_exactly_the_valid_rows_users(hostile, ids, pads, hostile_rows, order):
    """A random valid list (IDs padded with spaces and tabs) mixed with random hostile lines: the audience's
    members are exactly the valid rows' IDs, trimmed; a file over max_reject_ratio changes nothing."""
    name = f"p{uuid.uuid4().hex[:12]}"
    assert hostile.import_file(f"{name}.csv", "before\n").status == "succeeded"
    rows = [f"{left}{user}{right}".encode() for user, (left, right) in zip(ids, pads, strict=False)]
    rows += hostile_rows
    order.shuffle(rows)
    record = run_named(hostile, f"{name}.csv", b"\n".join(rows) + b"\n")
    if record.status == "failed":
        # over the ratio, or a NUL byte (a binary file): refused whole, and nothing of it is applied
        assert ("max_reject_ratio" in record.error and len(hostile_rows) / len(rows) > 0.5) or (
            "binary content" in record.error and any(b"\x00" in row for row in hostile_rows)), record.error
        assert hostile.members(name) == {"before"}
    else:
        assert record.status == "succeeded", record.error
        assert hostile.members(name) == set(ids)
        assert record.rows_rejected == len(hostile_rows)


def run_named(env, name: str, data: bytes):
    path = env.root / "incoming" / uuid.uuid4().hex / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    service = env.runner.service
    key = partition_key("repro", name, hashlib.sha256(data).hexdigest())
    try:
        return service.apply(service.receive(key, f"cli:{uuid.uuid4().hex}", path.as_uri(), None))
    except ImportFailed as exc:
        return exc.record
