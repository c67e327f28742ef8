"""The canonical model every vendor format parses into, and the pandera contract on its table.

A parsed file is a table of canonical rows plus the semantics of the file as a whole:
``replace`` (the file is the complete list of every audience it names) or ``incremental``
(apply its adds and removes in line order).
"""

from __future__ import annotations

from enum import StrEnum

import pandera.polars as pa
import polars as pl


class Semantics(StrEnum):
    REPLACE = "replace"
    INCREMENTAL = "incremental"


class Action(StrEnum):
    ADD = "add"
    REMOVE = "remove"


class ImportStatus(StrEnum):
    RECEIVED = "received"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    HELD = "held"  # over the removal gate: nothing applied until approved or rejected
    WAITING = "waiting"  # an incremental import queued behind a held import of the same audience
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    DRY_RUN = "dry_run"
    # the process working on it died (storage.liveness); a run of the same delivery takes it over
    ABANDONED = "abandoned"


# A run ends when its import reaches one of these; held and waiting imports move on by approval.
TERMINAL_STATUSES = tuple(s for s in ImportStatus if s not in (ImportStatus.RECEIVED, ImportStatus.ABANDONED))
# Imports whose files retention must keep: they may still be applied.
PENDING_STATUSES = (ImportStatus.RECEIVED, ImportStatus.HELD, ImportStatus.WAITING, ImportStatus.ABANDONED)

# Reasons a row is rejected; they appear verbatim in the rejected_rows view.
REJECT_BLANK = "blank_line"
REJECT_CONTROL = "control_character"
REJECT_ENCODING = "invalid_utf8"
REJECT_SEPARATOR = "separator"
REJECT_TOO_LONG = "too_long"
REJECT_TOO_SHORT = "too_short"
REJECT_PATTERN = "pattern_mismatch"
REJECT_UNMATCHED = "unmatched"
# the user resolved, but the registry says the feed may not reach them (the feed's eligible:)
REJECT_INELIGIBLE = "ineligible"
# two identifiers of one line resolve to different users
REJECT_IDENTIFIER_CONFLICT = "identifier_conflict"
# a feed with identifier_kind phone (email): the identifier is no phone number (e-mail address)
REJECT_INVALID_PHONE = "invalid_phone"
REJECT_INVALID_EMAIL = "invalid_email"

# Reasons that do not count toward a feed's max_reject_ratio: a blank line carries no identifier, and an
# unregistered user is an expected part of the vendor contract (Repro: "will not be counted"); so is a user
# who opted out (Attentive ignores numbers that are not "an active and opted-in subscriber").
NOT_COUNTED_REJECTS = (REJECT_BLANK, REJECT_UNMATCHED, REJECT_INELIGIBLE)


class CanonicalRows(pa.DataFrameModel):
    """Contract of the validated file: one row per accepted membership command."""

    audience_key: str = pa.Field(nullable=False)
    identifier_type: str = pa.Field(nullable=False)
    identifier: str = pa.Field(nullable=False)
    user_id: str = pa.Field(nullable=False)
    action: str = pa.Field(nullable=False, isin=[a.value for a in Action])
    expires_at: pl.Datetime(time_zone="UTC") = pa.Field(nullable=True)  # type: ignore[valid-type]
    expires_in: pl.Int64 = pa.Field(nullable=True, gt=0)  # seconds from the import's instant (mediarithmics)
    data_bag: str = pa.Field(nullable=True)
    observed_at: pl.Datetime(time_zone="UTC") = pa.Field(nullable=True)  # type: ignore[valid-type]
    warning: str = pa.Field(nullable=True)
    source_line: pl.Int64 = pa.Field(nullable=False, ge=1)

    class Config:
        strict = True


def check_canonical_contract(path) -> None:
    """Validate the schema of a canonical Parquet file without loading its rows.

    pandera on a LazyFrame checks column names, types and nullability declarations only; the row-level
    rules are enforced by the SQL that produced the file (row checks in pandera cost 10-11 s per 16M rows).
    """
    CanonicalRows.validate(pl.scan_parquet(path))
