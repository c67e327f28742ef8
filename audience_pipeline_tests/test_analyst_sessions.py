"""An analyst holding `duckdb -readonly` on the views file never blocks imports and never sees a torn state."""

import json
import subprocess
import sys
import textwrap
import time

ANALYST = textwrap.dedent(
    """
    import duckdb, json, sys, time, pathlib
    path, stop, log = sys.argv[1], pathlib.Path(sys.argv[2]), open(sys.argv[3], "a")
    con = duckdb.connect(path, read_only=True)
    print("ready", flush=True)
    while not stop.exists():
        try:
            seen = con.execute(
                "SELECT (SELECT count(*) FROM members WHERE audience_name = 'live'),"
                "       (SELECT coalesce(max(member_count), 0) FROM audiences WHERE name = 'live'),"
                "       (SELECT count(*) FILTER (WHERE action = 'qualify')"
                "             - count(*) FILTER (WHERE action = 'disqualify')"
                "        FROM membership_events WHERE audience_name = 'live')"
            ).fetchone()
            log.write(json.dumps({"seen": list(seen)}) + "\\n")
        except Exception as exc:
            log.write(json.dumps({"error": str(exc)}) + "\\n")
        log.flush()
        time.sleep(0.01)
    """
)


class Observations:
    """The analyst's log, read as it grows (only the new complete lines each time)."""

    def __init__(self, path):
        self.file = open(path)  # noqa: SIM115 (closed by the test)
        self.seen: list[dict] = []
        self.partial = ""

    def read(self) -> list[dict]:
        text = self.partial + self.file.read()
        *lines, self.partial = text.split("\n")
        self.seen += [json.loads(line) for line in lines]
        return self.seen


def test_imports_succeed_while_an_analyst_session_is_open(env, tmp_path):
    stop, log = tmp_path / "stop", tmp_path / "observations.jsonl"
    log.touch()
    analyst = subprocess.Popen(
        [sys.executable, "-c", ANALYST, str(env.workspace.analytics), str(stop), str(log)],
        stdout=subprocess.PIPE, text=True,
    )
    sizes = [100, 200, 50, 250, 150] * 10  # 50 imports; neighbours always differ
    records = []
    log_reader = Observations(log)
    try:
        assert analyst.stdout.readline().strip() == "ready"
        for n in sizes:
            content = "".join(f"user{i:05d}\n" for i in range(n))
            records.append(env.import_file("live.csv", content))
            # the session, open all along, sees this import's list before the next one starts
            seen_from = len(log_reader.read())
            deadline = time.monotonic() + 60
            while {"seen": [n, n, n]} not in log_reader.read()[seen_from:]:
                assert analyst.poll() is None and time.monotonic() < deadline, log_reader.seen[-3:]
                time.sleep(0.02)
    finally:
        stop.touch()
        analyst.communicate(timeout=60)
    assert [r.status for r in records] == ["succeeded"] * len(sizes)
    observations = log_reader.read()
    log_reader.file.close()
    assert [o for o in observations if "error" in o] == []
    # every view reads a committed state, never a half-applied import (one query over several views may
    # read them at different commits: each view finds the newest snapshot when it is scanned)
    for observation in observations:
        members, pointer_count, balance = observation["seen"]
        assert members in {0, *sizes} and pointer_count in {0, *sizes} and balance in {0, *sizes}
    assert env.members("live") == {f"user{i:05d}" for i in range(150)}
