//! The SQL of the Postgres store: the table name (checked before it is ever spliced into SQL), the
//! schema and its migration, and the statements each operation sends.

use std::{fmt, str::FromStr, time::Duration};

/// The most batches one sweep deletes before it waits for the next interval.
pub(super) const SWEEP_MAX_BATCHES: u32 = 100;
/// The longest a table or schema name may be: Postgres truncates identifiers to 63 bytes, and the
/// index and function names add a suffix to the table's.
const MAX_NAME_LEN: usize = 48;
/// The longest lease or ttl a row is given (100 years): far past any real use, and far inside
/// Postgres's `interval` range.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// The advisory lock every `migrate` takes (the bytes of "idemmigr").
pub(super) const MIGRATE_LOCK: i64 = 0x6964_656d_6d69_6772;
/// `migrate` may wait for another instance's migration: it gets at least this long.
pub(super) const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// The schema, for the default table.
const SCHEMA: &str = include_str!("schema.sql");
/// The journal of steps' table, for the default table: the migration step after [`SCHEMA`].
const STEPS_SCHEMA: &str = include_str!("schema_steps.sql");

/// What this build needs of the table, in one place: the schema version [`SCHEMA`] writes into
/// the table's comment (its last statement's `wanted`), and the columns the statements name.
/// A migration step added to [`SCHEMA`] bumps `version` (both here and there) and, when it adds
/// a column the statements use, adds one line to `columns`.
pub(super) const EXPECTED: ExpectedSchema = ExpectedSchema {
    version: 4,
    columns: &[
        ("key", "bytea"),
        ("fingerprint", "bytea"),
        ("state", "text"),
        ("owner", "bytea"),
        ("expires_at", "timestamp with time zone"),
        ("response", "bytea"),
        ("fingerprint_encoding", "smallint"),
    ],
    claim_args: "bytea,bytea,bytea,bigint,smallint",
};

/// The shape of the table and claim function a build needs (see [`EXPECTED`]).
#[derive(Debug)]
pub(super) struct ExpectedSchema {
    /// The schema version, `n` in the table comment `idem schema <n>`.
    pub(super) version: u32,
    /// Each column the statements name, with its type as `format_type` spells it.
    pub(super) columns: &'static [(&'static str, &'static str)],
    /// The claim function's argument types.
    pub(super) claim_args: &'static str,
}

/// The prefix of the table comment that holds the schema version.
pub(super) const VERSION_MARKER: &str = "idem schema ";

/// A table name that is not one or two plain identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid table name {0:?}: expected `name` or `schema.name`, each 1 to 48 characters of \
     a-z, 0-9 and _, not starting with a digit"
)]
pub struct InvalidTableName(pub String);

/// A validated `[schema.]name`, quoted wherever it is spliced into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableName {
    schema: Option<String>,
    name: String,
}

impl FromStr for TableName {
    type Err = InvalidTableName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidTableName(s.to_owned());
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= MAX_NAME_LEN
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !part.as_bytes()[0].is_ascii_digit()
        };
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, s),
        };
        if !valid(name) || schema.is_some_and(|schema| !valid(schema)) {
            return Err(err());
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }
}

impl TableName {
    /// `"schema"."name<suffix>"`, or `"name<suffix>"`.
    fn qualified(&self, suffix: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }

    /// The steps table's SQL for this table: [`STEPS_SCHEMA`] with its names replaced.
    fn steps_schema_sql(&self) -> String {
        STEPS_SCHEMA
            .replace("\"idem_records_steps\"", &self.qualified("_steps"))
            .replace(
                "\"idem_records_steps_expires_at\"",
                &format!("\"{}_steps_expires_at\"", self.name),
            )
    }

