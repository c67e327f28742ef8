"""The optional users registry: which users exist, and which identifiers (email, phone, ...) are theirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from audience_pipeline.hashing import sha256_file
from audience_pipeline.sql import quote_identifier


class RegistryError(ValueError):
    pass


@dataclass(frozen=True)
class UsersRegistry:
    path: Path
    user_id_column: str

    def reader_sql(self) -> str:
        if self.path.suffix.lower() == ".parquet":
            return "read_parquet($users_path)"
        return "read_csv($users_path, header = true, all_varchar = true, auto_detect = true)"

    def sha256(self) -> str:
        return sha256_file(self.path)

    def lookup_query(self, con: duckdb.DuckDBPyConnection, mappings: dict) -> tuple[str, dict]:
        """A query of (identifier_type, identifier, user_id), one row per identifier value and type.

        ``mappings`` maps each identifier type to an IdentifierMapping: a registry column, optionally
        hashed (hex of the trimmed, lower-cased value: customers with only e-mails in their registry still
        resolve hashed e-mails). If two users share a value, the smallest user_id wins, so resolution is
        deterministic.
        """
        if not self.path.is_file():
            raise RegistryError(f"users registry {self.path} not found")
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {self.reader_sql()}",
                                                 {"users_path": str(self.path)}).fetchall()]
        needed = {self.user_id_column} | {m.column for m in mappings.values()}
        for column in sorted(needed):
            if column not in columns:
                raise RegistryError(
                    f"users registry {self.path} has no column {column!r} (columns: {', '.join(columns)})"
                )
        uid = quote_identifier(self.user_id_column)
        parts, params = [], {"users_path": str(self.path)}
        for i, (identifier_type, mapping) in enumerate(sorted(mappings.items())):
            value = f"trim({quote_identifier(mapping.column)}::VARCHAR)"
            if mapping.hash:
                value = f"{HASHES[mapping.hash]}(lower({value}))"
            params[f"users_type_{i}"] = identifier_type
            parts.append(f"""
                SELECT $users_type_{i}::VARCHAR AS identifier_type, {value} AS identifier,
                       min(trim({uid}::VARCHAR)) AS user_id
                FROM {self.reader_sql()}
                WHERE {quote_identifier(mapping.column)} IS NOT NULL AND {uid} IS NOT NULL
                GROUP BY 1, 2""")
        return " UNION ALL ".join(parts), params


HASHES = {"sha256": "sha256", "md5": "md5"}
