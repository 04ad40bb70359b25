-- The journal of steps of idem's Postgres store (`Steps`), beside the records table: its own
-- migration step, after schema.sql. `PostgresStore::migrate` runs it with "idem_records_steps"
-- (the table, schema-qualified if configured) and "idem_records_steps_expires_at" (its index)
-- renamed after the configured table. Every statement is idempotent.
--
-- A request's steps outlive its record's lease and its release (so a retry resumes), hence a
-- table of their own rather than a column of the record. Each row is one step; the rows of one
-- record address belong to the request with their fingerprint (a request with another one never
-- reads them, and its first step deletes them). A journal expires a ttl after its last write.
CREATE TABLE IF NOT EXISTS "idem_records_steps" (
    -- The record's address: the 32-byte (scope, key) digest.
    key         bytea       NOT NULL CHECK (octet_length(key) = 32),
    -- The fingerprint of the request whose step this is.
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- The step's name.
    name        text        NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 128),
    -- The step's outcome in idem's versioned encoding (a version byte, a kind byte, JSON).
    entry       bytea       NOT NULL,
    -- The end of the journal's ttl. Compared with now() only.
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (key, name)
);

-- The sweep deletes expired steps oldest first, in batches.
CREATE INDEX IF NOT EXISTS "idem_records_steps_expires_at" ON "idem_records_steps" (expires_at);