    /// The schema SQL for this table: [`SCHEMA`] with its names replaced.
    fn schema_sql(&self) -> String {
        SCHEMA
            .replace("\"idem_records\"", &self.qualified(""))
            .replace("\"idem_records_claim\"", &self.qualified("_claim"))
            .replace("\"idem_records_leases\"", &self.qualified("_leases"))
            // An index lives in its table's schema and is named without one.
            .replace(
                "\"idem_records_expires_at\"",
                &format!("\"{}_expires_at\"", self.name),
            )
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The statements, built once per store with the validated table name.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) claim: String,
    pub(super) renew: String,
    pub(super) complete: String,
    /// [`Statements::complete`] in a handler's transaction: the same fenced `UPDATE`, whose
    /// `RETURNING` also bounds the wait for the transaction's `COMMIT` on the server (`$6`, the
    /// [`commit_bound`] of the store timeout, set with `SET LOCAL`'s scope): one round trip for
    /// both. A row comes back only when the fence held.
    pub(super) complete_in_transaction: String,
    pub(super) release: String,
    pub(super) sweep: String,
    /// The journal of steps: load one request's, record one step (fenced), sweep.
    pub(super) load_steps: String,
    pub(super) record_step: String,
    pub(super) sweep_steps: String,
    pub(super) schema: String,
    /// What `migrate` runs first, in its transaction: its statement timeout and advisory lock.
    pub(super) migrate_lock: String,
    /// The catalog's view of the table, the claim function and the lease table (`$1` the table, `$2` the claim
    /// function's signature, each as `to_regclass`/`to_regprocedure` read them): whether the
    /// table exists, its comment, its columns and their types, whether `key` alone is unique,
    /// whether the claim function exists, whether the lease table (`$3`) and the steps table
    /// (`$4`) exist.
    pub(super) inspect: String,
    /// `$1` to `$4` of [`Statements::inspect`]: the table, the claim function, the lease table,
    /// the steps table.
    pub(super) inspect_args: (String, String, String, String),
}

