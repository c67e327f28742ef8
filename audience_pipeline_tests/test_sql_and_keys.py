import duckdb
import pytest

from audience_pipeline.keys import partition_key, sanitize_file_name
from audience_pipeline.sql import quote_identifier, quote_literal


def test_quote_literal_round_trips_through_duckdb():
    con = duckdb.connect()
    for text in ["plain", "it's", "a''b", "/tmp/x y/z.parquet", "'; DROP TABLE t; --", "ünï©ødé"]:
        assert con.execute(f"SELECT {quote_literal(text)}").fetchone()[0] == text
    with pytest.raises(ValueError):
        quote_literal("nul\x00byte")


def test_quote_identifier_round_trips_through_duckdb():
    con = duckdb.connect()
    for name in ["user_id", "e-mail", 'we"ird', "select"]:
        con.execute(f"CREATE OR REPLACE TABLE t ({quote_identifier(name)} INTEGER)")
        columns = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 't'")
        assert columns.fetchone()[0] == name
    with pytest.raises(ValueError):
        quote_identifier("")


def test_partition_keys_are_valid_and_bounded():
    assert sanitize_file_name("a b (copy).csv") == "a_b_copy_.csv"
    assert "..." not in sanitize_file_name("x....csv") and ".." not in sanitize_file_name("../../etc")
    assert sanitize_file_name("\n\t\x00") == "file"
    long = partition_key("repro", "n" * 300 + ".csv", "0123456789abcdef")
    assert long == "repro:" + "n" * 60 + ":01234567"
