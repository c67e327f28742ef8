"""Phone numbers of every region (issue 12, part 5): through an Attentive feed, and phones.e164_sql directly."""

import duckdb
import pytest

from audience_pipeline import phones
from audience_pipeline_tests.test_formats_attentive import attentive, upload  # noqa: F401 (fixture)


def read(values: list[str | None], region: str) -> list[tuple]:
    """(e164, problem, valid) of each value, through a plain DuckDB connection, with a caller's own $param."""
    sql, params = phones.e164_sql("v", region)
    assert all(name.startswith("phones_") for name in params)
    con = duckdb.connect()
    try:
        rows = con.execute(
            f"SELECT {sql} AS p FROM (SELECT unnest($values::VARCHAR[]) AS v, generate_subscripts($values, 1) AS i) "
            "ORDER BY i", params | {"values": values}).fetchall()
    finally:
        con.close()
    return [None if p is None else (p["e164"], p["problem"], p["valid"]) for (p,) in rows]


def test_french_spellings_are_one_number():
    spellings = ["06 12 34 56 78", "0612345678", "06.12.34.56.78", "+33 6 12 34 56 78", "+33 (0)6 12 34 56 78",
                 "0033 6 12 34 56 78", "33612345678", "(0)6-12-34-56-78"]
    assert read(spellings, "FR") == [("+33612345678", None, True)] * len(spellings)


def test_the_problem_of_what_cannot_be_a_phone():
    values = ["06 12 34", "06 12 34 56 78 90", "06 12 AB 56 78", "+999 612 345", "x", "", "0", None,
              "+33 6 12", "00 33 6 12 34 56 78 90"]
    assert read(values, "FR") == [
        (None, "too_short", None), (None, "too_long", None), (None, "not_a_number", None),
        (None, "invalid_country_code", None), (None, "not_a_number", None), (None, "not_a_number", None),
        (None, "not_a_number", None), None, (None, "too_short", None), (None, "too_long", None)]
    assert {p for _, p, _ in read(values[:-3], "FR") if p} <= set(phones.PROBLEMS)


def test_gb_de_and_numbers_of_other_countries():
    # 07700 900123 is in Ofcom's drama range: possible, not valid
    assert read(["07700 900123", "020 7946 0958", "+33 6 12 34 56 78", "0049 1512 3456789"], "GB") == [
        ("+447700900123", None, False), ("+442079460958", None, True), ("+33612345678", None, None),
        ("+4915123456789", None, None)]
    assert read(["01512 3456789", "030 123456", "+44 (0)20 7946 0958", "+1 212 555 0100"], "DE") == [
        ("+4915123456789", None, True), ("+4930123456", None, True), ("+442079460958", None, None),
        ("+12125550100", None, True)]


def test_nanp_reads_digits_as_the_attentive_seed_requires():
    seed = ["1234567890", "123-456-7890", "1123-456-7890", "11234567890", "(123) 456-7890", "+1 (123) 456-7890"]
    assert read(seed, "US") == [("+11234567890", None, False)] * len(seed)
    assert read(["212-555-0100", "011 33 6 12 34 56 78", "555-0100", "212 555 0100 1"], "US") == [
        ("+12125550100", None, True), ("+33612345678", None, None), (None, "too_short", None),
        (None, "too_long", None)]
    # in a NANP region with its own area code, seven digits are a local number completed by it
    assert read(["949 5555"], "KY") == [("+13459495555", None, True)]


def test_two_regions_in_one_statement_do_not_clash():
    fr_sql, fr_params = phones.e164_sql("v", "FR")
    gb_sql, gb_params = phones.e164_sql("v", "gb")
    assert all(fr_params[k] == gb_params[k] for k in fr_params.keys() & gb_params.keys())
    con = duckdb.connect()
    try:
        row = con.execute(f"SELECT ({fr_sql}).e164, ({gb_sql}).e164 FROM (SELECT '0612345678' AS v)",
                          fr_params | gb_params).fetchone()
    finally:
        con.close()
    assert row == ("+33612345678", "+44612345678")


def test_an_unknown_region_is_a_clear_error():
    with pytest.raises(ValueError, match="'XX' is not a region"):
        phones.e164_sql("v", "XX")


def test_fr_gb_de_feeds_import_their_everyday_spellings(attentive, sftp_server):  # noqa: F811
    text = ("06 12 34 56 78, fr\n+33 6 12 34 56 78, fr\n0033 6 12 34 56 79, fr\n+44 7700 900123, fr\n"
            "+49 1512 3456789, fr\n06 12 34, fr\n06 12 34 56 78 90 12, fr\n06 12 AB 56 78, fr\n+999 123 456, fr\n")
    env = attentive(default_region="FR")
    upload(sftp_server, "sirendenim_subscriber_segment_20261201.csv", text)
    [record] = env.runner.poll("attentive")
    assert record.status == "succeeded", record.error
    assert env.members("fr") == {"+33612345678", "+33612345679", "+447700900123", "+4915123456789"}
    assert env.query("SELECT line_number, reason, raw FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id]) == [
        (6, "invalid_phone: too_short", "06 12 34, fr"),
        (7, "invalid_phone: too_long", "06 12 34 56 78 90 12, fr"),
        (8, "invalid_phone: not_a_number", "06 12 AB 56 78, fr"),
        (9, "invalid_phone: invalid_country_code", "+999 123 456, fr")]
    assert (record.rows_valid, record.duplicates) == (5, 1)


@pytest.mark.parametrize(("region", "spelling", "e164", "warnings"), [
    ("GB", "07700 900123", "+447700900123", 1),  # possible, in a fiction range: accepted with a warning
    ("DE", "01512 3456789", "+4915123456789", 0),
])
def test_gb_and_de_feeds(attentive, sftp_server, region, spelling, e164, warnings):  # noqa: F811
    env = attentive(default_region=region)
    upload(sftp_server, "sirendenim_subscriber_segment_20261201.csv", f"{spelling}, list\n")
    [record] = env.runner.poll("attentive")
    assert record.status == "succeeded", record.error
    assert env.members("list") == {e164}
    assert env.query("SELECT warnings FROM imports WHERE import_id = ?", [record.import_id]) == [(warnings,)]


def test_nanp_seed_spellings_still_give_one_subscriber(attentive, sftp_server):  # noqa: F811
    env = attentive()
    text = ("1234567890, seed\n123-456-7890, seed\n1123-456-7890, seed\n11234567890, seed\n"
            "(123) 456-7890, seed\n")
    upload(sftp_server, "sirendenim_subscriber_segment_20201125.csv", text)
    [record] = env.runner.poll("attentive")
    assert env.members("seed") == {"+11234567890"}
    assert (record.rows_valid, record.duplicates) == (5, 4)
    assert env.query("SELECT warnings FROM imports WHERE import_id = ?", [record.import_id]) == [(5,)]
