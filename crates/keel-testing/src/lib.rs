//! Test helpers: every database test gets its own fresh database, cloned
//! from a template that has all migrations applied (one `CREATE DATABASE …
//! TEMPLATE` per test takes milliseconds; migrating takes much longer).
//!
//! The template is built once per set of migrations (its name carries a
//! hash of them) under an advisory lock, so parallel test processes never
//! race. Tests connect as `keel_api`, a login role with the same standing
//! as the api in production: a member of `keel_app` and `keel_system`,
//! never a superuser, never BYPASSRLS. A test that connected as `postgres`
//! would prove nothing about row-level security.
//!
//! The admin connection comes from `KEEL_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). `scripts/test.sh` drops
//! the databases of earlier runs before it starts.

use std::hash::{DefaultHasher, Hash, Hasher};

use keel_db::{DatabaseConfig, Db, MIGRATOR};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The role tests (and local mode) run the api as.
pub const APP_ROLE: &str = "keel_api";
/// Prefix of every per-test database, so a test run can drop old ones.
pub const TEST_DB_PREFIX: &str = "keel_test_";

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub name: String,
    /// Connection URL as the api's runtime role.
    pub app_url: String,
    /// Connection URL as the superuser (for test set-up only).
    pub admin_url: String,
    /// A pool as the api's runtime role.
    pub db: Db,
}

impl TestDb {
    pub fn config(&self) -> DatabaseConfig {
        let mut config = DatabaseConfig::new(&self.app_url);
        config.migrate_url = Some(self.admin_url.clone().into());
        config
    }

    /// A superuser connection to this test's database, for set-up steps a
    /// real client could never do (e.g. planting a failing trigger).
    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to the test database as the admin")
    }
}

fn admin_base_url() -> String {
    std::env::var("KEEL_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Replaces the database name of a Postgres URL, keeping its query string.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}{query}")
}

/// Replaces the user of a Postgres URL (`postgres://user@host…`).
fn with_user(url: &str, user: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_part = rest.split_once('@').map(|(_, host)| host).unwrap_or(rest);
    format!("{scheme}://{user}@{host_part}")
}

fn template_name() -> String {
    let mut hasher = DefaultHasher::new();
    let apalis = apalis_postgres::PostgresStorage::<()>::migrations();
    for migration in MIGRATOR.iter().chain(apalis.iter()) {
        migration.version.hash(&mut hasher);
        migration.checksum.hash(&mut hasher);
    }
    format!("keel_template_{:016x}", hasher.finish())
}

async fn ensure_template(admin: &mut PgConnection, admin_url: &str) -> String {
    let template = template_name();
    // Serialise template creation across every test process.
    sqlx::query("SELECT pg_advisory_lock(727274)")
        .execute(&mut *admin)
        .await
        .expect("take the template lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut *admin)
            .await
            .expect("look up the template");
    if !exists {
        let building = format!("{template}_building");
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building}")))
            .execute(&mut *admin)
            .await
            .expect("drop a half-built template");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .execute(&mut *admin)
            .await
            .expect("create the template");
        {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&with_database(admin_url, &building))
                .await
                .expect("connect to the template");
            keel_db::run_migrations(&pool)
                .await
                .expect("migrate the template");
            pool.close().await;
        }
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {template}"
        )))
        .execute(&mut *admin)
        .await
        .expect("publish the template");
    }
    // The runtime role: login, no superuser, no BYPASSRLS.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
             CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS;
           END IF;
         END $$;
         GRANT keel_app, keel_system TO {APP_ROLE};"
    )))
    .execute(&mut *admin)
    .await
    .expect("create the runtime role");
    sqlx::query("SELECT pg_advisory_unlock(727274)")
        .execute(&mut *admin)
        .await
        .expect("release the template lock");
    template
}

/// Creates a fresh database for one test, migrated, and a pool on it as the
/// api's runtime role.
pub async fn test_db() -> TestDb {
    let admin_base = admin_base_url();
    let mut admin = PgConnection::connect(&admin_base)
        .await
        .expect("connect to Postgres as the admin (is it running? see README)");
    let template = ensure_template(&mut admin, &admin_base).await;
    let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE {template}"
    )))
    .execute(&mut admin)
    .await
    .expect("create the test database");
    admin.close().await.ok();

    let admin_url = with_database(&admin_base, &name);
    let app_url = with_user(&admin_url, APP_ROLE);
    let mut config = DatabaseConfig::new(&app_url);
    config.max_connections = 5;
    let db = Db::connect(&config)
        .await
        .expect("connect as the runtime role");
    TestDb {
        name,
        app_url,
        admin_url,
        db,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_and_user_are_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "x"
            ),
            "postgres://postgres@127.0.0.1:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_user("postgres://postgres:pw@127.0.0.1:5432/x", "keel_api"),
            "postgres://keel_api@127.0.0.1:5432/x"
        );
    }
}
