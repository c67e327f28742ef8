"""The command line as a user runs it: a fresh workspace from `init`, imports, queries, failures."""

import subprocess
import sys


def cli(*args, cwd, check=True):
    done = subprocess.run([sys.executable, "-m", "audience_pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "200"})
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def test_init_poll_query_and_fail(tmp_path):
    ws = tmp_path / "ws"
    cli("init", str(ws), cwd=tmp_path)
    assert (ws / "feeds.yaml").exists() and (ws / "dagster.yaml").exists()
    assert sorted(p.name for p in (ws / "data" / "drop" / "repro").iterdir()) == [
        "spring_campaign.csv", "vip_customers.csv"]

    polled = cli("poll", cwd=ws)
    assert polled.stdout.count("succeeded") == 2
    assert "no new files" in cli("poll", cwd=ws).stdout

    listing = cli("audiences", cwd=ws).stdout
    assert "vip_customers" in listing and "spring_campaign" in listing
    # piped, so CSV: a header, then user_id, qualified_at, expires_at
    members = [line.split(",")[0] for line in
               cli("members", "vip_customers", "--config", str(ws / "feeds.yaml"), cwd=tmp_path).stdout.split()[1:]]
    assert members == sorted(["qwpeoifjadlskf", "zxocjvasdfoiji", "azxcpoqnadslpx", "mnbvcxzlkjhgfd",
                              "poiuytrewqasdf", "lkjhgfdsamnbvc"])
    rejects = cli("rejects", "1", cwd=ws).stdout + cli("rejects", "2", cwd=ws).stdout
    assert "separator" in rejects and "unmatched" in rejects

    # the runs went into the workspace's own Dagster instance, under data/
    assert (ws / "data" / "dagster" / "storage").is_dir()

    bad = tmp_path / "vip_customers.csv"
    bad.write_bytes(b"")
    failed = cli("import", str(bad), "--feed", "repro", cwd=ws, check=False)
    assert failed.returncode == 1
    assert "error:" in failed.stderr and "empty file" in failed.stderr
    assert len(cli("members", "vip_customers", cwd=ws).stdout.split()) == 1 + 6

    unknown = cli("import", str(bad), "--feed", "nope", cwd=ws, check=False)
    assert unknown.returncode == 1 and "no feed named 'nope'" in unknown.stderr
    no_config = cli("audiences", cwd=tmp_path, check=False)
    assert no_config.returncode == 1 and "feeds.yaml not found" in no_config.stderr.replace("\n", "")


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "feeds.yaml").write_text("feeds:\n  Bad-Name: {format: repro, source: x}\n")
    done = cli("audiences", cwd=tmp_path, check=False)
    assert done.returncode == 1 and "feeds" in done.stderr and "Bad-Name" in done.stderr
    (tmp_path / "feeds.yaml").write_text("feeds:\n  ok: {format: nope, source: x, max_reject_ratio: 2}\n")
    done = cli("audiences", cwd=tmp_path, check=False)
    assert "feeds.ok.format" in done.stderr and "feeds.ok.max_reject_ratio" in done.stderr