impl Statements {
    pub(super) fn new(table: &TableName) -> Self {
        let t = table.qualified("");
        let leases = table.qualified("_leases");
        // A pending record lives until the later of its own deadline and the lease its owner
        // renewed (a lease row of another owner does not count).
        let live = format!(
            "greatest(r.expires_at, (SELECT l.expires_at FROM {leases} l \
             WHERE l.key = r.key AND l.owner = r.owner)) > now()"
        );
        let steps = table.qualified("_steps");
        // The fence of renew, complete and release: this ticket's live pending row.
        let fence = format!(
            "r.key = $1 AND r.state = 'pending' AND r.owner = $2 AND r.fingerprint = $3 AND {live}"
        );
        Self {
            claim: format!(
                "SELECT o_acquired, o_state, o_fingerprint, o_owner, o_response, o_remaining_ms, \
                 o_encoding FROM {}($1, $2, $3, $4, $5)",
                table.qualified("_claim")
            ),
            // The renewal writes the lease row, never the record's: a handler's transaction that
            // completes the record under REPEATABLE READ or SERIALIZABLE would otherwise meet a
            // concurrent update of the row it updates, and fail.
            renew: format!(
                "INSERT INTO {leases} AS n (key, owner, expires_at) \
                 SELECT r.key, r.owner, now() + $4 * interval '1 millisecond' FROM {t} r \
                 WHERE {fence} \
                 ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
            ),
            complete: format!(
                "UPDATE {t} r SET state = 'completed', owner = NULL, response = $4, \
                 expires_at = now() + $5 * interval '1 millisecond' WHERE {fence}"
            ),
            complete_in_transaction: format!(
                "UPDATE {t} r SET state = 'completed', owner = NULL, response = $4, \
                 expires_at = now() + $5 * interval '1 millisecond' WHERE {fence} \
                 RETURNING set_config('idle_in_transaction_session_timeout', $6, true)"
            ),
            release: format!("DELETE FROM {t} r WHERE {fence}"),
            // Expired leases first (any owner's: a lease outlives its record only as a leftover),
            // then the oldest expired records, skipping any a claim is taking over; the outer
            // conditions are checked again on the rows deleted.
            sweep: format!(
                "WITH leases AS (DELETE FROM {leases} WHERE key IN (SELECT key FROM {leases} \
                 WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED) AND expires_at < now()) \
                 DELETE FROM {t} r WHERE r.key IN (SELECT r.key FROM {t} r WHERE r.expires_at < now() \
                 AND NOT {live} ORDER BY r.expires_at LIMIT $1 FOR UPDATE OF r SKIP LOCKED) \
                 AND r.expires_at < now() AND NOT {live}"
            ),
            load_steps: format!(
                "SELECT name, entry FROM {steps} WHERE key = $1 AND fingerprint = $2 \
                 AND expires_at > now()"
            ),
            // One statement: `owner` locks the ticket's live pending row (FOR SHARE: a claim
            // taking it over waits, or is waited for and then the row no longer matches), and
            // every other part writes only if it is found. The parts touch disjoint rows: other
            // requests' steps and expired ones are deleted (an expired journal is never revived),
            // this request's live steps get the new expiry, and the step itself is inserted or
            // overwritten (its fingerprint with it).
            record_step: format!(
                "WITH owner AS (SELECT 1 FROM {t} r WHERE {fence} FOR SHARE), \
                 gone AS (DELETE FROM {steps} WHERE key = $1 AND name <> $4 \
                   AND (fingerprint <> $3 OR expires_at <= now()) \
                   AND EXISTS (SELECT 1 FROM owner)), \
                 kept AS (UPDATE {steps} SET expires_at = now() + $6 * interval '1 millisecond' \
                   WHERE key = $1 AND name <> $4 AND fingerprint = $3 AND expires_at > now() \
                   AND EXISTS (SELECT 1 FROM owner)) \
                 INSERT INTO {steps} (key, fingerprint, name, entry, expires_at) \
                 SELECT $1, $3, $4, $5, now() + $6 * interval '1 millisecond' FROM owner \
                 ON CONFLICT (key, name) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
                 entry = EXCLUDED.entry, expires_at = EXCLUDED.expires_at"
            ),
            sweep_steps: format!(
                "DELETE FROM {steps} WHERE ctid IN (SELECT ctid FROM {steps} \
                 WHERE expires_at < now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 AND expires_at < now()"
            ),
            schema: format!("{}\n{}", table.schema_sql(), table.steps_schema_sql()),
            migrate_lock: format!(
                "SET LOCAL statement_timeout = '{}ms';\nSELECT pg_advisory_xact_lock({MIGRATE_LOCK});",
                MIGRATE_TIMEOUT.as_millis(),
            ),
            inspect: INSPECT.to_owned(),
            inspect_args: (
                t.clone(),
                format!("{}({})", table.qualified("_claim"), EXPECTED.claim_args),
                leases.clone(),
                steps.clone(),
            ),
        }
    }
}

/// See [`Statements::inspect`].
const INSPECT: &str = "\
SELECT rel IS NOT NULL AS exists,
       obj_description(rel, 'pg_class') AS comment,
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped),
                '{}') AS columns,
       coalesce((SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
                   FROM pg_attribute a
                  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped),
                '{}') AS types,
       EXISTS (SELECT 1 FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                WHERE i.indrelid = rel AND i.indisunique AND i.indnatts = 1
                  AND i.indpred IS NULL AND a.attname = 'key') AS key_unique,
       to_regprocedure($2) IS NOT NULL AS claim,
       to_regclass($3) IS NOT NULL AS leases,
       to_regclass($4) IS NOT NULL AS steps
  FROM (SELECT to_regclass($1) AS rel) t";

