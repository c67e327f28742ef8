"""forget-user: the user leaves every audience with events, and no trace of its identifiers stays in the lake."""

import gzip

import duckdb
import pytest

from audience_pipeline_tests.conftest import base_config, over_both_catalogs


@pytest.fixture(params=["duckdb", "postgresql"])
def catalog_location(request):
    return over_both_catalogs(request)


def test_forget_user_leaves_no_trace(make_env, tmp_path):
    registry = tmp_path / "users.csv"
    registry.write_text("user_id,email\nU-victim,victim@example.com\nU-other,other@example.com\n")
    config = base_config(identifier="email")
    config["users"] = {"path": str(registry)}
    config["outboxes"] = [{"location": str(tmp_path / "outbox"), "mode": "changes"}]
    env = make_env(config)
    env.import_file("a.csv", "victim@example.com\nother@example.com\n")
    env.import_file("a.csv", "other@example.com\nvictim@example.com\nbad,victim@example.com\n")
    env.import_file("b.csv", "victim@example.com\n")
    gz = env.drop / "c.csv"
    gz.write_text("other@example.com\n")
    env.import_file("c.csv")

    records, rewritten = env.runner.service.forget_user("U-victim")
    assert sorted(r.disqualified for r in records) == [2]  # one import for the feed, two audiences left
    assert rewritten > 0
    assert env.members("a") == {"U-other"} and env.members("b") == set()
    events = env.query("SELECT audience_name, action, user_id FROM membership_events WHERE import_id = ?",
                       [records[0].import_id])
    assert sorted((a, act) for a, act, _ in events) == [("a", "disqualify"), ("b", "disqualify")]
    assert {u for _, _, u in events} == {"erased:" + __import__("hashlib").sha256(b"U-victim").hexdigest()[:16]}

    # no file of the lake holds the user id or the e-mail any more
    lake = env.workspace.lake
    con = duckdb.connect()
    for path in lake.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            text = str(con.execute(f"SELECT * FROM read_parquet('{path}')").fetchall())
        else:
            data = path.read_bytes()
            text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode(errors="replace")
        assert "U-victim" not in text and "victim@example.com" not in text, path
    # the other user is untouched, and the erasure is recorded without the id in clear
    assert env.members("a") == {"U-other"}
    with env.runner.service.catalog.session() as catalog:
        (user_hash, files) = catalog.execute("SELECT user_sha256, files_rewritten FROM erasures").fetchone()
    assert user_hash == __import__("hashlib").sha256(b"U-victim").hexdigest() and files == rewritten
    # downstream consumers got the removal in their change files
    out = sorted((tmp_path / "outbox").iterdir())[-1]
    assert "U-victim" in gzip.decompress(out.read_bytes()).decode()
