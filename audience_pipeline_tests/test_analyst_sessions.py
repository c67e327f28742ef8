"""An analyst holding `duckdb -readonly` on the views file never blocks imports and never sees a torn state."""

import json
import subprocess
import sys
import textwrap

ANALYST = textwrap.dedent(
    """
    import duckdb, json, sys, time, pathlib
    path, stop = sys.argv[1], pathlib.Path(sys.argv[2])
    con = duckdb.connect(path, read_only=True)
    seen, errors = [], []
    print("ready", flush=True)
    while not stop.exists():
        try:
            seen.append(con.execute(
                "SELECT (SELECT count(*) FROM members WHERE audience_name = 'live'),"
                "       (SELECT coalesce(max(member_count), 0) FROM audiences WHERE name = 'live'),"
                "       (SELECT count(*) FILTER (WHERE action = 'qualify')"
                "             - count(*) FILTER (WHERE action = 'disqualify')"
                "        FROM membership_events WHERE audience_name = 'live')"
            ).fetchone())
        except Exception as exc:
            errors.append(str(exc))
        time.sleep(0.01)
    print(json.dumps({"seen": seen, "errors": errors}))
    """
)


def test_imports_succeed_while_an_analyst_session_is_open(env, tmp_path):
    stop = tmp_path / "stop"
    analyst = subprocess.Popen(
        [sys.executable, "-c", ANALYST, str(env.workspace.analytics), str(stop)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert analyst.stdout.readline().strip() == "ready"
        sizes = [100, 200, 50, 250, 150] * 10  # 50 imports
        records = []
        for n in sizes:
            content = "".join(f"user{i:05d}\n" for i in range(n))
            records.append(env.import_file("live.csv", content))
    finally:
        stop.touch()
        out, _ = analyst.communicate(timeout=60)
    assert [r.status for r in records] == ["succeeded"] * len(sizes)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == []
    assert len(result["seen"]) > 10
    # every observation is a committed state, never a half-applied import
    for members, pointer_count, balance in result["seen"]:
        assert members in {0, *sizes}
        assert pointer_count in {0, *sizes}
        assert balance in {0, *sizes}
    assert len(result["seen"]) > 50
    assert env.members("live") == {f"user{i:05d}" for i in range(150)}
