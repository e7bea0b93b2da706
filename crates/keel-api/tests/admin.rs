//! Operators: their own login and tokens, platform roles through the one
//! decision function, every request audited in the platform chain.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode};
use common::TestApp;
use keel_auth::authz::PlatformRole;
use serde_json::json;

#[tokio::test]
async fn an_operator_lists_tenants_and_every_request_is_audited() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    app.tenant("globex").await;
    let (_, token) = app.operator(PlatformRole::Operator).await;
    let tenants = app.get("/v1/admin/tenants", Some(&token)).await;
    assert_eq!(tenants.status, StatusCode::OK, "{:?}", tenants.body);
    let items = tenants.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["members"], 1);
    assert_eq!(items[0]["projects"], 1);
    assert_eq!(
        items[0]["resource_name"],
        format!(
            "krn:keel::{id}::tenant/{id}",
            id = items[0]["id"].as_str().unwrap()
        )
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_log WHERE tenant_id IS NULL AND actor LIKE 'operator:%'
             AND action IN ('operator.login', 'admin.tenant_list')"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn read_only_operators_look_but_do_not_touch() {
    let app = TestApp::spawn().await;
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;
    assert_eq!(
        app.get("/v1/admin/operators", Some(&reader)).await.status,
        StatusCode::OK
    );
    app.post(
        "/v1/admin/operators",
        Some(&reader),
        json!({"email": "new-op@example.com", "password": "a long enough password", "role": "operator"}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");

    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let created = app
        .post(
            "/v1/admin/operators",
            Some(&operator),
            json!({"email": "new-op@example.com", "password": "a long enough password", "role": "read_only_operator"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["role"], "read_only_operator");
    assert_eq!(
        created.body["resource_name"],
        format!(
            "krn:keel::::operator/{}",
            created.body["id"].as_str().unwrap()
        )
    );
    app.post(
        "/v1/admin/operators",
        Some(&operator),
        json!({"email": "NEW-OP@example.com", "password": "a long enough password", "role": "operator"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "email_taken");
    app.post(
        "/v1/admin/operators",
        Some(&operator),
        json!({"email": "x@example.com", "password": "short", "role": "operator"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
}

#[tokio::test]
async fn operators_are_never_tenant_members_and_users_are_never_operators() {
    let app = TestApp::spawn().await;
    let user = app.tenant("acme").await;
    // A user's credentials do not open the admin login, nor the reverse.
    app.post(
        "/v1/admin/auth/login",
        None,
        json!({"email": user.email, "password": "a long enough password"}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    let (email, _) = app.operator(PlatformRole::Operator).await;
    app.login(&email, "an operator password", None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn logout_and_disabling_end_an_operators_access() {
    let app = TestApp::spawn().await;
    let (_, token) = app.operator(PlatformRole::Operator).await;
    let out = app
        .request(Method::POST, "/v1/admin/auth/logout", Some(&token), None)
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    app.get("/v1/admin/tenants", Some(&token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");

    let (email, token) = app.operator(PlatformRole::Operator).await;
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE operators SET disabled_at = now() WHERE email = $1")
        .bind(&email)
        .execute(&mut admin)
        .await
        .unwrap();
    app.get("/v1/admin/tenants", Some(&token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/admin/auth/login",
        None,
        json!({"email": email, "password": "an operator password"}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn operators_verify_every_chain_including_the_platforms() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    let (_, token) = app.operator(PlatformRole::ReadOnlyOperator).await;
    keel_auth::audit_chain::seal(&app.state.db).await.unwrap();
    let reports = app.get("/v1/admin/audit/verify", Some(&token)).await;
    assert_eq!(reports.status, StatusCode::OK, "{:?}", reports.body);
    let reports = reports.body.as_array().unwrap().clone();
    assert_eq!(reports.len(), 2, "acme's chain and the platform's");
    assert!(
        reports.iter().all(|report| report["valid"] == true),
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|report| report["chain_id"] == uuid::Uuid::nil().to_string())
    );
}
