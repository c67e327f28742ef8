"""What the CLI prints, as a script or a person gets it: the installed command run as a subprocess, its stdout a
pipe (so CSV unless --format says otherwise), on a workspace in tmp_path. Ids, names and errors come out exactly
as they went in; CSV and JSON stay machine-readable; a cut list says so."""

import csv
import hashlib
import io
import json
import os
import pty
import shlex
import subprocess
import sys
import threading
from importlib.metadata import version

from audience_pipeline_tests.conftest import base_config

# Ids that rich used to change: emoji codes (crm:id:42 -> crm🆔42, 1:100:5 -> 1💯5), style tags ([vip] vanished,
# [/x] raised MarkupError), and ids longer than a line (wrapped at 80 columns).
TRICKY_IDS = [
    "crm:id:42", "1:100:5", ":smile:", ":thumbs_up::rocket:", "list[vip]", "[/x]", "[bold red]x[/bold red]",
    "a]b[c", "[link=https://example.com]u[/link]", "x" * 200, "y" * 97 + ":id:" + "z" * 99,
]
ENV = {"PATH": "/usr/bin:/bin", "COLUMNS": "80"}


def run(env, *args, group=(), config=True, cwd=None, extra_env=None):
    """The CLI with the workspace's --config after the command (or none: config=False)."""
    # as in a workspace from `init`; without it Dagster writes a warning and its telemetry notice on stderr
    (env.root / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    tail = ["--config", str(env.workspace.path)] if config else []
    return subprocess.run([sys.executable, "-m", "audience_pipeline", *group, *args, *tail],
                          cwd=cwd or env.root, capture_output=True, text=True,
                          env={**ENV, "HOME": str(env.root), **(extra_env or {})})


def rows(stdout: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(stdout)))


def test_members_csv_is_the_imported_ids_verbatim(env, tmp_path):
    record = env.import_file("list[vip].csv", "\n".join(TRICKY_IDS) + "\n")
    assert record.status == "succeeded" and record.members == len(TRICKY_IDS), record.error

    done = run(env, "members", "list[vip]", "--format", "csv")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "user_id,qualified_at,expires_at" and lines[-1] == ""
    # none of these ids needs CSV quoting, so each line starts with the id exactly as it was in the file
    qualified = dict(env.query("SELECT user_id, qualified_at FROM members WHERE audience_name = 'list[vip]'"))
    assert lines[1:-1] == [f"{i},{qualified[i].isoformat()}," for i in sorted(TRICKY_IDS)]
    assert [r["user_id"] for r in rows(done.stdout)] == sorted(TRICKY_IDS)

    # the check, as a shell runs it: the id column, sorted and hashed, equals the imported file's ids
    command = shlex.join([sys.executable, "-m", "audience_pipeline", "members", "list[vip]",
                          "--config", str(env.workspace.path)])
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | tail -n +2 | cut -d, -f1 | sort | sha256sum"],
                           cwd=env.root, capture_output=True, text=True, env={**ENV, "LC_ALL": "C"})
    assert piped.returncode == 0, piped.stderr
    expected = "".join(f"{i}\n" for i in sorted(TRICKY_IDS, key=lambda s: s.encode())).encode()
    assert piped.stdout.split()[0] == hashlib.sha256(expected).hexdigest()

    # a table at a terminal is for a person, yet it neither wraps nor cuts: every id is whole on its own line
    table = run(env, "members", "list[vip]", "--format", "table")
    assert table.returncode == 0 and table.stdout.splitlines()[0] == "members of list[vip]"
    shown = [line.split("  ")[0] for line in table.stdout.splitlines()[3:]]
    assert shown == sorted(TRICKY_IDS)

    # names and file names verbatim too, in every format
    listing = run(env, "audiences")
    assert [r["name"] for r in rows(listing.stdout)] == ["list[vip]"]
    activity = run(env, "activity", "--format", "table")
    assert "list[vip].csv" in activity.stdout


