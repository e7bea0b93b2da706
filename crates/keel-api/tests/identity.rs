//! Registration, login and project listing over HTTP.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::json;

#[tokio::test]
async fn a_registered_user_logs_in_and_sees_their_default_project() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let projects = app.get("/v1/projects", Some(&tenant.token)).await;
    assert_eq!(projects.status, StatusCode::OK, "{:?}", projects.body);
    let items = projects.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "default");
    assert_eq!(items[0]["id"], tenant.project_id.as_str());
    assert!(projects.body["next_cursor"].is_null());
}

#[tokio::test]
async fn login_answers_a_bearer_token_that_expires() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let login = app
        .post(
            "/v1/auth/login",
            None,
            json!({"email": tenant.email.to_uppercase(), "password": "a long enough password"}),
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    assert_eq!(login.body["token_type"], "Bearer");
    assert_eq!(login.body["expires_in"], 900);
    assert_eq!(
        login.body["access_token"]
            .as_str()
            .unwrap()
            .split('.')
            .count(),
        3
    );
}

#[tokio::test]
async fn registration_writes_its_audit_rows_and_one_event_atomically() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'tenant.register'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'project.create'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'tenant.registered'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_second_account_with_the_same_email_is_a_409() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    app.post(
        "/v1/auth/register",
        None,
        json!({"email": tenant.email.to_uppercase(), "password": "another long password", "tenant_name": "x"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "email_taken");
    assert_eq!(app.count("SELECT count(*) FROM tenants").await, 1);
}

#[tokio::test]
async fn invalid_fields_are_listed_and_nothing_is_created() {
    let app = TestApp::spawn().await;
    let response = app
        .post(
            "/v1/auth/register",
            None,
            json!({"email": "nope", "password": "short", "tenant_name": ""}),
        )
        .await;
    response.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let fields: Vec<&str> = response.body["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "password", "tenant_name"]);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
    // Only the api's start-up (its CAs and first signing key) is audited.
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE request_id <> 'trust-bootstrap'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_401() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    app.post(
        "/v1/auth/login",
        None,
        json!({"email": tenant.email, "password": "wrong password!!"}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    app.post(
        "/v1/auth/login",
        None,
        json!({"email": "ghost@example.com", "password": "whatever it is"}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn missing_malformed_and_forged_tokens_are_a_401() {
    let app = TestApp::spawn().await;
    app.get("/v1/projects", None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.get("/v1/projects", Some("garbage"))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    let tenant = app.tenant("acme").await;
    let mut forged = tenant.token.clone();
    forged.push('x');
    app.get("/v1/projects", Some(&forged))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn each_tenant_lists_only_its_own_projects() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let globex = app.tenant("globex").await;
    let projects = app.get("/v1/projects", Some(&globex.token)).await;
    let ids: Vec<&str> = projects.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [globex.project_id.as_str()]);
    assert_ne!(acme.project_id, globex.project_id);
}

#[tokio::test]
async fn a_bad_page_limit_is_a_400() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    app.get("/v1/projects?limit=0", Some(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/projects?limit=abc", Some(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_a_401() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    // Take a real token's claims and strip the signature, claiming alg none.
    let claims = tenant.token.split('.').nth(1).unwrap();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"x"}"#);
    for forged in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
        app.get("/v1/projects", Some(&forged))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
}

#[tokio::test]
async fn a_token_whose_membership_was_removed_no_longer_works() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let mut admin = app.database.admin().await;
    sqlx::query("DELETE FROM memberships WHERE tenant_id = $1::uuid")
        .bind(&tenant.tenant_id)
        .execute(&mut admin)
        .await
        .unwrap();
    app.get("/v1/projects", Some(&tenant.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn an_oversized_body_is_a_413_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let huge = "x".repeat(3 * 1024 * 1024);
    app.post(
        "/v1/auth/register",
        None,
        json!({"email": "big@example.com", "password": huge, "tenant_name": "big"}),
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}
