//! The write path and tenant isolation, against a real Postgres as the
//! api's runtime role.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use keel_core::ids::{ProjectId, TenantId};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, NewEvent, RequestMeta, Scope};

fn meta() -> RequestMeta {
    RequestMeta {
        request_id: "test-request".into(),
        actor: Actor::system("test"),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

fn tenant_scope(tenant_id: TenantId) -> Scope {
    Scope::Tenant {
        tenant_id,
        user_id: None,
    }
}

/// Creates a tenant with one project through the write path.
async fn create_tenant(db: &keel_db::Db, name: &str) -> (TenantId, ProjectId) {
    let (tenant_id, project_id) = (TenantId::new(), ProjectId::new());
    let mut tx = db
        .begin_tenant(meta(), tenant_scope(tenant_id))
        .await
        .unwrap();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(tenant_id)
        .bind(name)
        .execute(tx.conn())
        .await
        .unwrap();
    sqlx::query("INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, 'default')")
        .bind(project_id)
        .bind(tenant_id)
        .execute(tx.conn())
        .await
        .unwrap();
    tx.emit(NewEvent::new(
        "tenant.registered",
        "tenant",
        tenant_id.as_uuid(),
        1,
        Some(tenant_id),
        ResourceName::tenant(tenant_id),
        serde_json::json!({}),
    ));
    tx.commit(Audit::new(
        "tenant.register",
        Some(tenant_id),
        ResourceName::tenant(tenant_id),
    ))
    .await
    .unwrap();
    (tenant_id, project_id)
}

#[tokio::test]
async fn a_commit_writes_the_change_its_audit_row_and_its_outbox_row_together() {
    let test = keel_testing::test_db().await;
    let (tenant_id, _) = create_tenant(&test.db, "acme").await;
    let mut admin = test.admin().await;
    let (actor, request_id): (String, String) =
        sqlx::query_as("SELECT actor, request_id FROM audit_log WHERE tenant_id = $1 AND action = 'tenant.register'")
            .bind(tenant_id)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(
        (actor.as_str(), request_id.as_str()),
        ("system:test", "test-request")
    );
    let traceparent: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(traceparent.is_some_and(|t| t.starts_with("00-")));
}

#[tokio::test]
async fn a_commit_writes_every_audit_row_and_every_event_in_the_order_emitted() {
    let test = keel_testing::test_db().await;
    let (tenant_id, _) = create_tenant(&test.db, "acme").await;
    let mut tx = test
        .db
        .begin_tenant(meta(), tenant_scope(tenant_id))
        .await
        .unwrap();
    let aggregate = uuid::Uuid::now_v7();
    for (version, event_type) in [(1, "thing.first"), (2, "thing.second"), (3, "thing.third")] {
        tx.emit(NewEvent::new(
            event_type,
            "thing",
            aggregate,
            version,
            Some(tenant_id),
            ResourceName::tenant(tenant_id),
            serde_json::json!({ "version": version }),
        ));
    }
    tx.audit(
        Audit::new(
            "thing.extra",
            Some(tenant_id),
            ResourceName::tenant(tenant_id),
        )
        .by(Actor::system("other"))
        .with_details(serde_json::json!({ "n": 1 })),
    );
    tx.commit(Audit::new(
        "thing.change",
        Some(tenant_id),
        ResourceName::tenant(tenant_id),
    ))
    .await
    .unwrap();

    let mut admin = test.admin().await;
    let events: Vec<(String, i64, serde_json::Value, String)> = sqlx::query_as(
        "SELECT event_type, aggregate_version, payload, request_id FROM outbox
         WHERE aggregate_id = $1 ORDER BY seq",
    )
    .bind(aggregate)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let expected: Vec<(String, i64, serde_json::Value, String)> =
        [(1, "thing.first"), (2, "thing.second"), (3, "thing.third")]
            .into_iter()
            .map(|(version, event_type)| {
                (
                    event_type.to_owned(),
                    version,
                    serde_json::json!({ "version": version }),
                    "test-request".to_owned(),
                )
            })
            .collect();
    assert_eq!(events, expected);
    let audits: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT action, actor, details FROM audit_log
         WHERE tenant_id = $1 AND action LIKE 'thing.%' ORDER BY id",
    )
    .bind(tenant_id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        audits,
        vec![
            (
                "thing.extra".to_owned(),
                "system:other".to_owned(),
                serde_json::json!({ "n": 1 })
            ),
            (
                "thing.change".to_owned(),
                "system:test".to_owned(),
                serde_json::json!({})
            ),
        ]
    );
}

#[tokio::test]
async fn a_failure_after_the_domain_write_leaves_no_change_no_audit_and_no_event() {
    let test = keel_testing::test_db().await;
    // Inject a failure into the last step of the commit: the outbox insert.
    let mut admin = test.admin().await;
    sqlx::raw_sql(
        "CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected failure'; END $$;
         CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION fail_outbox();",
    )
    .execute(&mut admin)
    .await
    .unwrap();

    let tenant_id = TenantId::new();
    let mut tx = test
        .db
        .begin_tenant(meta(), tenant_scope(tenant_id))
        .await
        .unwrap();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'doomed')")
        .bind(tenant_id)
        .execute(tx.conn())
        .await
        .unwrap();
    tx.emit(NewEvent::new(
        "tenant.registered",
        "tenant",
        tenant_id.as_uuid(),
        1,
        Some(tenant_id),
        ResourceName::tenant(tenant_id),
        serde_json::json!({}),
    ));
    let result = tx
        .commit(Audit::new(
            "tenant.register",
            Some(tenant_id),
            ResourceName::tenant(tenant_id),
        ))
        .await;
    assert!(result.is_err(), "the injected failure must surface");

    for table in ["tenants", "audit_log", "outbox"] {
        let count: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&mut admin)
                .await
                .unwrap();
        assert_eq!(count, 0, "{table} must be empty after a failed commit");
    }
}

