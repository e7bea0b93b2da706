//! The audit log's hash chain: sealing, verification, and tampering caught
//! by verification (rows altered or deleted behind the api's back).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::{Tenant, TestApp};
use serde_json::{Value, json};

async fn busy_tenant(app: &TestApp, name: &str) -> Tenant {
    let tenant = app.tenant(name).await;
    for project in ["one", "two", "three"] {
        let created = app
            .post(
                "/v1/projects",
                Some(&tenant.token),
                json!({"name": project}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
    }
    tenant
}

async fn seal(app: &TestApp) -> u64 {
    keel_auth::audit_chain::seal(&app.state.db).await.unwrap()
}

async fn verify(app: &TestApp, tenant: &Tenant) -> Value {
    let response = app.get("/v1/audit/verify", Some(&tenant.token)).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body
}

async fn admin_exec(app: &TestApp, sql: &str, tenant: &Tenant) {
    let mut admin = app.database.admin().await;
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(&tenant.tenant_id)
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn sealed_entries_verify_and_sealing_continues_the_chain() {
    let app = TestApp::spawn().await;
    let acme = busy_tenant(&app, "acme").await;
    let before = verify(&app, &acme).await;
    assert_eq!(before["entries_checked"], 0);
    assert!(before["entries_unsealed"].as_i64().unwrap() >= 6);

    assert!(seal(&app).await >= 6);
    let sealed = verify(&app, &acme).await;
    assert_eq!(sealed["valid"], true, "{sealed}");
    assert_eq!(sealed["entries_unsealed"], 0);
    let first_count = sealed["entries_checked"].as_i64().unwrap();

    // More writes, sealed later, extend the same chain.
    app.post("/v1/projects", Some(&acme.token), json!({"name": "four"}))
        .await;
    assert_eq!(seal(&app).await, 1);
    let extended = verify(&app, &acme).await;
    assert_eq!(extended["valid"], true, "{extended}");
    assert_eq!(extended["entries_checked"], first_count + 1);
    assert_eq!(seal(&app).await, 0, "nothing left to seal");
}

#[tokio::test]
async fn an_altered_entry_is_reported_as_the_first_broken_link() {
    let app = TestApp::spawn().await;
    let acme = busy_tenant(&app, "acme").await;
    let globex = busy_tenant(&app, "globex").await;
    seal(&app).await;
    admin_exec(
        &app,
        "UPDATE audit_log SET details = '{\"forged\": true}' WHERE tenant_id = $1::uuid AND chain_seq = 3",
        &acme,
    )
    .await;
    let report = verify(&app, &acme).await;
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_broken"]["seq"], 3);
    assert_eq!(report["first_broken"]["reason"], "entry_altered");
    assert!(report["first_broken"]["entry_id"].is_string());
    // Another tenant's chain is its own.
    assert_eq!(verify(&app, &globex).await["valid"], true);
}

#[tokio::test]
async fn a_deleted_entry_breaks_the_chain_where_it_was() {
    let app = TestApp::spawn().await;
    let acme = busy_tenant(&app, "acme").await;
    seal(&app).await;
    admin_exec(
        &app,
        "DELETE FROM audit_log WHERE tenant_id = $1::uuid AND chain_seq = 2",
        &acme,
    )
    .await;
    let report = verify(&app, &acme).await;
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_broken"]["seq"], 2);
    assert_eq!(report["first_broken"]["reason"], "entry_missing");
}

#[tokio::test]
async fn deleting_the_newest_entries_is_caught_by_the_head() {
    let app = TestApp::spawn().await;
    let acme = busy_tenant(&app, "acme").await;
    seal(&app).await;
    let checked = verify(&app, &acme).await["entries_checked"]
        .as_i64()
        .unwrap();
    admin_exec(
        &app,
        "DELETE FROM audit_log WHERE tenant_id = $1::uuid AND chain_seq = (SELECT max(chain_seq) FROM audit_log WHERE tenant_id = $1::uuid)",
        &acme,
    )
    .await;
    let report = verify(&app, &acme).await;
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_broken"]["reason"], "tail_missing");
    assert_eq!(report["first_broken"]["seq"], checked);
}

#[tokio::test]
async fn the_api_role_can_neither_change_nor_delete_entries() {
    // Only the sealer's chain columns are writable, and only by keel_system.
    let app = TestApp::spawn().await;
    busy_tenant(&app, "acme").await;
    for sql in [
        "UPDATE audit_log SET details = '{}'",
        "DELETE FROM audit_log",
    ] {
        let error = sqlx::query(sql)
            .execute(app.state.db.pool())
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("permission denied"),
            "{sql}: {error}"
        );
    }
}

#[tokio::test]
async fn members_cannot_verify() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let member = app.member(&acme, "member").await;
    app.get("/v1/audit/verify", Some(&member.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
}
