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

    def lookup_query(self, con: duckdb.DuckDBPyConnection, identifier_column: str) -> tuple[str, dict]:
        """A query of (identifier, user_id) pairs, one per identifier value.

        If two users share an identifier value, the smallest user_id wins, so resolution is deterministic.
        """
        if not self.path.is_file():
            raise RegistryError(f"users registry {self.path} not found")
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {self.reader_sql()}",
                                                 {"users_path": str(self.path)}).fetchall()]
        for needed in {self.user_id_column, identifier_column}:
            if needed not in columns:
                raise RegistryError(
                    f"users registry {self.path} has no column {needed!r} (columns: {', '.join(columns)})"
                )
        uid = quote_identifier(self.user_id_column)
        ident = quote_identifier(identifier_column)
        sql = f"""
            SELECT trim({ident}::VARCHAR) AS identifier, min(trim({uid}::VARCHAR)) AS user_id
            FROM {self.reader_sql()}
            WHERE {ident} IS NOT NULL AND {uid} IS NOT NULL
            GROUP BY 1
        """
        return sql, {"users_path": str(self.path)}