#[tokio::test]
async fn a_dropped_transaction_rolls_everything_back() {
    let test = keel_testing::test_db().await;
    let tenant_id = TenantId::new();
    {
        let mut tx = test
            .db
            .begin_tenant(meta(), tenant_scope(tenant_id))
            .await
            .unwrap();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'abandoned')")
            .bind(tenant_id)
            .execute(tx.conn())
            .await
            .unwrap();
        // An early return (`?`) in a handler drops the transaction here.
    }
    let mut admin = test.admin().await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn an_unfiltered_query_in_one_tenant_returns_no_row_of_another() {
    let test = keel_testing::test_db().await;
    let (acme, _) = create_tenant(&test.db, "acme").await;
    let (globex, _) = create_tenant(&test.db, "globex").await;

    let mut tx = test
        .db
        .begin_tenant(meta(), tenant_scope(acme))
        .await
        .unwrap();
    // Deliberately no WHERE clause: row-level security must filter.
    for table in [
        "tenants",
        "projects",
        "audit_log",
        "memberships",
        "allocations",
    ] {
        let foreign: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {} <> $1",
            if table == "tenants" {
                "id"
            } else {
                "tenant_id"
            }
        )))
        .bind(acme)
        .fetch_one(tx.conn())
        .await
        .unwrap();
        assert_eq!(foreign, 0, "{table} leaked another tenant's rows");
    }
    let visible: Vec<TenantId> = sqlx::query_scalar("SELECT id FROM tenants")
        .fetch_all(tx.conn())
        .await
        .unwrap();
    assert_eq!(visible, [acme]);
    assert_ne!(acme, globex);
}

#[tokio::test]
async fn without_a_tenant_context_nothing_is_visible_and_nothing_can_be_written() {
    let test = keel_testing::test_db().await;
    create_tenant(&test.db, "acme").await;
    let mut conn = test.db.pool().acquire().await.unwrap();
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(visible, 0);
    let insert = sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'sneaky')")
        .bind(TenantId::new())
        .execute(&mut *conn)
        .await;
    assert!(
        insert.is_err(),
        "row-level security must refuse a write without a tenant"
    );
}

#[tokio::test]
async fn a_tenant_cannot_write_a_row_for_another_tenant() {
    let test = keel_testing::test_db().await;
    let (acme, _) = create_tenant(&test.db, "acme").await;
    let (globex, _) = create_tenant(&test.db, "globex").await;
    let mut tx = test
        .db
        .begin_tenant(meta(), tenant_scope(acme))
        .await
        .unwrap();
    let insert =
        sqlx::query("INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, 'planted')")
            .bind(ProjectId::new())
            .bind(globex)
            .execute(tx.conn())
            .await;
    assert!(insert.is_err());
}

#[tokio::test]
async fn the_runtime_role_has_no_bypassrls_and_is_no_superuser() {
    let test = keel_testing::test_db().await;
    let (superuser, bypass): (bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(test.db.pool())
            .await
            .unwrap();
    assert!(!superuser && !bypass);
}

#[tokio::test]
async fn a_system_transaction_sees_every_tenant() {
    let test = keel_testing::test_db().await;
    create_tenant(&test.db, "acme").await;
    create_tenant(&test.db, "globex").await;
    let mut tx = test.db.begin_system(meta()).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(tx.conn())
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn every_table_with_a_tenant_column_forces_row_level_security() {
    let test = keel_testing::test_db().await;
    let (acme, _) = create_tenant(&test.db, "acme").await;
    create_tenant(&test.db, "globex").await;
    let mut admin = test.admin().await;
    // Found from the catalogue, so a new tenant-owned table is covered
    // without touching this test.
    let tables: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r'
           AND EXISTS (SELECT FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
         ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(tables.len() >= 10, "{tables:?}");
    for (table, enabled, forced) in tables {
        assert!(
            enabled && forced,
            "{table} must ENABLE and FORCE row-level security"
        );
        let mut tx = test
            .db
            .begin_tenant(meta(), tenant_scope(acme))
            .await
            .unwrap();
        // Deliberately unfiltered but for "not mine": must see nothing.
        let foreign: Result<i64, sqlx::Error> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE tenant_id IS DISTINCT FROM $1"
        )))
        .bind(acme)
        .fetch_one(tx.conn())
        .await;
        match foreign {
            Ok(count) => assert_eq!(count, 0, "{table} leaked another tenant's rows"),
            // No read grant at all is just as private.
            Err(error) => assert!(
                error.to_string().contains("permission denied"),
                "{table}: {error}"
            ),
        }
    }
}

