"""The one place where text that cannot be a bound parameter (identifiers, file paths) becomes SQL.

Values are always bound with ``?``. DuckDB cannot bind a table function's file path inside a view
definition, nor an identifier, so those go through the two helpers below, which have their own tests.
"""

from __future__ import annotations

import os


def quote_identifier(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | os.PathLike) -> str:
    text = os.fspath(value)
    if "\x00" in text:
        raise ValueError("a NUL byte cannot appear in a SQL literal")
    return "'" + text.replace("'", "''") + "'"
