"""Workspace configuration: one YAML file that names the storage locations, the users registry and the feeds.

Relative paths resolve against the folder of the YAML file, so a workspace can be moved or opened from any
working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV_VAR = "AUDIENCE_PIPELINE_CONFIG"
DEFAULT_CONFIG_NAME = "feeds.yaml"
FEED_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ConfigError(ValueError):
    """The configuration file is missing or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Options(_Strict):
    """Where the S3 API is. Credentials never go here: they come from the standard AWS chain
    (environment, shared config/profile, instance or task role)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None


class StorageConfig(_Strict):
    lake: str = "data/lake"
    # A DuckDB file (one machine), or a postgresql:// URL for a deployment on several nodes; its password
    # comes from libpq's environment (PGPASSWORD) or ~/.pgpass, never from this file.
    catalog: str = "data/catalog.duckdb"
    analytics: str = "data/analytics.duckdb"
    # Member-list versions closed longer ago than this are deleted; the activity log and events are kept.
    retention_days: float = Field(default=30.0, gt=0)
    # The retention job deletes raw files and validated rows of imports finished longer ago than this, and
    # Dagster partitions of such imports after partition_retention_days, except what current lists need.
    raw_retention_days: float = Field(default=7.0, gt=0)
    partition_retention_days: float = Field(default=30.0, gt=0)
    # How long a run waits for another run's hold on the catalog file, or on an audience it is committing.
    lock_timeout_seconds: float = Field(default=300.0, gt=0)
    # With a PostgreSQL catalog, how soon a node that stopped answering stops holding its imports and
    # audiences (its session ends). A process that dies frees them at once on either catalog.
    liveness_timeout_seconds: float = Field(default=60.0, gt=0)
    # DuckDB memory cap for the set operations of one import; DuckDB spills to disk beyond it.
    memory_limit: str = "1GB"
    # With lake: s3://bucket/prefix, runs work on a local cache of the files they need, cleaned after each
    # import down to the current member lists and then to at most cache_max_bytes.
    cache: str = "data/lake-cache"
    cache_max_bytes: int = Field(default=10 * 1024**3, ge=0)
    s3: S3Options = S3Options()
    server_side_encryption: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_lease(cls, data):
        if isinstance(data, dict) and "lock_lease_seconds" in data:
            raise ValueError(
                "lock_lease_seconds is gone: an import's locks now live as long as the process that holds "
                "them (a crash frees them at once). Remove it; storage.liveness_timeout_seconds (default 60) "
                "sets how soon a lost node of a PostgreSQL deployment lets go")
        return data

    @field_validator("catalog")
    @classmethod
    def _no_password(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")) and urlsplit(value).password is not None:
            raise ValueError("the catalog URL holds a password: set PGPASSWORD (or ~/.pgpass) instead")
        return value


class UsersConfig(_Strict):
    path: str | None = None
    user_id_column: str = "user_id"


class IdentifierRules(_Strict):
    min_length: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, ge=1)
    # Optional extra rule, a regular expression the whole identifier must match (DuckDB/RE2 syntax).
    pattern: str | None = None

    @model_validator(mode="after")
    def _lengths(self) -> IdentifierRules:
        if self.min_length > self.max_length:
            raise ValueError("min_length is greater than max_length")
        return self


class IdentifierMapping(_Strict):
    """How one identifier type resolves through the users registry: equal to ``column``, or, with
    ``hash``, equal to the hex hash of the column's normalized value (trimmed, lower-cased)."""

    column: str
    hash: Literal["sha256", "md5"] | None = None


class SftpOptions(_Strict):
    """How to reach an sftp:// source. Secrets stay in the environment: these name the variables."""

    known_hosts: str | None = None  # required: the server's host key is verified against this file
    password_env: str | None = None
    private_key_env: str | None = None  # the variable holds a key (PEM/OpenSSH text) or a key file path
    # A file is imported once its mtime is this old, or at once when its marker file exists.
    quiet_period_seconds: float = Field(default=120.0, ge=0)
    marker_suffix: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)


class GateConfig(_Strict):
    """The removal gate: an import that would remove more than ``max_removed`` members AND more than
    ``max_removed_share`` of an audience is held for approval (both: a share alone blocks tiny audiences,
    a count alone misses big ones). A full list that would empty an audience with members is always held."""

    max_removed: int | None = Field(default=None, ge=0)
    max_removed_share: float | None = Field(default=None, ge=0, le=1)

    def exceeded(self, removed: int, before: int) -> bool:
        """Whether removing ``removed`` of an audience's ``before`` members is over the gate (never without one)."""
        if self.max_removed is None and self.max_removed_share is None:
            return False
        over_count = self.max_removed is None or removed > self.max_removed
        over_share = self.max_removed_share is None or (before > 0 and removed / before > self.max_removed_share)
        return removed > 0 and over_count and over_share


