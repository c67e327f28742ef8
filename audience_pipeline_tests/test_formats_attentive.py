"""Attentive segment files (seed 003) delivered over a real SFTP server on loopback."""

import os
import time

import pytest

from audience_pipeline.cursor import Cursor
from audience_pipeline.polling import poll_feed
from audience_pipeline.sources import SourceError
from audience_pipeline_tests.conftest import base_config

SEED_FILE = "1234567890 segment 1\n2345678901 segment 2\n0234567890 segment 2\n4567890123 segment 1\n"


@pytest.fixture
def attentive(make_env, sftp_server):
    def make(**options):
        config = base_config()
        feed = {"format": "attentive", "source": sftp_server.location, "customer_domain": "sirendenim",
                "max_reject_ratio": 0.9,
                "sftp": {"known_hosts": str(sftp_server.known_hosts), "password_env": "ATTENTIVE_SFTP_PASSWORD",
                         "quiet_period_seconds": 0}}
        feed.update(options)
        config["feeds"] = {"attentive": feed}
        return make_env(config, name=f"ws{len(options)}")
    return make


def upload(server, name: str, text: str, age_seconds: float = 0) -> None:
    path = server.uploads / name
    path.write_text(text)
    if age_seconds:
        stamp = time.time() - age_seconds
        os.utime(path, (stamp, stamp))


def test_seed_example_over_sftp(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_1.csv", SEED_FILE)
    [record] = env.runner.poll("attentive")
    assert record.status == "succeeded"
    assert record.source_uri.startswith(f"sftp://attentive@127.0.0.1:{sftp_server.port}/uploads/")
    assert sftp_server.password not in record.source_uri
    assert env.members("segment 1") == {"+11234567890", "+14567890123"}
    assert env.members("segment 2") == {"+12345678901", "+10234567890"}
    # 123... and 023... are not assignable US numbers: accepted, counted as warnings
    assert env.query("SELECT warnings FROM imports WHERE import_id = ?", [record.import_id]) == [(2,)]
    assert env.runner.poll("attentive") == []


def test_four_phone_spellings_are_one_subscriber(attentive, sftp_server):
    env = attentive()
    text = "1234567890, vip\n123-456-7890, vip\n1123-456-7890, vip\n11234567890, vip\n+1 (123) 456-7890, vip\n"
    upload(sftp_server, "sirendenim_subscriber_segment_20201125.csv", text)
    [record] = env.runner.poll("attentive")
    assert env.members("vip") == {"+11234567890"}
    assert (record.rows_valid, record.duplicates) == (5, 4)
    bad = "12345, vip\nabc-def-ghij, vip\n123456789012345, vip\n+44 20 7946 0958, vip\n"
    upload(sftp_server, "sirendenim_subscriber_segment_20201126.csv", bad)
    [second] = env.runner.poll("attentive")
    assert env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [second.import_id]) == [(1, "invalid_phone: too_short"), (2, "invalid_phone: not_a_number"),
                                             (3, "invalid_phone: too_long")]
    assert env.members("vip") == {"+442079460958"}  # a newer date replaces the list


def test_mixed_phones_and_emails_fail_naming_a_line_of_each(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, "sirendenim_subscriber_segment_20201125.csv",
           "1234567890, a\nann@example.com, a\n")
    [record] = env.runner.poll("attentive")
    assert record.status == "failed"
    assert "phone numbers (line 1) and e-mail addresses (line 2)" in record.error


def test_emails_and_segment_names(attentive, sftp_server):
    env = attentive(subscriber_type="email")
    name64, name65 = "S" * 64, "S" * 65
    text = (f" Ann@Example.COM , {name64}\nbob@example.com, {name65}\ncarl@example.com, Most Loyal Customers\n"
            "dora@example.com, spring/sale\nnot-an-email, Most Loyal Customers\n")
    upload(sftp_server, "sirendenim_subscriber_segment_20201125.csv", text)
    [record] = env.runner.poll("attentive")
    assert env.members(name64) == {"ann@example.com"}
    assert env.members("Most Loyal Customers") == {"carl@example.com"}
    assert env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id]) == [(2, "segment_name_too_long"), (4, "segment_name_characters"),
                                             (5, "invalid_email")]


@pytest.mark.parametrize("order", [("_1", "_2"), ("_2", "_1")])
def test_parts_of_one_day_union_in_either_order(attentive, sftp_server, order):
    env = attentive()
    upload(sftp_server, "sirendenim_subscriber_segment_20201124.csv", "2125550100, daily\n2125550199, daily\n")
    env.runner.poll("attentive")
    parts = {"_1": "2125550101, daily\n2125550102, daily\n", "_2": "2125550103, daily\n"}
    for suffix in order:
        upload(sftp_server, f"sirendenim_subscriber_segment_20201125{suffix}.csv", parts[suffix])
        env.runner.poll("attentive")
    # the 25th replaced the 24th, and neither part of the 25th dropped the other's members
    assert env.members("daily") == {"+12125550101", "+12125550102", "+12125550103"}
    upload(sftp_server, "sirendenim_subscriber_segment_20201123.csv", "2125550177, daily\n")
    [stale] = env.runner.poll("attentive")
    assert stale.status == "skipped" and "stale" in stale.error
    assert env.members("daily") == {"+12125550101", "+12125550102", "+12125550103"}


def test_bad_names_and_dates_are_refused_in_the_activity_log(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, "sirendenim_subscriber_segment_20201332.csv", "2125550100, x\n")
    upload(sftp_server, "otherdomain_subscriber_segment_20201125.csv", "2125550100, x\n")
    records = sorted(env.runner.poll("attentive"), key=lambda r: r.file_name)
    assert [r.status for r in records] == ["failed", "failed"]
    assert "not an Attentive segment file name" in records[0].error
    assert "20201332 is not a real date" in records[1].error