def test_json_objects_have_the_csv_header_keys(env):
    env.import_file("gold.csv", "u1\nu2\nbad,id\nu3\n")
    record = env.import_file("silver.csv", "u2\n")
    [(rejecting,)] = env.query("SELECT import_id FROM imports WHERE file_name = 'gold.csv'")
    commands = {
        "members": ["members", "gold"],
        "audiences": ["audiences"],
        "activity": ["activity"],
        "rejects": ["rejects", str(rejecting)],
        "user-audiences": ["user-audiences", "u2"],
    }
    for name, args in commands.items():
        as_csv = run(env, *args, "--format", "csv")
        as_json = run(env, *args, "--format", "json")
        assert as_csv.returncode == 0 and as_json.returncode == 0, (name, as_csv.stderr, as_json.stderr)
        header = as_csv.stdout.splitlines()[0].split(",")
        objects = json.loads(as_json.stdout)
        assert objects and all(list(o) == header for o in objects), name
        # the same rows: JSON's nulls are CSV's empty cells, its numbers CSV's digits
        assert [{k: "" if v is None else str(v) for k, v in o.items()} for o in objects] == rows(as_csv.stdout), name

    members = json.loads(run(env, "members", "gold", "--format", "json").stdout)
    assert [m["user_id"] for m in members] == ["u1", "u2", "u3"] and all(m["expires_at"] is None for m in members)
    assert json.loads(run(env, "user-audiences", "u2", "--format", "json").stdout) == [
        {"feed": "repro", "audience": audience, "qualified_at": at.isoformat(), "expires_at": None}
        for audience, at in env.query("SELECT audience_name, qualified_at FROM members WHERE user_id = 'u2' "
                                      "ORDER BY 1")]
    activity = json.loads(run(env, "activity", "--format", "json").stdout)
    assert [(a["import_id"], a["file_name"], a["rows"]) for a in activity] == [
        (record.import_id, "silver.csv", 1), (rejecting, "gold.csv", 4)]
    [rejected] = json.loads(run(env, "rejects", str(rejecting), "--format", "json").stdout)
    assert rejected == {"line_number": 3, "reason": "separator", "raw": "bad,id"}


def test_limit_zero_is_everything_and_a_cut_table_says_what_it_left_out(env):
    ids = [f"user{n:03d}" for n in range(150)]
    env.import_file("big.csv", "\n".join(ids) + "\n")

    table = run(env, "members", "big", "--format", "table")  # a table shows 100 rows unless told otherwise
    body = table.stdout.splitlines()
    assert [line.split()[0] for line in body[3:103]] == ids[:100]
    assert body[103:] == ["... 50 more rows not shown (--limit 0 shows all)"]
    everything = run(env, "members", "big", "--format", "table", "--limit", "0").stdout.splitlines()
    assert [line.split()[0] for line in everything[3:]] == ids and "not shown" not in "".join(everything)

    # csv and json are for programs: all rows by default; a --limit cut keeps stdout pure data and says so on stderr
    assert [r["user_id"] for r in rows(run(env, "members", "big").stdout)] == ids
    cut = run(env, "members", "big", "--limit", "7")
    assert [r["user_id"] for r in rows(cut.stdout)] == ids[:7]
    assert cut.stderr.strip() == "143 more rows not shown (--limit 0 shows all)"
    cut_json = run(env, "members", "big", "--limit", "7", "--format", "json")
    assert len(json.loads(cut_json.stdout)) == 7 and "143 more rows" in cut_json.stderr
    quiet = run(env, "members", "big", "--limit", "7", group=["-q"])
    assert quiet.stdout == cut.stdout and quiet.stderr == ""
    assert run(env, "members", "big", "--limit", "-1").returncode == 2


def test_version_and_the_group_level_config(env, tmp_path):
    done = run(env, "--version", config=False)
    assert done.returncode == 0 and done.stdout == f"audience-pipeline, version {version('audience-pipeline')}\n"

    env.import_file("gold.csv", "u1\nu2\n")
    config = str(env.workspace.path)
    elsewhere = tmp_path / "elsewhere"  # no feeds.yaml here: the config must come from the options
    elsewhere.mkdir()
    group_level = run(env, "members", "gold", group=["--config", config], config=False, cwd=elsewhere)
    assert group_level.returncode == 0, group_level.stderr
    assert [r["user_id"] for r in rows(group_level.stdout)] == ["u1", "u2"]

    # the command's own --config wins over the group's, which wins over $AUDIENCE_PIPELINE_CONFIG
    missing = str(tmp_path / "missing.yaml")
    own_wins = run(env, "members", "gold", "--config", config, group=["--config", missing], config=False,
                   cwd=elsewhere)
    assert own_wins.returncode == 0 and "u1" in own_wins.stdout, own_wins.stderr
    own_missing = run(env, "members", "gold", "--config", missing, group=["--config", config], config=False,
                      cwd=elsewhere)
    assert own_missing.returncode == 1 and "missing.yaml not found" in own_missing.stderr
    from_env = run(env, "members", "gold", config=False, cwd=elsewhere,
                   extra_env={"AUDIENCE_PIPELINE_CONFIG": config})
    assert from_env.returncode == 0 and "u2" in from_env.stdout, from_env.stderr
    group_over_env = run(env, "members", "gold", group=["--config", missing], config=False, cwd=elsewhere,
                         extra_env={"AUDIENCE_PIPELINE_CONFIG": config})
    assert group_over_env.returncode == 1 and "missing.yaml not found" in group_over_env.stderr

    assert run(env, "activity", group=["-q", "-v"]).returncode == 2
    verbose = run(env, "import", str(env.drop / "gold.csv"), "--feed", "repro", group=["-v"])
    assert verbose.returncode == 0 and "skipped" in verbose.stdout
    assert "INFO" in verbose.stderr  # the run's own log lines, which a plain run keeps quiet
    assert "INFO" not in run(env, "import", str(env.drop / "gold.csv"), "--feed", "repro").stderr


