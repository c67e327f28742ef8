"""The analysts' views read only what a query needs: one audience version's folder, not the whole history."""

import json

import duckdb


def ids(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(start, start + n)]


def lines(values) -> str:
    return "\n".join(values) + "\n"


def member_files_read(env, sql: str, params: list) -> tuple[list, list[int]]:
    """The query's answer and, per scan of member lists, how many files DuckDB opened (from its profile)."""
    profile = env.root / "profile.json"
    con = duckdb.connect(str(env.workspace.analytics), read_only=True)
    try:
        con.execute("SET enable_profiling = 'json'")
        con.execute("SET profiling_output = ?", [str(profile)])
        rows = con.execute(sql, params).fetchall()
    finally:
        con.close()
    scans = []

    def walk(node):
        info = node.get("extra_info", {})
        if node.get("type") == "TABLE_SCAN" and "user_id" in str(info.get("Projections", "")):
            scans.append(int(info["Total Files Read"]))
        for child in node.get("children", []):
            walk(child)

    for node in json.loads(profile.read_text())["operator"]:
        walk(node)
    return rows, scans


def test_member_queries_read_only_the_version_they_answer_from(env):
    """Members of one audience, now or as of an instant, come from that version's folder alone, however long
    the history (before, every version of every audience was read: 30 versions of a 16M list for one answer)."""
    env.import_file("other.csv", lines(ids("o", 4)))
    records = [env.import_file("hist.csv", lines(ids("h", 3 + k, start=k))) for k in range(4)]
    (t2,) = env.query("SELECT valid_from FROM audience_versions WHERE version = ?", [records[1].import_id])[0]

    rows, scans = member_files_read(env, "SELECT user_id FROM members_as_of('hist', ?) ORDER BY 1", [t2])
    assert [r[0] for r in rows] == ids("h", 4, start=1)
    assert scans == [1]

    rows, scans = member_files_read(env, "SELECT user_id FROM members WHERE audience_name = ? ORDER BY 1", ["hist"])
    assert [r[0] for r in rows] == ids("h", 6, start=3)
    assert scans == [1]


def test_views_work_on_an_empty_lake(env):
    """Before any import only the placeholders exist: every view answers, with nothing."""
    for view in ("members", "membership_events", "rejected_rows", "audiences", "imports", "user_audiences"):
        assert env.query(f"SELECT count(*) FROM {view}") == [(0,)]
    assert env.query("SELECT count(*) FROM members_as_of('x', now())") == [(0,)]