def test_a_file_still_being_written_waits_for_its_quiet_period_or_marker(attentive, sftp_server):
    env = attentive(sftp={"known_hosts": str(sftp_server.known_hosts), "password_env": "ATTENTIVE_SFTP_PASSWORD",
                          "quiet_period_seconds": 120, "marker_suffix": ".done"})
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_1.csv", "2125550100, grow\n")
    assert env.runner.poll("attentive") == []  # written just now: maybe still growing
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_1.csv", "2125550100, grow\n2125550101, grow\n",
           age_seconds=300)
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_2.csv", "2125550102, grow\n")
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_2.csv.done", "")
    records = env.runner.poll("attentive")  # both parts complete now, found together: one import
    assert not env.runner.unrecorded, env.runner.unrecorded
    [record] = records
    assert "_1.csv" in record.source_uri and "_2.csv" in record.source_uri
    assert env.members("grow") == {"+12125550100", "+12125550101", "+12125550102"}


def test_default_interval_is_a_day_and_the_host_key_is_verified(attentive, sftp_server, tmp_path):
    env = attentive()
    assert env.runner.defs.resolve_sensor_def("attentive_audience_sensor").minimum_interval_seconds == 86400
    wrong = tmp_path / "wrong_known_hosts"
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()
    wrong.write_text(f"[127.0.0.1]:{sftp_server.port} {other}\n")
    feed = env.workspace.feed("attentive").model_copy(
        update={"sftp": env.workspace.feed("attentive").sftp.model_copy(update={"known_hosts": str(wrong)})})
    source = env.runner.resource.source("attentive")
    source.options = feed.sftp
    with pytest.raises(SourceError) as info:
        poll_feed("attentive", feed, source, Cursor())
    assert "BadHostKeyException" in str(info.value) or "host key" in str(info.value).lower()
    assert sftp_server.password not in str(info.value)


def test_parts_found_in_one_listing_are_one_import(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, "sirendenim_subscriber_segment_20201124.csv", "2125550100, list\n")
    env.runner.poll("attentive")
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_1.csv", "2125550101, list\n2125550102, list")
    upload(sftp_server, "sirendenim_subscriber_segment_20201125_2.csv", "2125550103, list\n")
    [record] = env.runner.poll("attentive")  # both parts: one import, one commit
    assert record.file_name == "sirendenim_subscriber_segment_20201125.csv"
    assert "_1.csv" in record.source_uri and "_2.csv" in record.source_uri
    assert (record.qualified, record.disqualified, record.members) == (3, 1, 3)
    assert env.members("list") == {"+12125550101", "+12125550102", "+12125550103"}


DAY = "sirendenim_subscriber_segment_20201125"


def test_a_re_upload_of_a_file_replaces_its_list(attentive, sftp_server):
    """"Files containing an existing segment name will replace the existing list": the same file again with
    one phone instead of two leaves one member (it used to be unioned in: +0 -0, 2 members)."""
    env = attentive()
    upload(sftp_server, f"{DAY}.csv", "2125550101, segment 1\n2125550102, segment 1\n", age_seconds=60)
    env.runner.poll("attentive")
    upload(sftp_server, f"{DAY}.csv", "2125550101, segment 1\n")
    [record] = env.runner.poll("attentive")
    assert (record.status, record.qualified, record.disqualified, record.members) == ("succeeded", 0, 1, 1)
    assert env.members("segment 1") == {"+12125550101"}


def test_a_re_uploaded_part_replaces_only_its_own_contribution(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, f"{DAY}_1.csv", "2125550101, seg\n2125550102, seg\n", age_seconds=60)
    env.runner.poll("attentive")
    upload(sftp_server, f"{DAY}_2.csv", "2125550103, seg\n", age_seconds=50)
    env.runner.poll("attentive")
    assert env.members("seg") == {"+12125550101", "+12125550102", "+12125550103"}
    upload(sftp_server, f"{DAY}_1.csv", "2125550101, seg\n")  # part 1 again, without ...102
    [record] = env.runner.poll("attentive")
    assert (record.status, record.disqualified, record.duplicates) == ("succeeded", 1, 0)
    assert env.members("seg") == {"+12125550101", "+12125550103"}


def test_parts_found_together_then_one_re_uploaded_and_a_new_one(attentive, sftp_server):
    env = attentive()
    upload(sftp_server, f"{DAY}_1.csv", "2125550101, seg\n2125550102, seg\n", age_seconds=60)
    upload(sftp_server, f"{DAY}_2.csv", "2125550103, seg\n2125550109, other\n", age_seconds=60)
    [together] = env.runner.poll("attentive")
    assert (together.status, together.members) == ("succeeded", 4), together.error
    upload(sftp_server, f"{DAY}_2.csv", "2125550104, seg\n", age_seconds=30)  # part 2 again: 103 out, 104 in
    [again] = env.runner.poll("attentive")
    assert (again.qualified, again.disqualified) == (1, 1)
    assert env.members("seg") == {"+12125550101", "+12125550102", "+12125550104"}
    # a file replaces the segments it names ("Files containing an existing segment name"): part 2 no longer
    # names "other", which keeps its list
    assert env.members("other") == {"+12125550109"}
    upload(sftp_server, f"{DAY}_3.csv", "2125550105, seg\n")  # a new part adds to the date's list
    env.runner.poll("attentive")
    assert env.members("seg") == {"+12125550101", "+12125550102", "+12125550104", "+12125550105"}
    upload(sftp_server, "sirendenim_subscriber_segment_20201126_2.csv", "2125550106, seg\n")
    env.runner.poll("attentive")  # the first part of a newer date replaces the list
    assert env.members("seg") == {"+12125550106"}
