//! `Idempotency-Key`: replay, mismatch, concurrency, scoping, purge.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{TestApp, TestResponse};
use serde_json::{Value, json};

async fn post_with_key(
    app: &TestApp,
    uri: &str,
    token: &str,
    key: &str,
    body: Value,
) -> (TestResponse, Vec<u8>) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.send(request).await;
    let bytes = response.body.to_string().into_bytes();
    (response, bytes)
}

#[tokio::test]
async fn the_same_key_and_body_replay_the_first_response_and_create_once() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let body = json!({"name": "research"});
    let (first, first_bytes) =
        post_with_key(&app, "/v1/projects", &owner.token, "key-1", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    for _ in 0..2 {
        let (again, again_bytes) =
            post_with_key(&app, "/v1/projects", &owner.token, "key-1", body.clone()).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again_bytes, first_bytes, "the same body, byte for byte");
        assert_eq!(again.headers["etag"], first.headers["etag"]);
        assert_eq!(again.headers["idempotent-replayed"], "true");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM projects WHERE name = 'research'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'project.create' AND resource LIKE '%' || (SELECT id::text FROM projects WHERE name = 'research')")
            .await,
        1
    );
    // The key and the stored response committed with the project.
    assert_eq!(
        app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'key-1' AND status_code = 201 AND response_body IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn the_same_key_with_another_request_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (first, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "key-1",
        json!({"name": "one"}),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let (other, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "key-1",
        json!({"name": "two"}),
    )
    .await;
    other.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let (other_path, _) = post_with_key(
        &app,
        &format!("/v1/projects/{}/allocations", owner.project_id),
        &owner.token,
        "key-1",
        json!({"name": "one"}),
    )
    .await;
    other_path.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(
        app.count("SELECT count(*) FROM projects WHERE name = 'two'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_request_that_failed_keeps_no_key_and_can_be_retried() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (bad, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "key-1",
        json!({"name": ""}),
    )
    .await;
    bad.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys").await, 0);
    let (fixed, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "key-1",
        json!({"name": "fixed"}),
    )
    .await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{:?}", fixed.body);
}

#[tokio::test]
async fn keys_belong_to_their_principal() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let admin = app.member(&owner, "admin").await;
    let stranger = app.tenant("globex").await;
    for (token, name) in [
        (&owner.token, "mine"),
        (&admin.token, "theirs"),
        (&stranger.token, "elsewhere"),
    ] {
        let (response, _) = post_with_key(
            &app,
            "/v1/projects",
            token,
            "shared-key",
            json!({"name": name}),
        )
        .await;
        assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
        assert!(response.headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(
        app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'shared-key'")
            .await,
        3
    );
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_running_is_a_409() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    // Hold the key's lock, as a first request still running would.
    let mut holder = app.database.admin().await;
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(format!(
            "idempotency|{}|user:{}|busy-key",
            owner.tenant_id, owner.user_id
        ))
        .execute(&mut holder)
        .await
        .unwrap();
    let (busy, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "busy-key",
        json!({"name": "busy"}),
    )
    .await;
    busy.assert_error(StatusCode::CONFLICT, "idempotency_key_in_use");
    assert_eq!(
        app.count("SELECT count(*) FROM projects WHERE name = 'busy'")
            .await,
        0
    );
}

#[tokio::test]
async fn concurrent_duplicates_create_one_allocation_and_reserve_once() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let uri = format!("/v1/projects/{}/allocations", owner.project_id);
    let body = json!({"name": "job", "flavor": "cpu.small"});
    let responses = futures::future::join_all(
        (0..6).map(|_| post_with_key(&app, &uri, &owner.token, "alloc-key", body.clone())),
    )
    .await;
    let mut ids = std::collections::HashSet::new();
    for (response, _) in &responses {
        match response.status {
            StatusCode::ACCEPTED => {
                ids.insert(response.body["id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => {
                response.assert_error(StatusCode::CONFLICT, "idempotency_key_in_use")
            }
            other => panic!("unexpected {other}: {:?}", response.body),
        }
    }
    assert_eq!(ids.len(), 1, "every success is the same allocation");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, 1);
    assert_eq!(
        app.count("SELECT sum(reserved_vcpus)::bigint FROM hosts")
            .await,
        1,
        "capacity reserved once (cpu.small has one vCPU)"
    );
}

#[tokio::test]
async fn bad_keys_are_refused_and_unauthenticated_requests_are_401() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (bad, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        &"k".repeat(256),
        json!({"name": "x"}),
    )
    .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "invalid_header");
    let (anonymous, _) =
        post_with_key(&app, "/v1/projects", "forged", "key", json!({"name": "x"})).await;
    anonymous.assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys").await, 0);
}

#[tokio::test]
async fn the_purge_deletes_keys_past_retention_and_never_keeps_less_than_a_day() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    for key in ["old", "recent"] {
        let (response, _) = post_with_key(
            &app,
            "/v1/projects",
            &owner.token,
            key,
            json!({"name": key}),
        )
        .await;
        assert_eq!(response.status, StatusCode::CREATED);
    }
    let mut admin = app.database.admin().await;
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - interval '2 hours' WHERE key = 'recent'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    // Asked for one hour, the purge still keeps a day.
    let deleted = keel_auth::idempotency::purge(&app.state.db, time::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'recent'")
            .await,
        1
    );
    // After the purge the old key is free again (a new request runs).
    let (again, _) = post_with_key(
        &app,
        "/v1/projects",
        &owner.token,
        "old",
        json!({"name": "old-again"}),
    )
    .await;
    assert_eq!(again.status, StatusCode::CREATED);
}

