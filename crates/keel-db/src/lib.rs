//! Postgres for Keel: the pool, the migrations, and the ONE way to change
//! state.
//!
//! Every mutation runs in a [`WriteTx`]: the domain change, its audit row
//! and its outbox events are written in one Postgres transaction, in
//! [`WriteTx::commit`]. Dropping a `WriteTx` without committing rolls all
//! of it back. There is no other way to get a writable transaction on tenant
//! data: [`Db::begin_tenant`] and [`Db::begin_system`] are the only doors.
//!
//! Two scopes exist:
//! - a **tenant** transaction sets `keel.tenant_id` (and the signed-in
//!   user) with `set_config(…, true)`, i.e. for this transaction only, and
//!   Postgres row-level security hides every other tenant's rows;
//! - a **system** transaction (`SET LOCAL ROLE keel_system`) sees every
//!   tenant; only the worker, the agent-facing and operator endpoints and
//!   a user's own account deletion (which spans tenants) use it, and their
//!   changes are audited under the actor they act for.

mod config;
mod deferred;
mod tx;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

pub use config::DatabaseConfig;
pub use deferred::{DeferredCommit, Outcome as DeferredOutcome};
pub use tx::{Audit, NewEvent, RequestMeta, Scope, WriteTx};

/// The migrations under `/migrations`, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Name of the NOTIFY channel a commit with outbox events signals, so the
/// relay wakes without polling.
pub const OUTBOX_CHANNEL: &str = "keel_outbox";

pub type PgTransaction = sqlx::Transaction<'static, Postgres>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The application's connection pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
}

impl Db {
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, DbError> {
        let options: PgConnectOptions = config.url_options()?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(config.acquire_timeout_secs))
            // sqlx already checks each connection when it comes back to the
            // pool; checking it again on the way out would cost every
            // request one more round trip. A connection that died while
            // idle fails one query, which then fails that request.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The raw pool, for reads that need no tenant (flavors, health checks)
    /// and for the LISTEN connections of the relay.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction scoped to one tenant (and, when known, the user
    /// acting in it). Row-level security shows only that tenant's rows.
    pub async fn begin_tenant(&self, meta: RequestMeta, scope: Scope) -> Result<WriteTx, DbError> {
        WriteTx::begin(&self.pool, meta, scope).await
    }

    /// Begins a system transaction that sees every tenant. Use only from
    /// the worker, agent-facing and operator endpoints, and for a user's
    /// own account, which spans tenants (account deletion).
    pub async fn begin_system(&self, meta: RequestMeta) -> Result<WriteTx, DbError> {
        WriteTx::begin(&self.pool, meta, Scope::System).await
    }

    /// A system transaction for infrastructure bookkeeping that is not a
    /// domain change and so has no audit row: outbox fan-out and delivery
    /// state. Domain changes use [`Db::begin_system`].
    pub async fn begin_bookkeeping(&self) -> Result<PgTransaction, DbError> {
        let mut tx = tx::begin_detached(&self.pool, "BEGIN".to_owned()).await?;
        sqlx::query("SET LOCAL ROLE keel_system")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// A read-only system transaction on one snapshot (`REPEATABLE READ`):
    /// checks that read many rows across tenants (the billing
    /// reconciliation) see them as of one instant, not half before and
    /// half after a concurrent change.
    pub async fn begin_snapshot(&self) -> Result<PgTransaction, DbError> {
        let mut tx = tx::begin_detached(
            &self.pool,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
        )
        .await?;
        sqlx::query("SET LOCAL ROLE keel_system")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// One bookkeeping statement as the system role in one round trip: a
    /// simple query holding `SET LOCAL ROLE keel_system` and `statement`,
    /// which Postgres runs as one implicit transaction and rolls back by
    /// itself if any part fails (so, unlike a failed multi-statement
    /// `BEGIN`, it never leaves the connection inside a transaction).
    /// Returns the statement's first row, if any. A simple query takes no
    /// parameters: every value in `statement` must be a [`SqlLiteral`].
    pub async fn bookkeeping_once(&self, statement: &str) -> Result<Option<PgRow>, DbError> {
        let query = format!("SET LOCAL ROLE keel_system; {statement}");
        Ok(sqlx::raw_sql(AssertSqlSafe(query))
            .fetch_optional(&self.pool)
            .await?)
    }

    /// True when every embedded migration has been applied (readiness).
    pub async fn migrations_applied(&self) -> Result<bool, DbError> {
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .all(|m| applied.contains(&m.version)))
    }
}

/// Applies the migrations. Runs as the database owner (the `migrate_url`),
/// which may differ from the api's runtime role.
pub async fn migrate(config: &DatabaseConfig) -> Result<(), DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(config.migrate_options()?)
        .await?;
    run_migrations(&pool).await?;
    pool.close().await;
    Ok(())
}

/// apalis' own migrations (its `apalis` schema) first, then ours, whose
/// grants cover the apalis tables.
pub async fn run_migrations(pool: &PgPool) -> Result<(), DbError> {
    apalis_postgres::PostgresStorage::<()>::migrations()
        .run(pool)
        .await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Is this error a unique violation of the named constraint or index?
pub fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.constraint() == Some(constraint)
        }
        _ => false,
    }
}

/// A value that may be written into SQL text as a quoted literal because
/// its text cannot end the literal: a UUID (hex digits and hyphens) or a
/// name made of ASCII letters, digits, `_`, `-` and `.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlLiteral(String);

impl SqlLiteral {
    pub fn uuid(value: Uuid) -> Self {
        Self(format!("'{value}'"))
    }

    /// `None` unless `name` is plain.
    pub fn name(name: &str) -> Option<Self> {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
        plain.then(|| Self(format!("'{name}'")))
    }
}

impl std::fmt::Display for SqlLiteral {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[cfg(test)]
mod literal_tests {
    use super::SqlLiteral;

    #[test]
    fn only_plain_names_become_literals() {
        assert_eq!(
            SqlLiteral::name("provisioning").map(|l| l.to_string()),
            Some("'provisioning'".to_owned())
        );
        for bad in ["", "a'b", "a b", "a;b", "é", "a\\b"] {
            assert_eq!(SqlLiteral::name(bad), None, "{bad:?}");
        }
        let id = uuid::Uuid::nil();
        assert_eq!(
            SqlLiteral::uuid(id).to_string(),
            "'00000000-0000-0000-0000-000000000000'"
        );
    }
}
