-- The schema of idem's Postgres store (`PostgresStore`), for teams that run their own migrations.
--
-- `PostgresStore::migrate` runs exactly this, under an advisory lock, with the names below replaced
-- by the configured table's: "idem_records" (the table, schema-qualified if configured),
-- "idem_records_expires_at" (its expiry index), "idem_records_leases" (the renewed leases, in the
-- table's schema) and "idem_records_claim" (the claim function, in the table's schema). Run it
-- again after upgrading idem: every statement is idempotent.
--
-- The table's comment holds its schema version ('idem schema <n>'), set by the last statement
-- below: `PostgresStore::migrate` and `PostgresStore::verify_schema` refuse a table whose version
-- is older than the one this build needs, or that lacks a column, the unique key or the claim
-- function or the lease table (version 2 added the lease table, version 3 the column
-- `fingerprint_encoding` and the claim function's five-argument form, version 4 the journal of
-- steps in <table>_steps, created by schema_steps.sql, which runs after this file). Migration
-- steps only add (a column with a default, a function), so a build accepts a table of a newer
-- version, and instances of the previous release keep working during a
-- rolling upgrade. A step added to this file bumps `wanted` in the last statement (and
-- `EXPECTED.version` in sql.rs: a unit test checks that they agree).

-- One row per record, addressed by the SHA-256 digest of (scope, key).
CREATE TABLE IF NOT EXISTS "idem_records" (
    -- The record's address: the 32-byte (scope, key) digest.
    key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),
    -- The SHA-256 fingerprint of the request that created the record.
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- 'pending' while a request runs the handler, 'completed' once its response is stored.
    state       text        NOT NULL CHECK (state IN ('pending', 'completed')),
    -- The lease holder's 16-byte owner token while pending; NULL once completed.
    owner       bytea       CHECK (octet_length(owner) = 16),
    -- The end of the lease while pending, of the ttl once completed. Compared with now() only.
    expires_at  timestamptz NOT NULL,
    -- The completed record in idem's versioned binary encoding (status, headers, body); NULL
    -- while pending.
    response    bytea,
    -- The id of the encoding that computed `fingerprint`; NULL for 2 (raw/v2, the only one
    -- before the column existed).
    fingerprint_encoding smallint,
    CHECK (CASE state
             WHEN 'pending' THEN owner IS NOT NULL AND response IS NULL
             ELSE owner IS NULL AND response IS NOT NULL
           END)
);

-- A table created before `fingerprint_encoding` existed gets it (its rows are all in encoding 2,
-- NULL). Looked up first: `ALTER TABLE` would lock the table even when the column exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = '"idem_records"'::regclass
                      AND attname = 'fingerprint_encoding' AND NOT attisdropped) THEN
        ALTER TABLE "idem_records" ADD COLUMN fingerprint_encoding smallint;
    END IF;
END
$$;

-- The sweep deletes expired rows oldest first, in batches.
CREATE INDEX IF NOT EXISTS "idem_records_expires_at" ON "idem_records" (expires_at);

-- Step 2: the renewed leases of pending records, apart from the records.
--
-- A lease renewal writes here and never the record's row, so a handler's transaction that
-- completes the record (the transactional mode) does not meet a concurrent update of that row
-- under REPEATABLE READ or SERIALIZABLE. A pending record's deadline is the later of its
-- `expires_at` and its lease's here, when the lease names the record's owner; a row of an owner
-- that no longer holds the record is ignored, and deleted by the sweep once expired.
CREATE TABLE IF NOT EXISTS "idem_records_leases" (
    -- The record's address.
    key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),
    -- The owner token of the request that renewed the lease.
    owner       bytea       NOT NULL CHECK (octet_length(owner) = 16),
    -- The end of the renewed lease. Compared with now() only.
    expires_at  timestamptz NOT NULL
);

