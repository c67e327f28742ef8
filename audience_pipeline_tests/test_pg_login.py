"""A PostgreSQL catalog's password comes from libpq's environment, never from feeds.yaml: PGPASSWORD or
~/.pgpass log in; without either the command fails saying why. A real server requiring SCRAM for the role."""

import os
import subprocess
import sys
from urllib.parse import urlsplit

import psycopg
import yaml

ROLE, PASSWORD = "pipeline_login", "pg-Secret-55"


def scram_database(postgres) -> str:
    """A database owned by a role that must log in with a password (the rest of the cluster trusts loopback)."""
    admin = postgres()
    parts = urlsplit(admin)
    with psycopg.connect(admin, autocommit=True) as con:
        hba = con.execute("SHOW hba_file").fetchone()[0]
        con.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        con.execute(f"CREATE DATABASE {ROLE}_db OWNER {ROLE}")
        rules = open(hba).read()
        with open(hba, "w") as fh:
            fh.write(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n{rules}")
        con.execute("SELECT pg_reload_conf()")
    return f"postgresql://{ROLE}@{parts.hostname}:{parts.port}/{ROLE}_db"


def test_pgpassword_and_pgpass_log_in_and_nothing_else_does(postgres, tmp_path):
    url = scram_database(postgres)
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "pg.csv").write_text("a\nb\n")
    (tmp_path / "feeds.yaml").write_text(yaml.safe_dump({
        "storage": {"lake": "lake", "catalog": url, "analytics": "analytics.duckdb"},
        "feeds": {"repro": {"format": "repro", "source": "drop"}}}))

    def cli(*args, **variables):
        return subprocess.run([sys.executable, "-m", "audience_pipeline", *args], cwd=tmp_path,
                              capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200", **variables})

    refused = cli("import", "drop/pg.csv", "--feed", "repro")
    assert refused.returncode != 0 and "password" in refused.stderr.lower(), refused.stderr
    assert PASSWORD not in refused.stdout + refused.stderr

    done = cli("import", "drop/pg.csv", "--feed", "repro", PGPASSWORD=PASSWORD)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr

    parts = urlsplit(url)
    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"{parts.hostname}:{parts.port}:*:{ROLE}:{PASSWORD}\n")
    os.chmod(pgpass, 0o600)
    (tmp_path / "drop" / "pg.csv").write_text("b\nc\n")
    again = cli("import", "drop/pg.csv", "--feed", "repro")  # no PGPASSWORD: ~/.pgpass
    assert again.returncode == 0 and "+1 qualified, -1 disqualified" in again.stdout, again.stdout + again.stderr
    with psycopg.connect(url, password=PASSWORD) as con:  # the catalog is the role's database
        assert con.execute("SELECT count(*) FROM imports WHERE status = 'succeeded'").fetchone() == (2,)
