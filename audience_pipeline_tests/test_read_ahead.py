"""duck.read_ahead: a streamed DuckDB result pulled by a thread of its own while the caller writes."""

import threading

import duckdb
import pyarrow as pa
import pytest

from audience_pipeline.duck import read_ahead


def _stream(con, rows: int):
    return con.sql(f"SELECT range AS n FROM range({rows})").to_arrow_reader(1000)


def test_every_batch_arrives_once_and_in_order():
    con = duckdb.connect()
    seen = [n for batch in read_ahead(_stream(con, 25_500)) for n in batch.column("n").to_pylist()]
    assert seen == list(range(25_500))


def test_an_error_of_the_stream_is_raised_to_the_consumer_after_the_batches_before_it():
    con = duckdb.connect()
    # the query fails only when it reaches row 5000, after batches were handed over
    reader = con.sql("SELECT CASE WHEN range < 5000 THEN range ELSE error('row ' || range || ' is bad') END AS n "
                     "FROM range(10000)").to_arrow_reader(1000)
    got = []
    # through pyarrow's reader DuckDB's error arrives as an OSError, as it does without read_ahead
    with pytest.raises(OSError, match="row 5000 is bad"):
        for batch in read_ahead(reader):
            got.extend(batch.column("n").to_pylist())
    assert got == list(range(len(got))) and len(got) <= 5000


def test_a_consumer_that_stops_early_stops_the_reader_thread():
    pulled = []

    def endless():
        n = 0
        while True:
            pulled.append(n)
            yield pa.record_batch([pa.array([n])], names=["n"])
            n += 1

    batches = read_ahead(endless())
    first = [next(batches).column("n")[0].as_py() for _ in range(3)]
    batches.close()
    assert first == [0, 1, 2]
    assert not any(t.name == "read_ahead" for t in threading.enumerate())
    # one batch in hand, one waiting, one the reader was offering when it was stopped
    assert len(pulled) <= 6