-- Claims the record `p_key` for the request (`p_fingerprint` in encoding `p_encoding`, `p_owner`)
-- with a lease of `p_lease_ms`, in one call. Answers `o_acquired = true` when the request now owns
-- the record (there was none, it had expired, or it is this owner's own pending record: a retried
-- claim); otherwise the live record it found, with the milliseconds left before it expires.
--
-- Each statement below runs on a fresh snapshot (READ COMMITTED), so a row that a concurrent
-- transaction committed while this one waited on it (the INSERT waits for a concurrent insert of
-- the same key; the UPDATE for a concurrent take-over) is seen by the next statement. When the row
-- changed between two statements (created, taken over or deleted by another transaction), the loop
-- starts again; it ends as soon as nothing else touches the key for the length of one pass.
CREATE OR REPLACE FUNCTION "idem_records_claim"(
    p_key bytea,
    p_fingerprint bytea,
    p_owner bytea,
    p_lease_ms bigint,
    p_encoding smallint,
    OUT o_acquired boolean,
    OUT o_state text,
    OUT o_fingerprint bytea,
    OUT o_owner bytea,
    OUT o_response bytea,
    OUT o_remaining_ms bigint,
    OUT o_encoding smallint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    attempt integer := 0;
BEGIN
    LOOP
        attempt := attempt + 1;
        -- 1. A live record: answer from it, writing nothing (a replay or a duplicate). A pending
        -- record lives until the later of its own deadline and its owner's renewed lease.
        SELECT r.state, r.fingerprint, r.owner, r.response,
               ceil(extract(epoch FROM greatest(r.expires_at, l.expires_at) - now()) * 1000)::bigint,
               r.fingerprint_encoding
          INTO o_state, o_fingerprint, o_owner, o_response, o_remaining_ms, o_encoding
          FROM "idem_records" r
          LEFT JOIN "idem_records_leases" l ON l.key = r.key AND l.owner = r.owner
         WHERE r.key = p_key AND greatest(r.expires_at, l.expires_at) > now();
        IF FOUND THEN
            IF NOT (o_state = 'pending' AND o_owner = p_owner AND o_fingerprint = p_fingerprint) THEN
                o_acquired := false;
                RETURN;
            END IF;
            -- This owner's own pending record (its earlier claim's answer was lost): renew it below.
        ELSE
            -- 2. No record: create it. Waits for a concurrent insert of the same key to finish.
            INSERT INTO "idem_records" (key, fingerprint, state, owner, expires_at,
                                        fingerprint_encoding)
            VALUES (p_key, p_fingerprint, 'pending', p_owner,
                    now() + p_lease_ms * interval '1 millisecond', p_encoding)
            ON CONFLICT (key) DO NOTHING;
            IF FOUND THEN
                o_acquired := true;
                RETURN;
            END IF;
        END IF;
        -- 3. An expired record (a dead owner's lease, a record past its ttl), or this owner's own
        -- pending one: take it over. The condition is checked again on the newest row version
        -- after waiting for a concurrent writer, so two take-overs cannot both succeed.
        UPDATE "idem_records" r
           SET fingerprint = p_fingerprint,
               fingerprint_encoding = p_encoding,
               state = 'pending',
               owner = p_owner,
               response = NULL,
               expires_at = now() + p_lease_ms * interval '1 millisecond'
         WHERE r.key = p_key
           AND (greatest(r.expires_at,
                         (SELECT l.expires_at FROM "idem_records_leases" l
                           WHERE l.key = r.key AND l.owner = r.owner)) <= now()
                OR (r.state = 'pending' AND r.owner = p_owner AND r.fingerprint = p_fingerprint));
        IF FOUND THEN
            o_acquired := true;
            o_state := NULL;
            o_fingerprint := NULL;
            o_owner := NULL;
            o_response := NULL;
            o_remaining_ms := NULL;
            o_encoding := NULL;
            RETURN;
        END IF;
        -- Another transaction created, took over or deleted the record in between: look again.
        IF attempt >= 64 THEN
            RAISE EXCEPTION 'idem: claim gave up after % attempts on a contended key', attempt
                USING ERRCODE = '40001';
        END IF;
    END LOOP;
END
$$;

-- The claim of the previous release (no encoding: its fingerprints are all in encoding 2, NULL),
-- kept so that its instances keep claiming, with the same answers, while a rolling upgrade runs.
CREATE OR REPLACE FUNCTION "idem_records_claim"(
    p_key bytea,
    p_fingerprint bytea,
    p_owner bytea,
    p_lease_ms bigint,
    OUT o_acquired boolean,
    OUT o_state text,
    OUT o_fingerprint bytea,
    OUT o_owner bytea,
    OUT o_response bytea,
    OUT o_remaining_ms bigint
) LANGUAGE sql VOLATILE AS $$
    SELECT c.o_acquired, c.o_state, c.o_fingerprint, c.o_owner, c.o_response, c.o_remaining_ms
      FROM "idem_records_claim"(p_key, p_fingerprint, p_owner, p_lease_ms, NULL::smallint) c
$$;

-- The schema version, in the table's comment; never lowered (a newer release's table keeps its).
DO $$
DECLARE
    wanted constant integer := 4;
    found_version integer := coalesce(
        substring(obj_description('"idem_records"'::regclass, 'pg_class')
                  FROM '^idem schema ([0-9]+)$')::integer,
        0);
BEGIN
    IF found_version < wanted THEN
        EXECUTE format('COMMENT ON TABLE %s IS %L', '"idem_records"'::regclass,
                       'idem schema ' || wanted);
    END IF;
END
$$;