#[tokio::test]
async fn an_api_token_never_replays_what_its_users_session_did() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let uri = format!("/v1/projects/{}/allocations", owner.project_id);
    let body = json!({"name": "job", "flavor": "cpu.small"});
    let (by_session, _) = post_with_key(&app, &uri, &owner.token, "shared", body.clone()).await;
    assert_eq!(by_session.status, StatusCode::ACCEPTED);
    let created = app
        .post(
            "/v1/auth/api-tokens",
            Some(&owner.token),
            json!({"name": "ci"}),
        )
        .await;
    let exchanged = app
        .post(
            "/v1/auth/token",
            None,
            json!({"secret": created.body["secret"]}),
        )
        .await;
    let token = exchanged.body["access_token"].as_str().unwrap();
    let (by_token, _) = post_with_key(&app, &uri, token, "shared", body).await;
    assert_eq!(by_token.status, StatusCode::ACCEPTED);
    assert!(by_token.headers.get("idempotent-replayed").is_none());
    assert_ne!(by_token.body["id"], by_session.body["id"]);
}

#[tokio::test]
async fn a_response_holding_a_secret_is_never_stored_nor_replayed() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let body = json!({"name": "laptop"});
    let (first, _) = post_with_key(
        &app,
        "/v1/auth/api-tokens",
        &owner.token,
        "tok-1",
        body.clone(),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let (again, _) = post_with_key(&app, "/v1/auth/api-tokens", &owner.token, "tok-1", body).await;
    again.assert_error(StatusCode::CONFLICT, "idempotency_response_withheld");
    assert_eq!(app.count("SELECT count(*) FROM api_tokens").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'tok-1' AND response_body IS NULL AND status_code = 201")
            .await,
        1
    );
}

#[tokio::test]
async fn a_logged_out_session_cannot_replay() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let body = json!({"name": "research"});
    let (first, _) = post_with_key(&app, "/v1/projects", &owner.token, "k", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    app.post("/v1/auth/logout", Some(&owner.token), json!({}))
        .await;
    let (again, _) = post_with_key(&app, "/v1/projects", &owner.token, "k", body).await;
    again.assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}
