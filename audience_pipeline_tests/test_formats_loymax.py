"""Loymax target-audience files (seed 004), both import modes."""

import pytest

from audience_pipeline_tests.conftest import base_config

# the seed's examples, without the wiki markup (##) around them
MODE_1 = "123;\n124;\n125;\n245.\n"
MODE_2 = "123; Audience 1\n124; Audience 2\n125; Audience 3\n245; Audience 4\n"


@pytest.fixture
def loymax(make_env):
    def make(**options):
        config = base_config()
        config["feeds"] = {"loymax": {"format": "loymax", "source": "drop/loymax", "max_reject_ratio": 0.5,
                                      **options}}
        env = make_env(config, name="ws_" + "_".join(f"{k}{v}" for k, v in sorted(options.items())))
        (env.root / "drop" / "loymax").mkdir(parents=True, exist_ok=True)
        return env
    return make


def test_mode_1_seed_example(loymax):
    env = loymax(mode="single")
    record = env.import_file("newsletter.csv", MODE_1, feed="loymax")
    assert record.status == "succeeded"
    # identifiers are taken as written: the seed's last line reads "245." and imports as such
    assert env.members("newsletter") == {"123", "124", "125", "245."}


def test_mode_1_named_audience_spaces_and_extra_columns(loymax):
    env = loymax(mode="single", audience="Gold tier")
    record = env.import_file("any_name.txt", "  501 ;\n502\n503;extra\n\n 504 ;  \n", feed="loymax")
    assert env.members("Gold tier") == {"501", "502", "504"}
    assert env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id]) == [(3, "extra_column"), (4, "blank_line")]


def test_mode_2_seed_example_and_incremental_adds(loymax):
    env = loymax(mode="per_row")
    env.import_file("assign.csv", MODE_2, feed="loymax")
    assert env.members("Audience 1") == {"123"} and env.members("Audience 4") == {"245"}
    record = env.import_file("more.csv", " 777 ; Audience 1 ;\n888;\n", feed="loymax")
    assert env.members("Audience 1") == {"123", "777"}  # Loymax assigns: earlier members stay
    assert env.query("SELECT reason FROM rejected_rows WHERE import_id = ?", [record.import_id]) == [
        ("missing_audience",)]


def test_action_remove_takes_customers_out(loymax):
    import yaml

    env = loymax(mode="per_row")
    env.import_file("a.csv", "1;VIP\n2;VIP\n3;VIP\n", feed="loymax")
    config_file = env.root / "feeds.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["feeds"]["loymax"]["action"] = "remove"
    config_file.write_text(yaml.safe_dump(config))  # the feed now receives removal files
    record = env.import_file("out.csv", "2;VIP\n9;VIP\n", feed="loymax")
    assert (record.qualified, record.disqualified, record.noops) == (0, 1, 1)
    assert env.members("VIP") == {"1", "3"}


def test_replace_files_are_full_lists(loymax):
    env = loymax(mode="single", audience="full", action="replace")
    env.import_file("day1.csv", "1;\n2;\n", feed="loymax")
    record = env.import_file("day2.csv", "2;\n3;\n", feed="loymax")
    assert (record.qualified, record.disqualified) == (1, 1)
    assert env.members("full") == {"2", "3"}
