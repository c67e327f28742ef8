"""What the CLI prints: rows as an aligned table for a person, CSV or JSON for a program, messages on stderr.

Data (ids, names, file names, errors) is written as it is, never through a markup or emoji renderer: rich read
``crm:id:42`` as an emoji code and ``[vip]`` as a style tag. Only the table, which is meant for a terminal,
escapes control characters, so that a raw rejected row cannot move the cursor or recolour the screen.
"""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import IO

import click
from rich.cells import cell_len

FORMATS = ("table", "csv", "json")
# Table column widths are measured on the first rows only, so that --limit 0 on a terminal still streams.
WIDTH_SAMPLE = 1000
# Lines end in LF, not RFC 4180's CRLF: piped output goes to sort, cut, grep and `while read`, which would keep
# the CR; every CSV reader (Python's csv, DuckDB, pandas, spreadsheets) takes either. Quoting is RFC 4180's.
CSV_LINE_END = "\n"

_TABLE_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def default_format(stream: IO = None) -> str:
    """``table`` for a person at a terminal, ``csv`` when the output goes to a pipe or a file."""
    stream = stream or sys.stdout
    return "table" if stream.isatty() else "csv"


def text(value) -> str:
    """A value as CSV and the table show it: NULL is empty, instants are ISO 8601."""
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _json_value(value):
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def one_line(message: str) -> str:
    """A message on one line (its lines joined by "; "), for logs that keep one line per event."""
    return "; ".join(line.rstrip() for line in str(message).splitlines() if line.strip())


def echo_error(message: str) -> None:
    click.echo(f"{click.style('error:', fg='red')} {one_line(message)}", err=True)


class Printer:
    """Where rows and messages go, per the group's -q / -v: rows and errors always, notes unless quiet."""

    def __init__(self, quiet: bool = False, out: IO | None = None, err: IO | None = None):
        self.quiet = quiet
        self.out = out
        self.err = err

    def line(self, message: str) -> None:
        """A result line (an import's outcome, a file written): data, printed even when quiet."""
        click.echo(message, file=self.out)

    def info(self, message: str) -> None:
        """Progress of the command itself (a file written, nothing new found) on stdout; quiet drops it."""
        if not self.quiet:
            click.echo(message, file=self.out)

    def note(self, message: str) -> None:
        """Help for a person (nothing found, rows left out) on stderr; quiet drops it."""
        if not self.quiet:
            click.echo(message, file=self.err or sys.stderr)

    def rows(self, columns: Sequence[str], rows: Iterable[Sequence], fmt: str, title: str | None = None,
             left_out: int = 0) -> None:
        """Print rows as ``fmt``. ``left_out``: rows beyond --limit, said in the table's footer, or on stderr
        for csv and json (whose output stays machine-readable)."""
        out = self.out or click.get_text_stream("stdout")
        if fmt == "csv":
            write_csv(out, columns, rows)
        elif fmt == "json":
            write_json(out, columns, rows)
        else:
            write_table(out, columns, rows, title)
        if left_out:
            message = f"{left_out} more row{'s' if left_out != 1 else ''} not shown (--limit 0 shows all)"
            if fmt == "table":
                click.echo(f"... {message}", file=out)
            else:
                self.note(message)


def write_csv(out: IO, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    writer = csv.writer(out, lineterminator=CSV_LINE_END)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([text(v) for v in row])


def write_json(out: IO, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """An array of objects keyed by the CSV header's names, one object per line, written as it is read."""
    out.write("[")
    first = True
    for row in rows:
        out.write("\n" if first else ",\n")
        out.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False, default=_json_value))
        first = False
    out.write("]\n" if first else "\n]\n")


def table_cell(value) -> str:
    return text(value).translate(_TABLE_ESCAPES)


def write_table(out: IO, columns: Sequence[str], rows: Iterable[Sequence], title: str | None = None) -> None:
    """Columns aligned with spaces, never wrapped nor cut: a long id makes a long line, as it is."""
    rows = iter(rows)
    sample = [row for _, row in zip(range(WIDTH_SAMPLE), rows, strict=False)]
    numeric = [all(isinstance(r[i], int | float | Decimal) for r in sample if r[i] is not None) and
               any(r[i] is not None for r in sample) for i in range(len(columns))]
    cells = [[table_cell(v) for v in row] for row in sample]
    widths = [max([cell_len(c)] + [cell_len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = []
        for i, value in enumerate(values):
            pad = " " * max(0, widths[i] - cell_len(value))
            padded.append(pad + value if numeric[i] else value + pad)
        return "  ".join(padded).rstrip()

    if title:
        click.echo(title, file=out)
    click.echo(line(list(columns)), file=out)
    click.echo("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        click.echo(line(row), file=out)
    for row in rows:
        click.echo(line([table_cell(v) for v in row]), file=out)
    if not cells:
        click.echo("(no rows)", file=out)


def batches(cursor, size: int = 10_000) -> Iterator[tuple]:
    """A DuckDB cursor's rows, fetched a batch at a time so that a long list is not held in memory at once."""
    while chunk := cursor.fetchmany(size):
        yield from chunk


class Progress:
    """One line on stderr, redrawn in place, for a long import at a terminal: which file, the phase it is in,
    the rows parsed once they are known, and the time since it started. Phases come from the importer
    (``importer.import_progress``); a background thread keeps the elapsed time ticking between them."""

    def __init__(self, label: str, stream: IO | None = None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock
        self.phase = "starting"
        self.rows: int | None = None
        self.started = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __call__(self, phase: str, rows: int | None = None) -> None:
        with self._lock:
            self.phase = phase
            if rows is not None or phase == "receiving":  # a poll's next file starts from nothing parsed
                self.rows = rows
        self._draw()

    def status(self) -> str:
        rows = f", {self.rows:,} rows parsed" if self.rows is not None else ""
        return f"{self.label}: {self.phase}{rows} [{self.clock() - self.started:.1f} s]"

    def _draw(self) -> None:
        with self._lock:
            line = table_cell(self.status())
            pad = " " * max(0, self._width - cell_len(line))
            self._width = cell_len(line)
            self.stream.write(f"\r{line}{pad}")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def __enter__(self) -> Progress:
        self._draw()
        self._thread = threading.Thread(target=self._tick, name="import-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