#[tokio::test]
async fn a_transaction_can_change_only_the_user_it_acts_as_and_delete_none() {
    let test = keel_testing::test_db().await;
    let (acme, _) = create_tenant(&test.db, "acme").await;
    let mut admin = test.admin().await;
    let (me, other) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for (id, email) in [(me, "me@example.com"), (other, "other@example.com")] {
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')")
            .bind(id)
            .bind(email)
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let mut tx = test
        .db
        .begin_tenant(
            meta(),
            Scope::Tenant {
                tenant_id: acme,
                user_id: Some(keel_core::ids::UserId::from(me)),
            },
        )
        .await
        .unwrap();
    let changed = sqlx::query("UPDATE users SET password_hash = 'forged'")
        .execute(tx.conn())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1, "only the acting user's own row");
    // Deleting users is for system transactions only (account deletion):
    // a tenant transaction deletes no user, not even its own.
    let deleted = sqlx::query("DELETE FROM users")
        .execute(tx.conn())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 0, "no user deleted outside a system transaction");
}

#[tokio::test]
async fn a_begin_dropped_midway_leaves_no_transaction_on_its_connection() {
    use std::future::Future;
    use std::task::Poll;

    let test = keel_testing::test_db().await;
    let (acme, _) = create_tenant(&test.db, "acme").await;
    // One connection, so the next query must get the one the begin had.
    let mut config = test.config();
    config.max_connections = 1;
    let db = keel_db::Db::connect(&config).await.unwrap();
    let mut admin = test.admin().await;
    // A request dropped (client gone) after 0, 1, 2, … polls of its begin:
    // wherever that lands, even between sending BEGIN and reading its
    // answer, the connection comes back outside any transaction.
    for polls in 0..300 {
        {
            let scope = Scope::Tenant {
                tenant_id: acme,
                user_id: None,
            };
            let mut begin = std::pin::pin!(db.begin_tenant(meta(), scope));
            for _ in 0..polls {
                let ready =
                    std::future::poll_fn(|cx| Poll::Ready(begin.as_mut().poll(cx).is_ready()))
                        .await;
                if ready {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        // Hold the one connection and ask Postgres, from outside, what
        // state its session is in.
        let mut conn = db.pool().acquire().await.unwrap();
        let (pid, tenant): (i32, Option<String>) = sqlx::query_as(
            "SELECT pg_backend_pid(), NULLIF(current_setting('keel.tenant_id', true), '')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        drop(conn);
        assert!(
            state == "idle" && tenant.is_none(),
            "after {polls} polls: the session is {state}, tenant {tenant:?}"
        );
    }
}

#[tokio::test]
async fn a_one_round_trip_bookkeeping_statement_runs_as_the_system_role_and_leaves_nothing_open() {
    let test = keel_testing::test_db().await;
    // One connection, so each query below runs on the same session.
    let mut config = test.config();
    config.max_connections = 1;
    let db = keel_db::Db::connect(&config).await.unwrap();
    let row = db
        .bookkeeping_once("SELECT current_user::text AS role")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlx::Row::get::<String, _>(&row, "role"), "keel_system");
    // A failure anywhere in it rolls all of it back.
    let tenant = TenantId::new();
    let failed = db
        .bookkeeping_once(&format!(
            "INSERT INTO tenants (id, name) VALUES ({}, 'doomed'); SELECT 1 / 0",
            keel_db::SqlLiteral::uuid(tenant.as_uuid())
        ))
        .await;
    assert!(failed.is_err());
    let mut conn = db.pool().acquire().await.unwrap();
    let (role, pid): (String, i32) = sqlx::query_as("SELECT current_user::text, pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_ne!(role, "keel_system", "the role ends with the statement");
    // Asked from outside while the connection is held: its session is idle.
    let mut admin = test.admin().await;
    let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(state, "idle", "no transaction is left open");
    let doomed: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(doomed, 0);
}
