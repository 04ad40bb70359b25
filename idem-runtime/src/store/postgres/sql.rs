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
    pub(super) release: String,
    pub(super) sweep: String,
    /// The journal of steps: load one request's, record one step (fenced), sweep.
    pub(super) load_steps: String,
    pub(super) record_step: String,
    pub(super) sweep_steps: String,
    pub(super) schema: String,
    /// The schema after the advisory lock.
    pub(super) migrate: String,
}

impl Statements {
    pub(super) fn new(table: &TableName) -> Self {
        let t = table.qualified("");
        let steps = table.qualified("_steps");
        // The fence of renew, complete and release: this ticket's live pending row.
        let fence = "key = $1 AND state = 'pending' AND owner = $2 AND fingerprint = $3 \
                     AND expires_at > now()";
        Self {
            claim: format!(
                "SELECT o_acquired, o_state, o_fingerprint, o_owner, o_response, o_remaining_ms \
                 FROM {}($1, $2, $3, $4)",
                table.qualified("_claim")
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = now() + $4 * interval '1 millisecond' WHERE {fence}"
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', owner = NULL, response = $4, \
                 expires_at = now() + $5 * interval '1 millisecond' WHERE {fence}"
            ),
            release: format!("DELETE FROM {t} WHERE {fence}"),
            // The inner query locks the oldest expired rows, skipping any a claim is taking over;
            // the outer condition is checked again on the row it deletes.
            sweep: format!(
                "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE expires_at < now() \
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) AND expires_at < now()"
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
                "WITH owner AS (SELECT 1 FROM {t} WHERE {fence} FOR SHARE), \
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
            migrate: format!(
                "SET LOCAL statement_timeout = '{}ms';\nSELECT pg_advisory_xact_lock({MIGRATE_LOCK});\n{}\n{}",
                MIGRATE_TIMEOUT.as_millis(),
                table.schema_sql(),
                table.steps_schema_sql()
            ),
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
        for sql in [&statements.renew, &statements.complete, &statements.release] {
            assert!(sql.contains("\"app\".\"records\""), "{sql}");
            assert!(sql.contains("owner = $2 AND fingerprint = $3 AND expires_at > now()"));
        }
    }

    #[test]
    fn durations_are_clamped_to_what_postgres_holds() {
        assert_eq!(sql_millis(Duration::ZERO), 1);
        assert_eq!(sql_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(sql_millis(Duration::MAX), MAX_MILLIS as i64);
    }
}
