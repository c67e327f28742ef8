"""The optional users registry: which users exist, which identifiers (email, phone, ...) are theirs, and which
of them a feed may reach (``eligible:``).

Registry values are normalized as the feed's file identifiers are (``identifier_kind``), once per registry
version: the normalized lookup of one (registry sha256, column, hash, kind, region, eligibility rule) is a
Parquet file under the lake's staging folder, reused by every import until the registry changes (retention
deletes a lookup unused for a day). Values that fail to normalize are kept out of the lookup, so they never
match silently, and are counted (``registry check`` lists them).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

from audience_pipeline.hashing import sha256_file
from audience_pipeline.sql import quote_identifier, quote_literal

HASHES = {"sha256": "sha256", "md5": "md5"}
KINDS = ("phone", "email", "plain")
# Bump when the lookup's normalization or layout changes: older lookups are then rebuilt, never misread.
LOOKUP_VERSION = 1
EXAMPLES = 5
# the shape Attentive's e-mail files are checked against (formats/attentive.py)
EMAIL_PATTERN = r"[^@\s]+@[^@\s]+\.[^@\s]+"


class RegistryError(ValueError):
    pass


def identifier_kind(feed) -> str:
    """How the feed's identifiers are normalized: Attentive's by its subscriber type, the others' by option."""
    if feed.format == "attentive":
        return feed.subscriber_type
    return feed.identifier_kind


def eligible_values(values) -> list[str]:
    """The eligibility values of one column as compared: trimmed, lower-cased text (YAML ``true`` -> 'true')."""
    items = values if isinstance(values, list) else [values]
    return sorted({str(v).strip().lower() for v in items})


def normalization_sql(kind: str, value_sql: str, region: str) -> tuple[str, dict]:
    """SQL of ``STRUCT(identifier VARCHAR, problem VARCHAR)`` normalizing one text value as a file identifier of
    this kind is: trimmed (plain); trimmed and lower-cased, and shaped like an e-mail (email); E.164 for
    ``region`` by phones.e164_sql (phone). ``identifier`` is NULL, and ``problem`` says why, when the value
    cannot be normalized."""
    if kind == "phone":
        from audience_pipeline import phones

        sql, params = phones.e164_sql(value_sql, region)
        return f"list_transform([{sql}], lambda n: {{'identifier': n.e164, 'problem': n.problem}})[1]", params
    if kind == "email":
        return (f"list_transform([lower(trim({value_sql}))], lambda n: "
                f"{{'identifier': CASE WHEN regexp_full_match(n, $users_email) THEN n END, "
                f"'problem': CASE WHEN NOT regexp_full_match(n, $users_email) THEN 'not_an_email' END}})[1]",
                {"users_email": EMAIL_PATTERN})
    return f"{{'identifier': trim({value_sql}), 'problem': NULL::VARCHAR}}", {}


@dataclass(frozen=True)
class Lookup:
    """A built lookup of one identifier type: (identifier, user_id, eligible) rows, and what failed."""

    identifier_type: str
    column: str
    path: Path
    invalid_path: Path
    invalid: int


@dataclass(frozen=True)
class RegistryProblem:
    """Values of one registry column, as one feed reads them, that fail to normalize."""

    feed: str
    column: str
    kind: str
    count: int
    examples: tuple[tuple[int, str, str], ...]  # (registry line, value, problem)


_SHA256: dict[tuple, str] = {}