def test_errors_are_one_verbatim_line_on_stderr(env, tmp_path):
    # a message holding what rich took for a closing tag: it raised MarkupError instead of printing the error
    unknown = run(env, "delete-audience", "[/x]", "--feed", "repro")
    assert unknown.returncode == 1 and unknown.stderr == "error: no audience '[/x]' in feed 'repro'\n"

    bad = tmp_path / "in" / "list[vip].csv"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    failed = run(env, "import", str(bad), "--feed", "repro")
    assert failed.returncode == 1
    [(import_id, error)] = env.query("SELECT import_id, error FROM imports WHERE file_name = 'list[vip].csv'")
    assert "list[vip].csv" in error and "empty file" in error
    assert failed.stderr == f"error: import {import_id} (list[vip].csv): {error}\n"
    assert failed.stdout.startswith(f"import {import_id}: failed    list[vip].csv: {error} (")

    missing = run(env, "audiences", config=False, group=["--config", str(tmp_path / "no[/x]" / "f[vip].yaml")])
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"error: configuration file {tmp_path}/no[/x]/f[vip].yaml not found")

    # several configuration problems: still one line, each named
    (tmp_path / "two.yaml").write_text("feeds:\n  ok: {format: nope, source: x, max_reject_ratio: 2}\n")
    two = run(env, "audiences", config=False, group=["--config", str(tmp_path / "two.yaml")])
    assert two.returncode == 1 and two.stderr.count("\n") == 1 and two.stderr.startswith("error: ")
    assert "feeds.ok.format" in two.stderr and "feeds.ok.max_reject_ratio" in two.stderr

    # usage errors keep click's exit code 2, on one line too
    usage = run(env, "members", "x", "--format", "xml")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and usage.stderr.startswith("error: ")
    assert "'xml' is not one of 'table', 'csv', 'json'" in usage.stderr


def test_rejected_rows_are_data_in_csv_and_escaped_in_a_table(env):
    record = env.import_file("r.csv", "ok1\nbad,[red]x[/red]\nok2\nw\x1b[31mx\n")
    csv_rows = rows(run(env, "rejects", str(record.import_id)).stdout)
    assert [(r["line_number"], r["reason"], r["raw"]) for r in csv_rows] == [
        ("2", "separator", "bad,[red]x[/red]"), ("4", "control_character", "w\x1b[31mx")]
    # a terminal gets no escape sequence from a vendor's file: the table shows it as text
    table = run(env, "rejects", str(record.import_id), "--format", "table").stdout
    assert "\x1b" not in table and "w\\x1b[31mx" in table and "bad,[red]x[/red]" in table


def test_a_long_import_shows_its_phases_on_a_terminal(env, tmp_path):
    path = tmp_path / "many.csv"
    path.write_text("".join(f"id{n}\n" for n in range(5000)))
    parent, child = pty.openpty()
    captured = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # the terminal's other end closed
                return
            if not chunk:
                return
            captured.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "audience_pipeline", "import", str(path), "--feed", "repro",
             "--config", str(env.workspace.path)],
            cwd=env.root, stdout=subprocess.PIPE, stderr=child, text=True, env={**ENV, "HOME": str(env.root)})
    finally:
        os.close(child)
        reader.join(60)
        os.close(parent)
    assert process.returncode == 0
    assert process.stdout.startswith("import ") and "succeeded many.csv: +5000 qualified" in process.stdout
    assert "\x1b" not in process.stdout  # colour only for a terminal
    progress = captured.decode()
    for phase in ("importing many.csv: receiving", "parsing and validating", "validated, 5,000 rows parsed",
                  "diffing against the current lists, 5,000 rows parsed", "committing, 5,000 rows parsed"):
        assert phase in progress, progress
    assert " s]" in progress

    # without a terminal (cron) no progress at all
    again = run(env, "import", str(path), "--feed", "repro")
    assert again.returncode == 0 and "skipped" in again.stdout
    assert again.stderr == ""


def test_user_audiences_prints_csv_when_piped(make_env):
    env = make_env(base_config())
    env.import_file("gold.csv", "U1\n")
    done = run(env, "user-audiences", "U1")
    [(at,)] = env.query("SELECT qualified_at FROM members WHERE user_id = 'U1'")
    assert done.stdout.splitlines() == ["feed,audience,qualified_at,expires_at", f"repro,gold,{at.isoformat()},"]
    nobody = run(env, "user-audiences", "nobody")
    assert nobody.returncode == 0 and nobody.stdout == "feed,audience,qualified_at,expires_at\n"
    assert nobody.stderr == "'nobody' is in no audience\n"