/// The settings of every session of a pool that `PostgresStore::from_url` makes, sent once per
/// connection (one round trip). Its first statement answers the database's default isolation
/// level (what a handler's transaction gets back). Then, for the store's own statements:
///
/// - `READ COMMITTED`, whatever the database's default: the claim function relies on each of its
///   statements seeing what committed before it started, and a claim under `REPEATABLE READ`
///   would fail with a serialization error where a duplicate's 409 is due;
/// - `statement_timeout` half the store timeout (the other half bounds the wait for a
///   connection), so the server gives up on a statement no later than the store call does;
/// - `lock_timeout` a quarter of it: a claim that meets a row another transaction holds gives its
///   connection back instead of holding it for the whole timeout;
/// - `idle_in_transaction_session_timeout` the store timeout: a session left inside a transaction
///   (its client gone silent) is ended by the server and its locks released (a handler's
///   transaction restores the database's value, and bounds the wait for its `COMMIT` with
///   [`commit_bound`]);
/// - TCP keepalives every few seconds, so that the server notices a peer that vanished within
///   half a minute instead of the system's default two hours.
///
/// A handler's transaction restores the database's values of the timeouts (`SET LOCAL ... TO
/// DEFAULT`): its statements are the handler's business.
pub(super) fn session_sql(timeout: Duration) -> String {
    let ms = |d: Duration| sql_millis(d).max(1);
    // One statement (the extended protocol sends no more): the settings are read and set in the
    // order of the select list.
    format!(
        "SELECT current_setting('default_transaction_isolation'), \
         set_config('default_transaction_isolation', 'read committed', false), \
         set_config('statement_timeout', '{}ms', false), \
         set_config('lock_timeout', '{}ms', false), \
         set_config('idle_in_transaction_session_timeout', '{}ms', false), \
         set_config('tcp_keepalives_idle', '10', false), \
         set_config('tcp_keepalives_interval', '5', false), \
         set_config('tcp_keepalives_count', '3', false)",
        ms(timeout / 2),
        ms(timeout / 4),
        ms(timeout),
    )
}

/// The statement that begins a handler's transaction (one round trip): at `isolation` when known
/// (the database's default, which the store's own sessions override), with the timeouts the
/// store set on the session restored to the database's (`restore`: the handler's statements, and
/// the time it takes between them, are the handler's business).
pub(super) fn begin_sql(isolation: Option<Isolation>, restore: bool) -> String {
    let mut sql = String::from("BEGIN");
    if let Some(level) = isolation {
        sql.push_str(" ISOLATION LEVEL ");
        sql.push_str(level.as_sql());
    }
    if restore {
        sql.push_str(
            "; SET LOCAL statement_timeout TO DEFAULT; SET LOCAL lock_timeout TO DEFAULT; \
             SET LOCAL idle_in_transaction_session_timeout TO DEFAULT",
        );
    }
    sql
}

/// The value of `idle_in_transaction_session_timeout` that a handler's transaction gets with its
/// record's completion ([`Statements::complete_in_transaction`]'s `$6`): the server ends the
/// transaction if its `COMMIT` does not follow within `timeout` (the store timeout, when the
/// runtime gives up on it), so a connection that went silent after the completion (a network
/// partition) does not hold the record's row lock, and the key, for longer.
pub(super) fn commit_bound(timeout: Duration) -> String {
    format!("{}ms", sql_millis(timeout))
}

/// A transaction isolation level, as Postgres names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isolation {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Isolation {
    fn as_sql(self) -> &'static str {
        match self {
            Self::ReadUncommitted => "READ UNCOMMITTED",
            Self::ReadCommitted => "READ COMMITTED",
            Self::RepeatableRead => "REPEATABLE READ",
            Self::Serializable => "SERIALIZABLE",
        }
    }
}

impl FromStr for Isolation {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "read uncommitted" => Ok(Self::ReadUncommitted),
            "read committed" => Ok(Self::ReadCommitted),
            "repeatable read" => Ok(Self::RepeatableRead),
            "serializable" => Ok(Self::Serializable),
            _ => Err(()),
        }
    }
}

