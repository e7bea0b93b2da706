//! Rate limits (per IP, per principal, token endpoints) and failed-login
//! throttling, through the whole router.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use common::{TestApp, TestResponse, relaxed_limits};
use keel_auth::limits::RateLimitConfig;
use serde_json::{Value, json};

const PASSWORD: &str = "a long enough password";

async fn post_from(app: &TestApp, ip: [u8; 4], uri: &str, body: Value) -> TestResponse {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 50_000))));
    app.send(request).await
}

fn assert_limited(response: &TestResponse) {
    response.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = response.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
}

#[tokio::test]
async fn the_token_endpoints_have_a_strict_per_ip_limit() {
    let app = TestApp::spawn_with_limits(RateLimitConfig {
        auth_per_minute: 1,
        auth_burst: 3,
        ..relaxed_limits()
    })
    .await;
    let body = json!({"email": "nobody@example.com", "password": "wrong password!"});
    for _ in 0..3 {
        post_from(&app, [192, 0, 2, 1], "/v1/auth/login", body.clone())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    assert_limited(&post_from(&app, [192, 0, 2, 1], "/v1/auth/login", body.clone()).await);
    assert_limited(
        &post_from(
            &app,
            [192, 0, 2, 1],
            "/v1/auth/refresh",
            json!({"refresh_token": "x"}),
        )
        .await,
    );
    // Another address has its own budget.
    post_from(&app, [192, 0, 2, 2], "/v1/auth/login", body)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn each_principal_has_its_own_budget() {
    let app = TestApp::spawn_with_limits(RateLimitConfig {
        principal_per_minute: 1,
        principal_burst: 4,
        ..relaxed_limits()
    })
    .await;
    let alice = app.tenant("alice").await;
    let bob = app.tenant("bob").await;
    for _ in 0..4 {
        assert_eq!(
            app.get("/v1/projects", Some(&alice.token)).await.status,
            StatusCode::OK
        );
    }
    assert_limited(&app.get("/v1/projects", Some(&alice.token)).await);
    assert_eq!(
        app.get("/v1/projects", Some(&bob.token)).await.status,
        StatusCode::OK
    );
    // Health checks are never limited.
    assert_eq!(app.get("/healthz", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn every_request_counts_against_its_ip() {
    let app = TestApp::spawn_with_limits(RateLimitConfig {
        ip_per_minute: 1,
        ip_burst: 2,
        ..relaxed_limits()
    })
    .await;
    for _ in 0..2 {
        post_from(&app, [192, 0, 2, 9], "/v1/projects", json!({"name": "x"}))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    assert_limited(&post_from(&app, [192, 0, 2, 9], "/v1/projects", json!({"name": "x"})).await);
    // A forged X-Forwarded-For is not trusted by default.
    let mut request = Request::builder()
        .method(Method::GET)
        .uri("/v1/flavors")
        .header("x-forwarded-for", "203.0.113.77")
        .body(Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 9], 50_000))));
    assert_limited(&app.send(request).await);
}

#[tokio::test]
async fn failed_logins_slow_the_ip_down_but_never_lock_the_owner_out() {
    let app = TestApp::spawn_with_limits(RateLimitConfig {
        login_free_failures: 2,
        login_account_max_delay_ms: 300,
        ..relaxed_limits()
    })
    .await;
    let victim = app.tenant("victim").await;
    let wrong = json!({"email": victim.email, "password": "not the password"});
    let attacker = [198, 51, 100, 1];
    for _ in 0..3 {
        post_from(&app, attacker, "/v1/auth/login", wrong.clone())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    // The attacker's address must now wait, even with the right password.
    let right = json!({"email": victim.email, "password": PASSWORD});
    assert_limited(&post_from(&app, attacker, "/v1/auth/login", right.clone()).await);
    // The owner, elsewhere, still gets in (answered a little slower).
    let started = std::time::Instant::now();
    let owner = post_from(&app, [203, 0, 113, 5], "/v1/auth/login", right).await;
    assert_eq!(owner.status, StatusCode::OK, "{:?}", owner.body);
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
}
