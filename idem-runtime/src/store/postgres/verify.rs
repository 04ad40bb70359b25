//! Whether the table and the claim function are what this build needs ([`EXPECTED`]), read from
//! the catalog: `migrate` checks it before it commits, `verify_schema` for teams that run their
//! own migrations.

use sqlx::{Executor as _, PgConnection, Row as _};

use super::sql::{Statements, EXPECTED, VERSION_MARKER};

/// The records table (or its claim function) is not what this version of idem needs: a column is
/// missing or of another type, `key` is not unique, the claim function is missing, or the schema
/// version in the table's comment is older. Returned at start by [`PostgresStore::migrate`] and
/// [`PostgresStore::verify_schema`] (wrapped in
/// [`StoreError::Unavailable`](crate::StoreError::Unavailable)), so that an app does not start
/// and then fail every request; its message names what differs and the fix.
///
/// [`PostgresStore::migrate`]: crate::PostgresStore::migrate
/// [`PostgresStore::verify_schema`]: crate::PostgresStore::verify_schema
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the idempotency table {table} is not what this version of idem needs ({}): {fix}",
    problems.join("; ")
)]
pub struct SchemaMismatch {
    table: String,
    problems: Vec<String>,
    fix: &'static str,
}

impl SchemaMismatch {
    /// The table, as configured (`name` or `schema.name`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// What differs, one sentence each.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

/// The fix of a table whose columns or key differ: `migrate` never alters an existing table.
const RECREATE: &str = "migrate() creates what is missing but never alters an existing table, so \
    this one was made by something else. Rename or drop it (its records matter only until their \
    ttl ends) and call PostgresStore::migrate() again, or give the store another table with \
    PostgresStoreBuilder::table";

/// The fix of a table that is only behind (version, function), or missing.
const APPLY: &str = "apply the schema.sql of this idem version (PostgresStore::schema_sql() gives \
    it for the configured table; it changes only what is missing) in your migrations, or call \
    PostgresStore::migrate() at start";

/// What the catalog says about the table and the claim function.
#[derive(Debug)]
pub(super) struct Found {
    exists: bool,
    comment: Option<String>,
    columns: Vec<String>,
    types: Vec<String>,
    key_unique: bool,
    claim: bool,
    leases: bool,
    steps: bool,
}

impl Found {
    /// Reads the catalog. (Through `Executor`'s boxed futures on a connection: sqlx's generic
    /// `async fn`s, such as `Query::fetch_one`, make the futures of `migrate` and
    /// `verify_schema` lose `Send`.)
    pub(super) async fn read(
        conn: &mut PgConnection,
        sql: &Statements,
    ) -> Result<Self, sqlx::Error> {
        let row = conn
            .fetch_one(
                sqlx::query(&sql.inspect)
                    .bind(&sql.inspect_args.0)
                    .bind(&sql.inspect_args.1)
                    .bind(&sql.inspect_args.2)
                    .bind(&sql.inspect_args.3),
            )
            .await?;
        Ok(Self {
            exists: row.try_get(0)?,
            comment: row.try_get(1)?,
            columns: row.try_get(2)?,
            types: row.try_get(3)?,
            key_unique: row.try_get(4)?,
            claim: row.try_get(5)?,
            leases: row.try_get(6)?,
            steps: row.try_get(7)?,
        })
    }

    /// The schema version in the table's comment: 0 without one.
    pub(super) fn version(&self) -> u32 {
        self.comment
            .as_deref()
            .and_then(|c| c.strip_prefix(VERSION_MARKER))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// `Ok` when the table is what this build needs, else what differs and the fix.
    pub(super) fn check(&self, table: &str, claim: &str) -> Result<(), SchemaMismatch> {
        let mismatch = |problems, fix| SchemaMismatch {
            table: table.to_owned(),
            problems,
            fix,
        };
        if !self.exists {
            return Err(mismatch(vec!["the table does not exist".to_owned()], APPLY));
        }
        let mut shape = Vec::new();
        for (column, expected) in EXPECTED.columns {
            match self.columns.iter().position(|c| c == column) {
                None => shape.push(format!("column `{column}` is missing")),
                Some(i) if self.types.get(i).map(String::as_str) != Some(*expected) => {
                    shape.push(format!(
                        "column `{column}` is `{}`, not `{expected}`",
                        self.types.get(i).map_or("?", String::as_str)
                    ));
                }
                Some(_) => {}
            }
        }
        if !self.key_unique {
            shape.push("`key` is not its primary key".to_owned());
        }
        let mut behind = Vec::new();
        let version = self.version();
        if version < EXPECTED.version {
            behind.push(format!(
                "its schema version is {version} (table comment `{VERSION_MARKER}<n>`; none is \
                 0), this build needs {}",
                EXPECTED.version
            ));
        }
        if !self.claim {
            behind.push(format!("the claim function {claim} is missing"));
        }
        if !self.leases {
            behind.push(format!("the lease table {table}_leases is missing"));
        }
        if !self.steps {
            behind.push(format!("the steps table {table}_steps is missing"));
        }
        match (shape.is_empty(), behind.is_empty()) {
            (true, true) => Ok(()),
            (true, false) => Err(mismatch(behind, APPLY)),
            (false, _) => {
                shape.extend(behind);
                Err(mismatch(shape, RECREATE))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Found {
        Found {
            exists: true,
            comment: Some(format!("{VERSION_MARKER}{}", EXPECTED.version)),
            columns: EXPECTED
                .columns
                .iter()
                .map(|(c, _)| (*c).to_owned())
                .collect(),
            types: EXPECTED
                .columns
                .iter()
                .map(|(_, t)| (*t).to_owned())
                .collect(),
            key_unique: true,
            claim: true,
            leases: true,
            steps: true,
        }
    }

    fn check(found: &Found) -> Result<(), SchemaMismatch> {
        found.check(
            "idem_records",
            "\"idem_records_claim\"(bytea,bytea,bytea,bigint)",
        )
    }

    #[test]
    fn the_expected_schema_passes_in_any_column_order_and_with_more_columns() {
        assert_eq!(check(&expected()), Ok(()));
        let mut found = expected();
        found.columns.reverse();
        found.types.reverse();
        found.columns.push("added_later".to_owned());
        found.types.push("integer".to_owned());
        found.comment = Some(format!("{VERSION_MARKER}{}", EXPECTED.version + 1));
        assert_eq!(check(&found), Ok(()));
    }

    #[test]
    fn a_table_only_behind_is_fixed_by_the_schema_sql() {
        let mut found = expected();
        found.comment = Some("the payments team's table".to_owned());
        found.claim = false;
        let err = check(&found).expect_err("behind");
        assert_eq!(err.problems().len(), 2, "{err}");
        assert_eq!(err.fix, APPLY);
    }

    #[test]
    fn a_table_of_another_shape_must_be_replaced() {
        let mut found = expected();
        let i = found
            .columns
            .iter()
            .position(|c| c == "response")
            .expect("response");
        found.columns.remove(i);
        found.types.remove(i);
        found.comment = None;
        let err = check(&found).expect_err("shape");
        assert_eq!(err.fix, RECREATE);
        assert_eq!(err.problems()[0], "column `response` is missing");
        assert!(err.to_string().starts_with(
            "the idempotency table idem_records is not what this version of idem needs (column \
             `response` is missing; its schema version is 0"
        ));
    }
}
