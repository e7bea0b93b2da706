//! Node enrolment: join tokens are single use, expire, and are exchanged
//! for a certificate built by the control plane.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use keel_db::RequestMeta;
use serde_json::{Value, json};

async fn join_token(app: &TestApp, ttl: time::Duration) -> String {
    keel_inventory::enrol::join_token_create(
        &app.state.db,
        RequestMeta::system("test", "test"),
        &app.state.node_channel,
        "local-1",
        ttl,
        None,
    )
    .await
    .unwrap()
    .token
}

fn enrol_body(token: &str, csr: &str) -> Value {
    json!({
        "join_token": token,
        "csr_pem": csr,
        "name": "node-1",
        "agent_url": "https://127.0.0.1:7443",
        "capacity": {"vcpus": 8, "memory_mib": 16384, "gpu_model": null, "gpu_count": 0}
    })
}

#[tokio::test]
async fn a_join_token_and_a_csr_enrol_a_ready_host_with_its_capacity() {
    let app = TestApp::spawn().await;
    let token = join_token(&app, time::Duration::hours(1)).await;
    let (csr, _key) = keel_pki::make_csr("node-1").unwrap();
    let enrolled = app
        .post("/v1/nodes/enrol", None, enrol_body(&token, &csr))
        .await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{:?}", enrolled.body);
    let node_id = enrolled.body["node_id"].as_str().unwrap();
    let certificate =
        keel_pki::certs_from_pem(enrolled.body["certificate_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        keel_pki::node_identity(&certificate[0])
            .unwrap()
            .to_string(),
        node_id
    );
    assert_eq!(
        enrolled.body["task_signing_keys"].as_array().unwrap().len(),
        1
    );
    assert!(
        enrolled.body["agent_api_url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    let mut admin = app.database.admin().await;
    let (state, vcpus): (String, i32) =
        sqlx::query_as("SELECT state, vcpus FROM hosts WHERE id = $1::uuid")
            .bind(node_id)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!((state.as_str(), vcpus), ("ready", 8));
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.enrol'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'host.enrolled'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_join_token_works_only_once() {
    let app = TestApp::spawn().await;
    let token = join_token(&app, time::Duration::hours(1)).await;
    let (csr, _) = keel_pki::make_csr("node-1").unwrap();
    assert_eq!(
        app.post("/v1/nodes/enrol", None, enrol_body(&token, &csr))
            .await
            .status,
        StatusCode::CREATED
    );
    app.post("/v1/nodes/enrol", None, enrol_body(&token, &csr))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_join_token");
    assert_eq!(app.count("SELECT count(*) FROM hosts").await, 1);
}

#[tokio::test]
async fn expired_wrong_and_malformed_tokens_are_refused_alike() {
    let app = TestApp::spawn().await;
    let (csr, _) = keel_pki::make_csr("node-1").unwrap();
    let expired = join_token(&app, time::Duration::seconds(-1)).await;
    let valid = join_token(&app, time::Duration::hours(1)).await;
    let (id, _) = valid.split_once('.').unwrap();
    for token in [
        expired,
        format!("{id}.wrong-secret"),
        "garbage".to_owned(),
        String::new(),
    ] {
        app.post("/v1/nodes/enrol", None, enrol_body(&token, &csr))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_join_token");
    }
    assert_eq!(app.count("SELECT count(*) FROM hosts").await, 0);
}

#[tokio::test]
async fn a_broken_csr_is_refused_and_does_not_use_up_the_token() {
    let app = TestApp::spawn().await;
    let token = join_token(&app, time::Duration::hours(1)).await;
    app.post(
        "/v1/nodes/enrol",
        None,
        enrol_body(
            &token,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_csr");
    let (csr, _) = keel_pki::make_csr("node-1").unwrap();
    assert_eq!(
        app.post("/v1/nodes/enrol", None, enrol_body(&token, &csr))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn bad_enrolment_fields_are_a_422() {
    let app = TestApp::spawn().await;
    let token = join_token(&app, time::Duration::hours(1)).await;
    let (csr, _) = keel_pki::make_csr("node-1").unwrap();
    let mut body = enrol_body(&token, &csr);
    body["agent_url"] = json!("http://plain:80");
    body["capacity"]["vcpus"] = json!(0);
    let response = app.post("/v1/nodes/enrol", None, body).await;
    response.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(response.body["fields"].as_array().unwrap().len(), 2);
}
