//! The api's foundation over HTTP: health, request ids, and the one error
//! envelope for every kind of bad request.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::TestApp;
use serde_json::json;

#[tokio::test]
async fn liveness_and_readiness_answer_ok_on_a_migrated_database() {
    let app = TestApp::spawn().await;
    let live = app.get("/healthz", None).await;
    assert_eq!(live.status, StatusCode::OK);
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["status"], "ok");
}

#[tokio::test]
async fn readiness_fails_when_a_migration_is_missing() {
    let app = TestApp::spawn().await;
    let mut admin = app.database.admin().await;
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    app.get("/readyz", None)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
}

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_an_absent_one_generated() {
    let app = TestApp::spawn().await;
    let request = Request::builder()
        .uri("/healthz")
        .header("x-request-id", "trace-me-42")
        .body(Body::empty())
        .unwrap();
    let response = app.send(request).await;
    assert_eq!(response.headers["x-request-id"], "trace-me-42");
    let generated = app.get("/healthz", None).await;
    assert!(!generated.headers["x-request-id"].is_empty());
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_the_envelope() {
    let app = TestApp::spawn().await;
    app.get("/v1/nothing-here", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "route_not_found");
    app.request(Method::DELETE, "/v1/auth/login", None, None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn malformed_json_is_a_400_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/auth/register")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"email\": "))
        .unwrap();
    app.send(request)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_body_without_json_content_type_is_a_415() {
    let app = TestApp::spawn().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/auth/login")
        .body(Body::from("{}"))
        .unwrap();
    app.send(request)
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
}

#[tokio::test]
async fn missing_and_mistyped_fields_are_a_422() {
    let app = TestApp::spawn().await;
    app.post("/v1/auth/register", None, json!({"email": "a@b.co"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    app.post("/v1/auth/login", None, json!({"email": 5, "password": "x"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
}

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one() {
    let app = TestApp::spawn().await;
    let served = app.get("/v1/openapi.json", None).await;
    assert_eq!(served.status, StatusCode::OK);
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../openapi/openapi.json"
    ))
    .expect("openapi/openapi.json is committed (run `make codegen`)");
    let produced = keel_api::openapi::document_json();
    assert!(
        committed == produced,
        "openapi/openapi.json is stale: run `make codegen` and commit the result"
    );
    assert_eq!(
        served.body,
        serde_json::from_str::<serde_json::Value>(&committed).unwrap()
    );
}

#[tokio::test]
async fn the_callers_trace_id_travels_into_the_outbox() {
    let app = TestApp::spawn().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/auth/register")
        .header(header::CONTENT_TYPE, "application/json")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(Body::from(
            json!({"email": "t@example.com", "password": "a long enough password", "tenant_name": "T"}).to_string(),
        ))
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::CREATED);
    let mut admin = app.database.admin().await;
    let traceparent: String = sqlx::query_scalar("SELECT traceparent FROM outbox")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
}