DEFAULT_POLL_SECONDS = {"attentive": 86400}
# A drop folder of this name holds dry runs, so no profile may be called so.
DRY_RUN_FOLDER = "dryrun"


class LoymaxProfile(_Strict):
    """Overrides of a Loymax feed's file options for the files of one profile. Loymax's import page asks for
    the mode (and the audience), the identifier type and the action on every upload; a profile is one such
    choice, named, so one feed's adds, removals and single-audience files all update the feed's audiences.
    An option left out keeps the feed's value."""

    mode: Literal["single", "per_row"] | None = None
    audience: str | None = None
    identifier: str | None = None
    action: Literal["add", "remove", "replace"] | None = None

    @model_validator(mode="after")
    def _no_null(self) -> LoymaxProfile:
        # `audience: null` is meaningful (name the audience after the file); the others have no null value
        for name in ("mode", "identifier", "action"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null: leave it out to keep the feed's {name}")
        return self


class FeedConfig(_Strict):
    format: Literal["repro", "odp", "mediarithmics", "attentive", "loymax"]
    source: str
    # Which users-registry column the file's identifiers are looked up in; "user_id" means the IDs are user ids.
    identifier: str = "user_id"
    # Per identifier type, when a format carries several (mediarithmics): a registry column, or a mapping.
    identifiers: dict[str, str | IdentifierMapping] = {}
    # How the registry column's values (and, for feeds other than Attentive, the file's identifiers) are
    # normalized before they are compared: phone (E.164 for default_region), email (trimmed, lower-cased) or
    # plain (trimmed). Attentive feeds take their subscriber_type instead.
    identifier_kind: Literal["phone", "email", "plain"] = "plain"
    # Registry column -> the value, or list of values, that make a user eligible for this feed (compared as
    # trimmed text, case-insensitive). A resolved user who is not eligible is rejected as `ineligible`.
    eligible: dict[str, str | int | bool | list[str | int | bool]] = {}
    # ODP: the header field holding the feed's high-confidence identifier.
    id_field: str | None = None
    # A file naming a deleted audience creates a new audience of that name (a new audience_id; the deleted one
    # keeps its history), or fails. Default: false for Repro ("you will not be able to create an audience with
    # a file of the same name"), true for the others (Attentive: a segment that does not exist "will be
    # created when this file is processed").
    reuse_deleted_names: bool | None = None
    # ODP: `ts` is each row's event time, not a clock of the list, so lists apply in arrival order. Only for a
    # producer that stamps every row with the list's compute time: skip a list whose newest ts is older.
    skip_older_ts: bool = False
    # ODP: a .csv.gz may expand to no more than this many bytes (gzip bombs).
    max_decompressed_bytes: int = Field(default=4 * 1024**3, gt=0)
    # mediarithmics: ndjson or csv; auto chooses by the file suffix.
    file_type: Literal["auto", "ndjson", "csv"] = "auto"
    # mediarithmics: a CSV or Parquet file of segment_id,technical_name pairs, so that a segment named by id
    # and the same segment named by technical name are one audience (named by the technical name).
    segments: str | None = None
    # mediarithmics without a users registry: the identifier type whose values are user ids as written; the
    # other types' user ids are prefixed with their type (formats/mediarithmics.py).
    primary_identifier_type: Literal["user_account_id", "email_hash", "user_agent_id"] = "user_account_id"
    # Sensor minimum interval; default 600 s, and 24 h for Attentive (processed once a day).
    poll_interval_seconds: int | None = Field(default=None, ge=5)
    max_file_bytes: int = Field(default=500 * 1024 * 1024, gt=0)
    max_reject_ratio: float = Field(default=0.05, ge=0, le=1)
    ids: IdentifierRules = IdentifierRules()
    # Objects whose arrival time is within this many seconds of the sensor's high-water mark are compared
    # by name and version, so files landing in the same second as the last tick are never missed.
    # Default: the source's own (2 s for a local folder, 900 s for S3, where LastModified is the start of
    # an upload).
    cursor_lookback_seconds: float | None = Field(default=None, ge=0)
    max_runs_per_tick: int = Field(default=200, ge=1)
    # A download cut off or refused by an overloaded server is tried again this many times, waiting
    # retry_backoff_seconds, then twice as long, and so on; then the run fails and a later tick retries.
    download_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=1.0, ge=0)
    # Repro's "audience limits set for each project": a file that would create one more audience fails.
    max_audiences: int | None = Field(default=None, ge=1)
    gate: GateConfig = GateConfig()
    # who gets an e-mail when an import of this feed fails or is held, or the feed falls silent
    admins: list[str] = []
    # a feed that delivers nothing for this long is an incident (e-mail to the admins)
    max_silence_hours: float | None = Field(default=None, gt=0)
    s3: S3Options = S3Options()
    sftp: SftpOptions = SftpOptions()
    # Attentive: the customer domain in file names, what the identifiers are, and the phone region.
    customer_domain: str | None = None
    subscriber_type: Literal["phone", "email"] = "phone"
    default_region: str = "US"
    # Loymax: one audience for the whole file (single; named by `audience` or the file name) or an audience
    # per row (per_row); files add customers (add), take them out (remove) or are full lists (replace).
    mode: Literal["single", "per_row"] = "single"
    audience: str | None = None
    action: Literal["add", "remove", "replace"] = "add"
    # Loymax: named overrides of mode/audience/identifier/action. A file under <drop>/<profile>/ (or imported
    # with --profile) uses that profile's options; the audiences stay the feed's.
    profiles: dict[str, LoymaxProfile] = {}

    @model_validator(mode="after")
    def _format_options(self) -> FeedConfig:
        if self.format == "odp" and not self.id_field:
            raise ValueError("an odp feed needs id_field, the header field of its identifier "
                             "(e.g. a_high_confidence_identifier)")
        if self.format == "attentive" and not self.customer_domain:
            raise ValueError("an attentive feed needs customer_domain, the prefix of its file names")
        for option in ("segments", "primary_identifier_type"):
            if option in self.model_fields_set and self.format != "mediarithmics":
                raise ValueError(f"{option} is for mediarithmics feeds (segments and identifier types are theirs)")
        if self.profiles and self.format != "loymax":
            raise ValueError("profiles are for loymax feeds (the options they override are Loymax's)")
        for name in self.profiles:
            # a profile names a drop folder and is part of a delivery id (profile:<name>:...)
            if not FEED_NAME_PATTERN.match(name) or name == DRY_RUN_FOLDER:
                raise ValueError(f"profile name {name!r} must be lower-case letters, digits and '_', starting "
                                 f"with a letter, and not {DRY_RUN_FOLDER!r}")
        return self

    def for_profile(self, profile: str | None) -> FeedConfig:
        """The feed's options for a file of this profile (None: the feed's own)."""
        if profile is None:
            return self
        if profile not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(f"the feed has no profile named {profile!r} (profiles: {known})")
        return self.model_copy(update=self.profiles[profile].model_dump(exclude_unset=True))

    @property
    def reuses_deleted_names(self) -> bool:
        return self.reuse_deleted_names if self.reuse_deleted_names is not None else self.format != "repro"

    @property
    def poll_seconds(self) -> int:
        return self.poll_interval_seconds or DEFAULT_POLL_SECONDS.get(self.format, 600)

    def registry_mapping(self, identifier_type: str) -> IdentifierMapping:
        """The registry column (and hash) that identifiers of this type are looked up in."""
        mapped = self.identifiers.get(identifier_type, self.identifier)
        return mapped if isinstance(mapped, IdentifierMapping) else IdentifierMapping(column=mapped)