@dataclass(frozen=True)
class UsersRegistry:
    path: Path
    user_id_column: str

    def reader_sql(self) -> str:
        if self.path.suffix.lower() == ".parquet":
            return "read_parquet($users_path)"
        return "read_csv($users_path, header = true, all_varchar = true, auto_detect = true)"

    @property
    def first_line(self) -> int:
        """The line (CSV; Parquet: the row) of the registry's first user: a CSV's line 1 is its header."""
        return 1 if self.path.suffix.lower() == ".parquet" else 2

    def sha256(self) -> str:
        """The registry's content hash, computed once per version of the file (it may be large, and every
        import asks for it more than once)."""
        stat = self.path.stat()
        key = (str(self.path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in _SHA256:
            _SHA256[key] = sha256_file(self.path)
        return _SHA256[key]

    def _columns(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        if not self.path.is_file():
            raise RegistryError(f"users registry {self.path} not found")
        return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {self.reader_sql()}",
                                              {"users_path": str(self.path)}).fetchall()]

    def _require(self, con: duckdb.DuckDBPyConnection, needed: dict[str, str]) -> None:
        """``needed`` maps each column to what needs it, for the error."""
        columns = self._columns(con)
        for column in sorted(needed):
            if column not in columns:
                raise RegistryError(
                    f"users registry {self.path} has no column {column!r}, needed by {needed[column]} "
                    f"(columns: {', '.join(columns)})"
                )

    # -- eligibility --------------------------------------------------------------------------------
    def _eligible_condition(self, feed) -> tuple[str, dict]:
        """A condition on one registry row: every column of ``eligible:`` holds one of its values."""
        parts, params = ["true"], {}
        for i, (column, values) in enumerate(sorted(feed.eligible.items())):
            params[f"users_eligible_{i}"] = eligible_values(values)
            parts.append(f"list_contains($users_eligible_{i}, lower(trim({quote_identifier(column)}::VARCHAR)))")
        return " AND ".join(parts), params

    def eligible_users_sql(self, con: duckdb.DuckDBPyConnection, feed) -> tuple[str, dict]:
        """A query with one column ``user_id``: the distinct users eligible for ``feed`` (all users when it has
        no ``eligible:``). A user is eligible when a registry row of theirs has, in every column of
        ``eligible:``, one of its values, compared as trimmed text, case-insensitive."""
        self._require(con, {self.user_id_column: "user_id_column"}
                      | {c: "the feed's eligible:" for c in feed.eligible})
        condition, params = self._eligible_condition(feed)
        uid = quote_identifier(self.user_id_column)
        sql = f"""
            SELECT DISTINCT trim({uid}::VARCHAR) AS user_id
            FROM {self.reader_sql()}
            WHERE {uid} IS NOT NULL AND trim({uid}::VARCHAR) <> '' AND {condition}"""
        return sql, params | {"users_path": str(self.path)}

    # -- lookups ------------------------------------------------------------------------------------
    def _lookup_key(self, mapping, kind: str, region: str, feed) -> str:
        key = {"v": LOOKUP_VERSION, "sha256": self.sha256(), "user_id": self.user_id_column,
               "column": mapping.column, "hash": mapping.hash, "kind": kind,
               "region": region.upper() if kind == "phone" else None,
               "eligible": {c: eligible_values(v) for c, v in sorted(feed.eligible.items())}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def lookups(self, con: duckdb.DuckDBPyConnection, feed, mappings: dict, folder: Path) -> list[Lookup]:
        """The built lookup of each identifier type of ``mappings`` for this feed, in ``folder`` (the lake's
        staging folder), built now if missing."""
        kind = identifier_kind(feed)
        region = feed.default_region.upper()
        self._require(con, {self.user_id_column: "user_id_column"}
                      | {m.column: f"identifier type {t!r}" for t, m in mappings.items()}
                      | {c: "the feed's eligible:" for c in feed.eligible})
        built = []
        for identifier_type, mapping in sorted(mappings.items()):
            key = self._lookup_key(mapping, kind, region, feed)
            path = folder / f"registry_lookup_{key}.parquet"
            invalid_path = folder / f"registry_invalid_{key}.parquet"
            try:
                # in use: retention deletes staging entries untouched for a day
                os.utime(path)
                os.utime(invalid_path)
            except FileNotFoundError:
                self._build(con, feed, mapping, kind, region, path, invalid_path)
            invalid = con.execute("SELECT count(*) FROM read_parquet(?)", [str(invalid_path)]).fetchone()[0]
            built.append(Lookup(identifier_type, mapping.column, path, invalid_path, invalid))
        return built

    def _build(self, con: duckdb.DuckDBPyConnection, feed, mapping, kind: str, region: str, path: Path,
               invalid_path: Path) -> None:
        value = f"{quote_identifier(mapping.column)}::VARCHAR"
        normalized, params = normalization_sql(kind, "value", region)
        identifier = "n.identifier"
        if mapping.hash:
            identifier = f"{HASHES[mapping.hash]}(lower({identifier}))"
        uid = quote_identifier(self.user_id_column)
        params |= {"users_path": str(self.path)}

        def values(line: str = "") -> str:
            return f"""
                SELECT *, {normalized} AS n
                FROM (SELECT trim({uid}::VARCHAR) AS user_id, {value} AS value{line} FROM {self.reader_sql()})
                WHERE user_id IS NOT NULL AND user_id <> '' AND value IS NOT NULL AND trim(value) <> ''"""
        path.parent.mkdir(parents=True, exist_ok=True)
        if feed.eligible:
            eligible_sql, eligible_params = self.eligible_users_sql(con, feed)
            eligible, params = "e.user_id IS NOT NULL", params | eligible_params
            join = f"LEFT JOIN ({eligible_sql}) e ON e.user_id = l.user_id"
        else:
            eligible, join = "true", ""
        # If two users share a value, the smallest user_id wins, so resolution is deterministic.
        _copy_once(con, f"""
            WITH l AS (SELECT {identifier} AS identifier, min(user_id) AS user_id
                       FROM ({values()})
                       WHERE {identifier} IS NOT NULL GROUP BY 1)
            SELECT l.identifier, l.user_id, {eligible} AS eligible FROM l {join}""", params, path)
        if kind == "plain":
            # trimming never fails: no line numbers to compute (they cost a second, ordered read)
            invalid, invalid_params = ("SELECT NULL::BIGINT AS line, NULL::VARCHAR AS value, NULL::VARCHAR AS problem "
                                      "WHERE false"), {}
        else:
            # line numbers follow the file's order (DuckDB keeps insertion order by default); only shown
            line = ", row_number() OVER () + $users_first_line - 1 AS line"
            invalid = f"""SELECT line, value, n.problem AS problem
                          FROM ({values(line)})
                          WHERE n.identifier IS NULL ORDER BY line"""
            invalid_params = {k: v for k, v in params.items() if not k.startswith("users_eligible_")}
            invalid_params["users_first_line"] = self.first_line
        _copy_once(con, invalid, invalid_params, invalid_path)

    def lookup_query(self, con: duckdb.DuckDBPyConnection, feed, mappings: dict,
                     folder: Path) -> tuple[str, dict, int]:
        """A query of (identifier_type, identifier, user_id, eligible), one row per normalized identifier value
        and type, plus how many registry values failed to normalize (kept out of it).

        ``mappings`` maps each identifier type to an IdentifierMapping: a registry column, optionally hashed
        (hex of the normalized, lower-cased value: customers with only e-mails in their registry still
        resolve hashed e-mails).
        """
        parts, params, invalid = [], {}, 0
        for i, lookup in enumerate(self.lookups(con, feed, mappings, folder)):
            params[f"users_type_{i}"] = lookup.identifier_type
            params[f"users_lookup_{i}"] = str(lookup.path)
            parts.append(f"""SELECT $users_type_{i}::VARCHAR AS identifier_type, identifier, user_id, eligible
                             FROM read_parquet($users_lookup_{i})""")
            invalid += lookup.invalid
        return " UNION ALL ".join(parts), params, invalid

    def check(self, con: duckdb.DuckDBPyConnection, feeds: dict, folder: Path) -> list[RegistryProblem]:
        """Registry values that fail to normalize, per feed and column, with a few examples (``registry check``).
        ``feeds`` maps each feed name to (FeedConfig, its identifier mappings)."""
        problems = []
        for name, (feed, mappings) in sorted(feeds.items()):
            for lookup in self.lookups(con, feed, mappings, folder):
                if not lookup.invalid:
                    continue
                examples = con.execute("SELECT line, value, problem FROM read_parquet(?) ORDER BY line LIMIT ?",
                                       [str(lookup.invalid_path), EXAMPLES]).fetchall()
                problems.append(RegistryProblem(name, lookup.column, identifier_kind(feed), lookup.invalid,
                                                tuple(examples)))
        return problems


def drop_lookups(folder: Path) -> int:
    """Delete the lookups built under ``folder``; how many files. They copy registry values and user ids into
    the lake, so forget-user drops them; the next import rebuilds them from the registry as it then is."""
    dropped = 0
    for path in folder.glob("registry_*.parquet"):
        path.unlink(missing_ok=True)
        dropped += 1
    return dropped


def _copy_once(con: duckdb.DuckDBPyConnection, query: str, params: dict, dest: Path) -> None:
    """Write ``dest`` unless it exists: under a name unique to this process and thread, then linked into place
    without replacing. Imports of several processes may build one lookup at once, and a file replaced under a
    reader reads as corrupt (DuckDB opens it at bind and again at scan); both builds hold the same rows."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        con.execute(f"COPY ({query}) TO {quote_literal(tmp)} (FORMAT parquet, COMPRESSION zstd)", params)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
