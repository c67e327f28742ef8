"""The README's bad-input table, row by row, through the real pipeline: each row's reason at its line, the
members the valid rows make, and what does not count toward max_reject_ratio."""

import subprocess
import sys

from audience_pipeline_tests.conftest import base_config


def test_id_rules_reject_at_their_line_and_tabs_around_an_id_are_trimmed(make_env):
    env = make_env(base_config(ids={"min_length": 3, "max_length": 8, "pattern": "[a-z0-9]+"},
                               max_reject_ratio=0.9))
    record = env.import_file("rules.csv", "ab\n\tgood1\t\nABC123\n longer_than_8 \n ok2\nx\x01y\n")
    assert record.status == "succeeded", record.error
    assert env.members("rules") == {"good1", "ok2"}
    assert env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id]) == [
        (1, "too_short"), (3, "pattern_mismatch"), (4, "too_long"), (6, "control_character")]


def test_blank_lines_do_not_count_toward_max_reject_ratio(make_env):
    env = make_env(base_config(max_reject_ratio=0.25))
    # 2 IDs, 1 bad row and 20 blank lines: 1 of 3 rows is over 25%, 1 of 23 lines would not be
    bad = env.import_file("blank.csv", "a\n" + "\n" * 10 + "b,c\n" + "\n" * 10 + "d\n")
    assert bad.status == "failed" and "1 of 3 rows rejected" in bad.error, bad.error
    # and 1 bad row among 4 IDs (20%) passes however many blank lines there are
    record = env.import_file("blank.csv", "a\n" + "\n" * 30 + "b,c\ne\nf\nd\n")
    assert record.status == "succeeded", record.error
    assert env.members("blank") == {"a", "d", "e", "f"}
    assert env.query("SELECT reason, count(*) FROM rejected_rows WHERE import_id = ? GROUP BY 1 ORDER BY 1",
                     [record.import_id]) == [("blank_line", 30), ("separator", 1)]


def test_a_catalog_url_holding_a_password_is_refused(tmp_path):
    (tmp_path / "feeds.yaml").write_text(
        "storage: {lake: lake, catalog: 'postgresql://app:s3cret@127.0.0.1:5432/audiences'}\n"
        "feeds:\n  r: {format: repro, source: drop}\n")
    done = subprocess.run([sys.executable, "-m", "audience_pipeline", "audiences"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 1 and "the catalog URL holds a password: set PGPASSWORD" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