/// A duration as the milliseconds a statement takes: at least 1, at most 100 years.
pub(super) fn sql_millis(d: Duration) -> i64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    i64::try_from(ms.clamp(1, MAX_MILLIS)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::PostgresStore;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in [
            "idem_records",
            "_t",
            "a",
            "s.t",
            "app_1.idem_2",
            &"x".repeat(48),
        ] {
            assert!(ok.parse::<TableName>().is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "1abc",
            "s.1abc",
            "Idem",
            "idem-records",
            "idem records",
            "idem\"; DROP TABLE x; --",
            "idem_records\0",
            "ïdem",
            &"x".repeat(49),
        ] {
            assert_eq!(
                bad.parse::<TableName>(),
                Err(InvalidTableName(bad.to_owned())),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn the_schema_file_is_the_default_tables_migration() {
        let table: TableName = PostgresStore::DEFAULT_TABLE.parse().expect("valid");
        assert_eq!(table.schema_sql(), SCHEMA);
    }

    #[test]
    fn a_configured_table_replaces_every_name() {
        let table: TableName = "app.records".parse().expect("valid");
        let sql = table.schema_sql();
        assert!(!sql.contains("\"idem_records"), "{sql}");
        let steps = table.steps_schema_sql();
        assert!(!steps.contains("\"idem_records"), "{steps}");
        assert!(steps.contains("CREATE TABLE IF NOT EXISTS \"app\".\"records_steps\" ("));
        assert!(steps.contains(
            "INDEX IF NOT EXISTS \"records_steps_expires_at\" ON \"app\".\"records_steps\""
        ));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"app\".\"records\" ("));
        assert!(sql.contains("INDEX IF NOT EXISTS \"records_expires_at\" ON \"app\".\"records\""));
        assert!(sql.contains("FUNCTION \"app\".\"records_claim\"("));
        let statements = Statements::new(&table);
        assert!(statements
            .claim
            .contains("FROM \"app\".\"records_claim\"($1"));
        for sql in [
            &statements.renew,
            &statements.complete,
            &statements.release,
            &statements.sweep,
        ] {
            assert!(sql.contains("\"app\".\"records\""), "{sql}");
            assert!(sql.contains("FROM \"app\".\"records_leases\" l"), "{sql}");
        }
        assert!(statements
            .complete_in_transaction
            .starts_with(&statements.complete));
        for sql in [
            &statements.renew,
            &statements.complete,
            &statements.complete_in_transaction,
            &statements.release,
        ] {
            assert!(sql.contains("r.owner = $2 AND r.fingerprint = $3 AND greatest("));
        }
        assert!(sql.contains("TABLE IF NOT EXISTS \"app\".\"records_leases\" ("));
    }

    #[test]
    fn a_handlers_transaction_gets_the_databases_isolation_and_timeouts_back() {
        let level = "repeatable read".parse::<Isolation>().ok();
        assert_eq!(
            begin_sql(level, true),
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL statement_timeout TO DEFAULT; \
             SET LOCAL lock_timeout TO DEFAULT; SET LOCAL idle_in_transaction_session_timeout TO DEFAULT"
        );
        assert_eq!(begin_sql(None, false), "BEGIN");
        assert_eq!(commit_bound(Duration::from_secs(2)), "2000ms");
        assert!("snapshot".parse::<Isolation>().is_err());
        let session = session_sql(Duration::from_secs(2));
        assert!(
            session.contains("'statement_timeout', '1000ms'"),
            "{session}"
        );
        assert!(session.contains("'lock_timeout', '500ms'"), "{session}");
    }

    #[test]
    fn the_schema_file_sets_the_expected_version() {
        let marker = format!("wanted constant integer := {};", EXPECTED.version);
        assert_eq!(
            SCHEMA.matches(&marker).count(),
            1,
            "{marker} not in schema.sql"
        );
        assert!(SCHEMA.contains(&format!("'{VERSION_MARKER}' || wanted")));
        for (column, _) in EXPECTED.columns {
            assert!(
                SCHEMA.contains(&format!("\n    {column} ")),
                "schema.sql has no column {column}"
            );
        }
    }

    #[test]
    fn durations_are_clamped_to_what_postgres_holds() {
        assert_eq!(sql_millis(Duration::ZERO), 1);
        assert_eq!(sql_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(sql_millis(Duration::MAX), MAX_MILLIS as i64);
    }
}