class SmtpConfig(_Strict):
    host: str
    port: int = 25
    starttls: bool = False
    ca_file: str | None = None  # CA bundle to verify the server's certificate with, for a private CA
    sender: str
    # the login, if the server wants one, is read from these environment variables
    username_env: str | None = None
    password_env: str | None = None
    timeout_seconds: float = 30.0


class NotificationsConfig(_Strict):
    smtp: SmtpConfig | None = None


class OutboxConfig(_Strict):
    """Downstream change files: ``changes`` (qualify/disqualify rows) or ``full_list`` (the whole list)."""

    location: str  # a folder, or s3://bucket/prefix/
    mode: Literal["changes", "full_list"]
    identifier_field: str = "user_id"  # the identifier column's name in the files (ODP: the feed's field)
    feeds: list[str] = []  # default: every feed
    s3: S3Options = S3Options()
    # Encryption of the uploaded objects, the outbox's own and never the lake's: ODP's upload example uses
    # --sse (AES256), and a KMS key of ours would leave the files unreadable to the destination.
    server_side_encryption: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None

    @model_validator(mode="after")
    def _kms_key(self) -> OutboxConfig:
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError("kms_key_id needs server_side_encryption: aws:kms")
        return self


class ApiToken(_Strict):
    """One client of ``audience-pipeline serve``: the sha256 (hex) of its token, never the token itself
    (``audience-pipeline token-hash`` prints it), and the feeds it may write."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    feeds: list[str] = Field(min_length=1)


class ApiConfig(_Strict):
    """``audience-pipeline serve``: its clients, and mediarithmics datamart ids -> the feed their imports go to."""

    tokens: dict[str, ApiToken] = {}
    datamarts: dict[str, str] = {}
    # the server's own state: document imports, uploads and the Idempotency-Keys it has seen
    database: str = "data/api.sqlite"

    @field_validator("datamarts", mode="before")
    @classmethod
    def _datamart_ids(cls, value):
        # a datamart id is a number, which YAML reads as an int key
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class WorkspaceConfig(_Strict):
    storage: StorageConfig = StorageConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    outboxes: list[OutboxConfig] = []
    users: UsersConfig = UsersConfig()
    api: ApiConfig = ApiConfig()
    feeds: dict[str, FeedConfig]

    @field_validator("feeds")
    @classmethod
    def _feed_names(cls, feeds: dict[str, FeedConfig]) -> dict[str, FeedConfig]:
        if not feeds:
            raise ValueError("at least one feed is required")
        for name in feeds:
            if not FEED_NAME_PATTERN.match(name):
                raise ValueError(
                    f"feed name {name!r} must be lower-case letters, digits and '_', starting with a letter"
                )
        return feeds

    @model_validator(mode="after")
    def _eligible_needs_registry(self) -> WorkspaceConfig:
        # without a registry nothing says who is eligible: the rule would be silently ignored
        for name, feed in self.feeds.items():
            if feed.eligible and not self.users.path:
                raise ValueError(f"feed {name!r} has eligible: but the workspace has no users registry (users.path)")
        return self

    @model_validator(mode="after")
    def _api_feeds(self) -> WorkspaceConfig:
        for name, token in self.api.tokens.items():
            for feed in token.feeds:
                if feed not in self.feeds:
                    raise ValueError(f"api.tokens.{name}: no feed named {feed!r}")
        for datamart, feed in self.api.datamarts.items():
            if feed not in self.feeds:
                raise ValueError(f"api.datamarts.{datamart}: no feed named {feed!r}")
            if self.feeds[feed].format != "mediarithmics":
                raise ValueError(f"api.datamarts.{datamart}: feed {feed!r} is {self.feeds[feed].format}, and "
                                 "datamart imports are mediarithmics segment commands")
        return self


class Workspace:
    """A loaded configuration plus the folder its relative paths resolve against."""

    def __init__(self, config: WorkspaceConfig, path: Path):
        self.path = path.resolve()
        self.root = self.path.parent
        # files a feed names (a mediarithmics segments map) resolve here once, as every workspace path does
        feeds = {name: feed.model_copy(update={"segments": str(self.resolve(feed.segments))}) if feed.segments
                 else feed for name, feed in config.feeds.items()}
        self.config = config.model_copy(update={"feeds": feeds})

    def resolve(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def lake_is_remote(self) -> bool:
        return self.config.storage.lake.startswith("s3://")

    @property
    def lake(self) -> Path:
        """The lake's local folder: the lake itself, or the local cache of an S3 lake."""
        storage = self.config.storage
        return self.resolve(storage.cache if self.lake_is_remote else storage.lake)

    @property
    def catalog(self) -> Path | str:
        """The catalog's DuckDB file, or its PostgreSQL URL as given."""
        location = self.config.storage.catalog
        if location.startswith(("postgresql://", "postgres://")):
            return location
        return self.resolve(location)

    @property
    def analytics(self) -> Path:
        return self.resolve(self.config.storage.analytics)

    @property
    def users_path(self) -> Path | None:
        return self.resolve(self.config.users.path) if self.config.users.path else None

    def feed(self, name: str) -> FeedConfig:
        try:
            return self.config.feeds[name]
        except KeyError:
            known = ", ".join(sorted(self.config.feeds))
            raise ConfigError(f"{self.path}: no feed named {name!r} (feeds: {known})") from None

    def source_location(self, feed: str) -> str:
        """The feed's source as an absolute location: a folder path, or a URI for remote sources."""
        source = self.feed(feed).source
        if "://" in source and not source.startswith("file://"):
            return source
        return str(self.resolve(source.removeprefix("file://")))


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV_VAR):
        return Path(os.environ[CONFIG_ENV_VAR])
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_workspace(explicit: str | os.PathLike | None = None) -> Workspace:
    path = config_path(explicit)
    if not path.is_file():
        raise ConfigError(
            f"configuration file {path} not found (pass --config, set {CONFIG_ENV_VAR}, "
            f"or run 'audience-pipeline init DIR')"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = WorkspaceConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    return Workspace(config, path)
