"""Named SQL statements of the catalog, in the SQL that DuckDB and PostgreSQL share. Values are bound with
``?``; list parameters are cast to their array type, which both read the same way."""

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS import_ids START 1;
CREATE SEQUENCE IF NOT EXISTS audience_ids START 1;
CREATE SEQUENCE IF NOT EXISTS snapshot_seq START 1;
CREATE TABLE IF NOT EXISTS imports (
    import_id      BIGINT PRIMARY KEY,
    partition_key  VARCHAR NOT NULL,
    delivery       VARCHAR NOT NULL,
    feed           VARCHAR NOT NULL,
    source_uri     VARCHAR,
    file_name      VARCHAR,
    sha256         VARCHAR,
    size_bytes     BIGINT,
    semantics      VARCHAR,
    status         VARCHAR NOT NULL,
    rows_total     BIGINT,
    rows_valid     BIGINT,
    rows_rejected  BIGINT,
    duplicates     BIGINT,
    unmatched      BIGINT,
    qualified      BIGINT,
    disqualified   BIGINT,
    members        BIGINT,
    noops          BIGINT,
    warnings       BIGINT,
    audiences      VARCHAR[],
    error          VARCHAR,
    users_sha256   VARCHAR,
    run_id         VARCHAR,
    received_at    TIMESTAMPTZ NOT NULL,
    finished_at    TIMESTAMPTZ,
    UNIQUE (partition_key, delivery)
);
-- A name is unique among a feed's live audiences only: a deleted audience keeps its history under its id,
-- and (where the feed reuses deleted names) a new audience of its name gets a new id.
CREATE TABLE IF NOT EXISTS audiences (
    audience_id  BIGINT PRIMARY KEY,
    feed         VARCHAR NOT NULL,
    name         VARCHAR NOT NULL,
    status       VARCHAR NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS audience_versions (
    audience_id    BIGINT NOT NULL,
    version        BIGINT NOT NULL,
    import_id      BIGINT NOT NULL,
    sha256         VARCHAR NOT NULL,
    users_sha256   VARCHAR,
    member_count   BIGINT NOT NULL,
    qualified      BIGINT NOT NULL,
    disqualified   BIGINT NOT NULL,
    valid_from     TIMESTAMPTZ NOT NULL,
    valid_to       TIMESTAMPTZ,
    list_time      TIMESTAMPTZ,
    next_expiry    TIMESTAMPTZ,
    files_deleted  BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (audience_id, version)
);
CREATE TABLE IF NOT EXISTS poll_cursors (feed VARCHAR PRIMARY KEY, cursor VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS audience_locks (
    audience_id  BIGINT PRIMARY KEY,
    import_id    BIGINT NOT NULL,
    acquired_at  TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS notifications (key VARCHAR PRIMARY KEY, sent_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS erasures (
    erased_at TIMESTAMPTZ NOT NULL, user_sha256 VARCHAR NOT NULL, imports BIGINT[], files_rewritten BIGINT
);
-- Per feed, each opt-out sweep (audience_pipeline.eligibility): the registry version it applied, the import that
-- disqualified the members it found ineligible (none when it found none), and its watermark (imports finished
-- after it, validated against another registry version, call for another sweep).
CREATE TABLE IF NOT EXISTS eligibility_sweeps (
    feed          VARCHAR NOT NULL,
    sweep         BIGINT NOT NULL,
    users_sha256  VARCHAR NOT NULL,
    import_id     BIGINT,
    watermark     TIMESTAMPTZ NOT NULL,
    swept_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (feed, sweep)
);
ALTER TABLE imports ADD COLUMN IF NOT EXISTS holder VARCHAR;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS alive_at TIMESTAMPTZ;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS applied_at TIMESTAMPTZ;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS profile VARCHAR;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS ineligible BIGINT;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS resolved_by VARCHAR;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS dirty BOOLEAN DEFAULT true;
ALTER TABLE audiences ADD COLUMN IF NOT EXISTS dirty BOOLEAN DEFAULT true;
ALTER TABLE audience_versions ADD COLUMN IF NOT EXISTS dirty BOOLEAN DEFAULT true;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS in_delta BOOLEAN DEFAULT false;
ALTER TABLE audiences ADD COLUMN IF NOT EXISTS in_delta BOOLEAN DEFAULT false;
ALTER TABLE audience_versions ADD COLUMN IF NOT EXISTS in_delta BOOLEAN DEFAULT false;
CREATE TABLE IF NOT EXISTS publication (base_seq BIGINT NOT NULL);
ALTER TABLE publication ADD COLUMN IF NOT EXISTS chunks_upto BIGINT DEFAULT 0;
INSERT INTO publication SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM publication);
"""
# The ALTERs are the migration of catalogs made before liveness (0.1.0), before the eligibility counts
# (ineligible; resolved_by, the rows each identifier type resolved, as JSON text) and before incremental
# publishing (dirty: the row changed since the last export, in_delta: since the newest base; an existing row
# starts dirty, so the first export after the upgrade publishes the whole catalog). A new catalog gets its
# columns the same way, so that old and new catalogs have the same column order. Every statement below that
# changes a column analysts see sets dirty = true (storage.publishing; test_publishing checks the statements).

GET_CURSOR = "SELECT cursor FROM poll_cursors WHERE feed = ?"
SET_CURSOR = "INSERT INTO poll_cursors VALUES (?, ?) ON CONFLICT (feed) DO UPDATE SET cursor = excluded.cursor"

FIND_IMPORT = "SELECT * FROM imports WHERE partition_key = ? AND delivery = ?"
LATEST_IMPORT_OF_PARTITION = "SELECT * FROM imports WHERE partition_key = ? ORDER BY import_id DESC LIMIT 1"
GET_IMPORT = "SELECT * FROM imports WHERE import_id = ?"

INSERT_IMPORT = """
INSERT INTO imports (import_id, partition_key, delivery, feed, source_uri, file_name, sha256, size_bytes,
                     semantics, status, run_id, received_at, holder, alive_at, profile)
VALUES (nextval('import_ids'), ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?)
ON CONFLICT (partition_key, delivery) DO NOTHING
RETURNING import_id
"""

# A run of the delivery takes over its import: an abandoned one, or one whose holder it found dead.
TAKE_OVER = """
UPDATE imports SET status = 'received', error = NULL, finished_at = NULL, run_id = ?, holder = ?, alive_at = ?,
       dirty = true
WHERE import_id = ? AND status IN ('received', 'abandoned')
"""
# Only while it still has the holder that was found dead: a run that took it over in between keeps it.
MARK_ABANDONED = """
UPDATE imports SET status = 'abandoned', error = ?, finished_at = ?, dirty = true
WHERE import_id = ? AND status = 'received' AND holder IS NOT DISTINCT FROM ?
"""
IN_PROGRESS_OF_FEED = """
SELECT import_id, partition_key, delivery, holder, alive_at, received_at FROM imports
WHERE feed = ? AND status = 'received' ORDER BY import_id
"""
ABANDONED_OF_FEED = "SELECT * FROM imports WHERE feed = ? AND status = 'abandoned' ORDER BY import_id"
OWN_STATUS = "SELECT status FROM imports WHERE import_id = ?"

FINISH_IMPORT = """
UPDATE imports SET status = ?, error = ?, rows_total = ?, rows_valid = ?, rows_rejected = ?, duplicates = ?,
       unmatched = ?, qualified = ?, disqualified = ?, members = ?, noops = ?, warnings = ?,
       audiences = CAST(? AS VARCHAR[]), users_sha256 = ?, ineligible = ?, resolved_by = ?, finished_at = ?,
       dirty = true
WHERE import_id = ? AND status IN ('received', 'held', 'waiting')
"""

# The live audience of the name, else the newest deleted one.
FIND_AUDIENCE = """
SELECT audience_id, status FROM audiences WHERE feed = ? AND name = ?
ORDER BY status = 'active' DESC, audience_id DESC LIMIT 1
"""
INSERT_AUDIENCE = """
INSERT INTO audiences (audience_id, feed, name, status, created_at)
SELECT nextval('audience_ids'), ?, ?, 'active', ?
WHERE NOT EXISTS (SELECT 1 FROM audiences WHERE feed = ? AND name = ? AND status = 'active')
"""

CURRENT_VERSIONS = """
SELECT audience_id, version, sha256, users_sha256, list_time, member_count FROM audience_versions
WHERE valid_to IS NULL AND audience_id = ANY(CAST(? AS BIGINT[]))
"""

# Audiences a file with this name, content and profile was applied to before, and whether each still holds
# it. The profile is part of the key: the same content read as a removal (another profile) is another list,
# and after that removal the add's content is no longer what the audience holds.
SKIP_CANDIDATES = """
WITH earlier AS (
    SELECT DISTINCT v.audience_id
    FROM audience_versions v JOIN imports i ON i.import_id = v.import_id
    WHERE i.feed = ? AND i.file_name = ? AND v.sha256 = ? AND i.profile IS NOT DISTINCT FROM ?
)
SELECT e.audience_id,
       c.sha256 = ? AND c.users_sha256 IS NOT DISTINCT FROM ? AND ci.profile IS NOT DISTINCT FROM ? AS holds,
       c.member_count
FROM earlier e LEFT JOIN audience_versions c ON c.audience_id = e.audience_id AND c.valid_to IS NULL
LEFT JOIN imports ci ON ci.import_id = c.import_id
"""

CLOSE_VERSION = "UPDATE audience_versions SET valid_to = ?, dirty = true WHERE audience_id = ? AND valid_to IS NULL"
INSERT_VERSION = """
INSERT INTO audience_versions (audience_id, version, import_id, sha256, users_sha256, member_count, qualified,
                               disqualified, valid_from, list_time, next_expiry)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

EXPIRED_VERSIONS = """
SELECT audience_id, version FROM audience_versions
WHERE valid_to IS NOT NULL AND valid_to < ? AND NOT files_deleted
"""
MARK_VERSION_DELETED = "UPDATE audience_versions SET files_deleted = true WHERE audience_id = ? AND version = ?"

# Publishing (storage.publishing): the tables whose rows analysts see, and on PostgreSQL the marked rows with
# the version of each that an export read, and the clearing of the marks of rows still at that version.
PUBLISHED_TABLES = ("imports", "audiences", "audience_versions")
MARKED_KEYS = {"imports": ("import_id",), "audiences": ("audience_id",),
               "audience_versions": ("audience_id", "version")}
_CLEAR_MARKS = """
UPDATE {table} AS t SET dirty = false, in_delta = ?
FROM (SELECT {r_keys} FROM {table} r
      JOIN unnest({arrays}, CAST(? AS TEXT[])) AS k({keys}, row_version)
        ON {r_match} AND r.xmin::text = k.row_version
      FOR UPDATE OF r SKIP LOCKED) AS s
WHERE {t_match}"""
MARKED_ROW_VERSIONS = {table: f"SELECT dirty, {', '.join(keys)}, xmin::text FROM {table} WHERE dirty OR in_delta"
                       for table, keys in MARKED_KEYS.items()}
CLEAR_MARKS = {
    table: _CLEAR_MARKS.format(table=table, keys=", ".join(keys), r_keys=", ".join(f"r.{k}" for k in keys),
                               arrays=", ".join("CAST(? AS BIGINT[])" for _ in keys),
                               r_match=" AND ".join(f"r.{k} = k.{k}" for k in keys),
                               t_match=" AND ".join(f"t.{k} = s.{k}" for k in keys))
    for table, keys in MARKED_KEYS.items()
}

# Retention: what may go. Never the raw file or partition of a current version, nor an unfinished import.
RAW_EXPIRED = """
SELECT sha256 FROM imports WHERE sha256 IS NOT NULL
GROUP BY sha256
HAVING bool_and(status NOT IN ('received', 'held', 'waiting', 'abandoned'))
   AND max(coalesce(finished_at, received_at)) < ?
   AND sha256 NOT IN (SELECT sha256 FROM audience_versions WHERE valid_to IS NULL)
"""
VALIDATED_EXPIRED = """
SELECT import_id FROM imports
WHERE status NOT IN ('received', 'held', 'waiting', 'abandoned') AND finished_at < ?
  AND import_id NOT IN (SELECT import_id FROM audience_versions WHERE valid_to IS NULL)
"""
PARTITIONS_EXPIRED = """
SELECT partition_key FROM imports
GROUP BY partition_key
HAVING bool_and(status NOT IN ('received', 'held', 'waiting', 'abandoned'))
   AND max(coalesce(finished_at, received_at)) < ?
   AND partition_key NOT IN (SELECT i.partition_key FROM audience_versions v JOIN imports i USING (import_id)
                             WHERE v.valid_to IS NULL)
"""

# Audiences whose current list holds a membership that has expired by the given instant, with their feed.
EXPIRY_DUE = """
SELECT v.audience_id, a.feed, a.name FROM audience_versions v JOIN audiences a USING (audience_id)
WHERE v.valid_to IS NULL AND v.next_expiry <= ? ORDER BY a.feed, v.audience_id
"""

AUDIENCE_STATUS = "SELECT name, status FROM audiences WHERE audience_id = ANY(CAST(? AS BIGINT[]))"

ACTIVE_AUDIENCES = """
SELECT count(*) FROM audiences a
WHERE a.feed = ? AND a.status = 'active'
  AND EXISTS (SELECT 1 FROM audience_versions v WHERE v.audience_id = a.audience_id AND v.valid_to IS NULL)
"""
MARK_DELETED = "UPDATE audiences SET status = 'deleted', dirty = true WHERE audience_id = ANY(CAST(? AS BIGINT[]))"

# Held and waiting imports that name any of these audiences (audience names are kept on each import).
PENDING_FOR_AUDIENCES = """
SELECT import_id, status FROM imports
WHERE feed = ? AND status IN ('held', 'waiting') AND import_id <> ?
  AND audiences && CAST(? AS VARCHAR[])
ORDER BY import_id
"""
SET_PENDING = """
UPDATE imports SET status = ?, error = ?, qualified = ?, disqualified = ?, members = ?,
       audiences = CAST(? AS VARCHAR[]),
       rows_total = ?, rows_valid = ?, rows_rejected = ?, duplicates = ?, unmatched = ?, users_sha256 = ?,
       ineligible = ?, resolved_by = ?, finished_at = ?, applied_at = NULL, dirty = true
WHERE import_id = ? AND status IN ('received', 'held', 'waiting')
"""

SET_STATUS = """
UPDATE imports SET status = ?, error = ?, finished_at = ?, dirty = true
WHERE import_id = ? AND status IN ('held', 'waiting')
"""

CLAIM_NOTIFICATION = "INSERT INTO notifications VALUES (?, now()) ON CONFLICT DO NOTHING RETURNING key"
RELEASE_NOTIFICATION = "DELETE FROM notifications WHERE key = ?"
LAST_DELIVERY = "SELECT max(received_at) FROM imports WHERE feed = ? AND source_uri LIKE '%://%'"

RECORD_ERASURE = "INSERT INTO erasures VALUES (now(), ?, CAST(? AS BIGINT[]), ?)"

# Opt-out sweeps (audience_pipeline.eligibility). The current, non-empty lists of a feed's live audiences:
FEED_CURRENT_VERSIONS = """
SELECT v.audience_id, a.name, v.version, v.list_time FROM audience_versions v JOIN audiences a USING (audience_id)
WHERE a.feed = ? AND a.status = 'active' AND v.valid_to IS NULL AND v.member_count > 0 ORDER BY v.audience_id
"""
LAST_SWEEP = """
SELECT sweep, users_sha256, watermark, import_id FROM eligibility_sweeps WHERE feed = ? ORDER BY sweep DESC LIMIT 1
"""
RECORD_SWEEP = "INSERT INTO eligibility_sweeps VALUES (?, ?, ?, ?, ?, now()) ON CONFLICT DO NOTHING"
# File imports that added members after a sweep's watermark, validated against another registry version: an
# import validated before the registry changed and committed after the sweep may have re-added an opted-out user.
# With the first parameter true, any registry version: a list unioned with other parts' rows (Attentive) re-adds
# those parts' members as validated when they arrived.
STALE_SINCE_SWEEP = """
SELECT count(*) FROM imports
WHERE feed = ? AND status = 'succeeded' AND sha256 IS NOT NULL AND qualified > 0 AND finished_at > ?
  AND (CAST(? AS BOOLEAN) OR users_sha256 IS DISTINCT FROM ?)
"""
# Per audience an import changed: its name, members before and after, and how many it removed.
IMPORT_VERSIONS = """
SELECT a.name, v.member_count - v.qualified + v.disqualified, v.member_count, v.disqualified
FROM audience_versions v JOIN audiences a USING (audience_id) WHERE v.import_id = ? ORDER BY a.name
"""

# Per-audience commit locks: a row per audience being committed, owned by an import. A lock is as alive as
# the holder of its import (storage.liveness): a dead holder's rows are deleted by the next import that
# finds them. expires_at is unused since liveness replaced leases; it stays for catalogs made before.
LOCK_HOLDERS = """
SELECT l.audience_id, l.import_id, l.acquired_at, i.partition_key, i.delivery, i.holder, i.alive_at
FROM audience_locks l JOIN imports i ON i.import_id = l.import_id
WHERE l.audience_id = ANY(CAST(? AS BIGINT[])) AND l.import_id <> ?
ORDER BY l.audience_id
"""
# A re-run of the same import takes its own locks back.
TAKE_LOCK = """
INSERT INTO audience_locks VALUES (?, ?, ?, ?)
ON CONFLICT (audience_id) DO UPDATE SET acquired_at = excluded.acquired_at
WHERE audience_locks.import_id = excluded.import_id
"""
# Inside a commit: the import's locks, proving none was taken over after its holder was found dead.
OWN_LOCKS = """
SELECT audience_id FROM audience_locks WHERE import_id = ? AND audience_id = ANY(CAST(? AS BIGINT[]))
"""
RELEASE_LOCKS = "DELETE FROM audience_locks WHERE import_id = ?"
DROP_DEAD_LOCKS = "DELETE FROM audience_locks WHERE import_id = ? AND acquired_at <= ?"
# Earlier imports of the feed still in progress that name one of these audiences or have not named their
# audiences yet, oldest first: commits of an audience follow the order imports arrived in.
EARLIER_IN_PROGRESS = """
SELECT import_id, partition_key, delivery, holder, alive_at, received_at FROM imports
WHERE feed = ? AND import_id < ? AND status = 'received'
  AND (audiences IS NULL OR audiences && CAST(? AS VARCHAR[]))
ORDER BY import_id
"""
SET_AUDIENCES = """
UPDATE imports SET audiences = CAST(? AS VARCHAR[]), alive_at = ? WHERE import_id = ? AND status = 'received'
"""

# Succeeded imports that made a version of the audience, newest first (the parts of an Attentive list).
APPLIED_IMPORTS = """
SELECT i.* FROM audience_versions v JOIN imports i ON i.import_id = v.import_id
WHERE v.audience_id = ? AND i.status = 'succeeded' ORDER BY v.version DESC
"""

# The newest valid_from among these audiences' current versions: an import's instant is never before it.
LATEST_VALID_FROM = """
SELECT max(valid_from) FROM audience_versions
WHERE valid_to IS NULL AND audience_id = ANY(CAST(? AS BIGINT[]))
"""
APPLIED_AT = "SELECT applied_at FROM imports WHERE import_id = ?"
SET_APPLIED_AT = "UPDATE imports SET applied_at = ? WHERE import_id = ?"

# A warning about a succeeded import (an outbox file it could not write): the import stays succeeded and the
# text joins its error column, once however often the import is published again.
ADD_IMPORT_WARNING = """
UPDATE imports SET error = coalesce(error || '; ', '') || CAST(? AS VARCHAR), dirty = true
WHERE import_id = ? AND status = 'succeeded' AND (error IS NULL OR strpos(error, CAST(? AS VARCHAR)) = 0)
RETURNING import_id
"""

# Catalogs made before deleted names could be reused hold UNIQUE (feed, name) (0.1.0). PostgreSQL keeps the rule
# for live audiences as a partial index; DuckDB, which has none, relies on the one writer at a time of its file.
# On PostgreSQL, the marked rows and what an import looks up (unfinished imports, earlier files of a name,
# versions due for pruning) are found through indexes, so that a commit does not scan the history; DuckDB scans
# its columns.
POSTGRES_MIGRATION = """
ALTER TABLE audiences DROP CONSTRAINT IF EXISTS audiences_feed_name_key;
CREATE UNIQUE INDEX IF NOT EXISTS audiences_live_name ON audiences (feed, name) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS imports_dirty ON imports (import_id) WHERE dirty;
CREATE INDEX IF NOT EXISTS audiences_dirty ON audiences (audience_id) WHERE dirty;
CREATE INDEX IF NOT EXISTS audience_versions_dirty ON audience_versions (audience_id, version) WHERE dirty;
CREATE INDEX IF NOT EXISTS imports_in_delta ON imports (import_id) WHERE in_delta;
CREATE INDEX IF NOT EXISTS audiences_in_delta ON audiences (audience_id) WHERE in_delta;
CREATE INDEX IF NOT EXISTS audience_versions_in_delta ON audience_versions (audience_id, version) WHERE in_delta;
CREATE INDEX IF NOT EXISTS imports_unfinished ON imports (feed, import_id)
    WHERE status IN ('received', 'held', 'waiting', 'abandoned');
CREATE INDEX IF NOT EXISTS imports_feed_file ON imports (feed, file_name);
CREATE INDEX IF NOT EXISTS imports_feed_received ON imports (feed, received_at);
CREATE INDEX IF NOT EXISTS imports_feed_finished ON imports (feed, finished_at);
CREATE INDEX IF NOT EXISTS imports_received ON imports (received_at);
CREATE INDEX IF NOT EXISTS audience_versions_import ON audience_versions (import_id);
CREATE INDEX IF NOT EXISTS audience_versions_unpruned ON audience_versions (valid_to)
    WHERE valid_to IS NOT NULL AND NOT files_deleted;
"""
DUCKDB_NAME_CONSTRAINT = """
SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'audiences' AND constraint_type = 'UNIQUE'
"""
DUCKDB_MIGRATION = """
CREATE TABLE audiences_migrated (
    audience_id BIGINT PRIMARY KEY, feed VARCHAR NOT NULL, name VARCHAR NOT NULL, status VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
INSERT INTO audiences_migrated SELECT audience_id, feed, name, status, created_at FROM audiences;
DROP TABLE audiences;
ALTER TABLE audiences_migrated RENAME TO audiences;
"""
