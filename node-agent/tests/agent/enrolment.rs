//! Enrolment against a stand-in api on plain HTTP that signs the CSR with a
//! real node CA, as the control plane does.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keel_agent::enrol::EnrolOptions;
use keel_agent::{AgentState, EnrolError, enrol};
use keel_pki::{CaKind, CertificateAuthority};
use keel_task::{TaskSigner, verifying_key_to_base64};
use uuid::Uuid;

use crate::support::ScratchDir;

const GOOD_TOKEN: &str = "token-id.token-secret";

struct StandInApi {
    node_ca: CertificateAuthority,
    control_plane_ca: CertificateAuthority,
    signer: TaskSigner,
    node_id: Uuid,
    requests: Mutex<Vec<serde_json::Value>>,
}

async fn enrol_endpoint(
    State(api): State<Arc<StandInApi>>,
    Json(request): Json<serde_json::Value>,
) -> Response {
    api.requests.lock().unwrap().push(request.clone());
    if request["join_token"] != GOOD_TOKEN {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({
                "code": "invalid_join_token",
                "message": "the join token is unknown, used or expired",
                "request_id": "req-123",
            })),
        )
            .into_response();
    }
    let csr_pem = request["csr_pem"].as_str().unwrap();
    let certificate = api
        .node_ca
        .sign_node_csr(csr_pem, api.node_id, time::Duration::hours(1))
        .unwrap();
    (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "node_id": api.node_id,
            "enrolment_epoch": 1,
            "certificate_pem": certificate.cert_pem,
            "node_ca_pem": api.node_ca.cert_pem(),
            "control_plane_ca_pem": api.control_plane_ca.cert_pem(),
            "task_signing_keys": [{
                "key_id": api.signer.key_id(),
                "public_key": verifying_key_to_base64(&api.signer.verifying_key()),
                "signs_from": 0,
                "ca_signature": vouch(&api.control_plane_ca, &api.signer, 0),
            }],
            "agent_api_url": "https://127.0.0.1:8443",
        })),
    )
        .into_response()
}

/// The control-plane CA's signature over a key, as the api publishes it.
fn vouch(ca: &CertificateAuthority, key: &TaskSigner, signs_from: i64) -> String {
    use base64::Engine as _;
    let statement = keel_task::key_statement(&key.verifying_key(), signs_from, None);
    base64::engine::general_purpose::STANDARD.encode(
        ca.sign_statement(keel_task::KEY_STATEMENT_DOMAIN, &statement)
            .unwrap(),
    )
}

/// Starts the stand-in api; returns it and its base URL.
async fn start_stand_in_api() -> (Arc<StandInApi>, String) {
    let api = Arc::new(StandInApi {
        node_ca: CertificateAuthority::generate(CaKind::Node).unwrap(),
        control_plane_ca: CertificateAuthority::generate(CaKind::ControlPlane).unwrap(),
        signer: TaskSigner::generate(),
        node_id: Uuid::new_v4(),
        requests: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/nodes/enrol", post(enrol_endpoint))
        .with_state(Arc::clone(&api));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, url)
}

fn options(api_url: &str, state_dir: &std::path::Path, pin: Option<String>) -> EnrolOptions {
    EnrolOptions {
        api_url: api_url.to_owned(),
        join_token: GOOD_TOKEN.to_owned(),
        state_dir: state_dir.to_path_buf(),
        listen: "127.0.0.1:7443".parse().unwrap(),
        name: "node-a".to_owned(),
        ca_fingerprint: pin,
        agent_url: None,
        reenrol: false,
    }
}

#[tokio::test]
async fn enrolment_with_the_right_pin_saves_a_state_the_agent_can_load() {
    let (api, api_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("enrol");
    let pin = api.control_plane_ca.fingerprint_sha256_hex().to_uppercase();

    let enrolled = enrol(&options(&api_url, &scratch.0, Some(pin)))
        .await
        .unwrap();

    assert_eq!(enrolled.node_id, api.node_id);
    assert_eq!(enrolled.enrolment_epoch, 1);
    let state = AgentState::load(&scratch.0).unwrap();
    assert_eq!(state.node.node_id, api.node_id);
    assert_eq!(state.node.agent_api_url, "https://127.0.0.1:8443");
    assert_eq!(state.node.listen, "127.0.0.1:7443".parse().unwrap());
    assert_eq!(state.signing_keys[0].key_id, api.signer.key_id());
    state.task_verifier().unwrap();

    let requests = api.requests.lock().unwrap();
    let request = &requests[0];
    assert_eq!(request["name"], "node-a");
    assert_eq!(request["agent_url"], "https://127.0.0.1:7443");
    assert!(request["capacity"]["vcpus"].as_u64().unwrap() >= 1);
    assert!(request["capacity"]["memory_mib"].as_u64().unwrap() > 0);
    assert_eq!(request["capacity"]["gpu_model"], serde_json::Value::Null);
    assert_eq!(request["capacity"]["gpu_count"], 0);
    // The private key never leaves the node: only a CSR does.
    assert!(!request.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_control_plane_ca_that_does_not_match_the_pin_aborts_without_saving() {
    let (_api, api_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("enrol");
    let other_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();

    let outcome = enrol(&options(
        &api_url,
        &scratch.0,
        Some(other_ca.fingerprint_sha256_hex()),
    ))
    .await;

    assert!(
        matches!(outcome, Err(EnrolError::FingerprintMismatch { .. })),
        "{outcome:?}"
    );
    assert!(!AgentState::is_enrolled(&scratch.0));
    assert!(!scratch.0.join("key.pem").exists());
}

#[tokio::test]
async fn an_api_error_is_reported_with_its_code_and_request_id() {
    let (_api, api_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("enrol");
    let mut options = options(&api_url, &scratch.0, None);
    options.join_token = "token-id.wrong-secret".to_owned();

    let error = enrol(&options).await.unwrap_err();

    let EnrolError::Refused {
        status,
        code,
        request_id,
        ..
    } = &error
    else {
        panic!("expected a refusal, got {error:?}");
    };
    assert_eq!(*status, 401);
    assert_eq!(code, "invalid_join_token");
    assert_eq!(request_id.as_deref(), Some("req-123"));
    assert!(error.to_string().contains("req-123"));
    assert!(!AgentState::is_enrolled(&scratch.0));
}

#[tokio::test]
async fn an_enrolled_directory_is_refused_before_the_token_is_spent() {
    let (api, api_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("enrol");
    enrol(&options(&api_url, &scratch.0, None)).await.unwrap();

    let outcome = enrol(&options(&api_url, &scratch.0, None)).await;

    assert!(
        matches!(
            outcome,
            Err(EnrolError::State(
                keel_agent::StateError::AlreadyEnrolled { .. }
            ))
        ),
        "{outcome:?}"
    );
    assert_eq!(api.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_https_api_url_is_refused_before_the_token_is_spent() {
    let scratch = ScratchDir::new("enrol");
    let outcome = enrol(&options("https://127.0.0.1:1", &scratch.0, None)).await;
    assert!(matches!(outcome, Err(EnrolError::UnsupportedApiUrl { .. })));
}

#[tokio::test]
async fn a_reenrolment_token_that_makes_this_machine_another_node_saves_nothing() {
    // This directory is node A; the stand-in api answers as node B (a
    // token made for another node).
    let (_first_api, first_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("reenrol-other");
    enrol(&options(&first_url, &scratch.0, None)).await.unwrap();
    let before = std::fs::read(scratch.0.join("node.json")).unwrap();
    let cert_before = std::fs::read(scratch.0.join("cert.pem")).unwrap();

    // Even with the other api's CA pinned on purpose.
    let (other_api, other_url) = start_stand_in_api().await;
    let pin = other_api.control_plane_ca.fingerprint_sha256_hex();
    let mut again = options(&other_url, &scratch.0, Some(pin));
    again.reenrol = true;
    let error = enrol(&again).await.unwrap_err();
    assert!(matches!(error, EnrolError::OtherNode { .. }), "{error}");
    assert_eq!(std::fs::read(scratch.0.join("node.json")).unwrap(), before);
    assert_eq!(
        std::fs::read(scratch.0.join("cert.pem")).unwrap(),
        cert_before
    );
}

#[tokio::test]
async fn a_reenrolment_of_the_same_node_replaces_its_identity_and_keeps_its_ledger() {
    let (api, url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("reenrol-same");
    enrol(&options(&url, &scratch.0, None)).await.unwrap();
    std::fs::write(scratch.0.join("high-water"), "41\n").unwrap();
    let cert_before = std::fs::read_to_string(scratch.0.join("cert.pem")).unwrap();

    let mut again = options(&url, &scratch.0, None);
    again.reenrol = true;
    let node = enrol(&again).await.unwrap();
    assert_eq!(node.node_id, api.node_id);
    let state = AgentState::load(&scratch.0).unwrap();
    assert_ne!(state.cert_pem, cert_before);
    assert_eq!(
        std::fs::read_to_string(scratch.0.join("high-water")).unwrap(),
        "41\n"
    );
    assert!(!scratch.0.join("renewal.json").exists());
}

#[tokio::test]
async fn a_reenrolment_without_a_pin_trusts_only_the_control_plane_ca_it_had() {
    let (_first_api, first_url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("reenrol-pin");
    enrol(&options(&first_url, &scratch.0, None)).await.unwrap();
    let ca_before = std::fs::read(scratch.0.join("control-plane-ca.pem")).unwrap();

    // Somebody else's api (a man in the middle of the plain-HTTP request).
    let (_impostor, impostor_url) = start_stand_in_api().await;
    let mut again = options(&impostor_url, &scratch.0, None);
    again.reenrol = true;
    let error = enrol(&again).await.unwrap_err();
    assert!(
        matches!(error, EnrolError::FingerprintMismatch { .. }),
        "{error}"
    );
    assert_eq!(
        std::fs::read(scratch.0.join("control-plane-ca.pem")).unwrap(),
        ca_before
    );
}

#[tokio::test]
async fn a_reenrolment_keeps_the_key_retirements_the_node_learned() {
    use base64::Engine as _;
    let (api, url) = start_stand_in_api().await;
    let scratch = ScratchDir::new("reenrol-keys");
    enrol(&options(&url, &scratch.0, None)).await.unwrap();
    // The node learned (over the channel) that the key retires at 100.
    let statement = keel_task::key_statement(&api.signer.verifying_key(), 0, Some(100));
    let signature = api
        .control_plane_ca
        .sign_statement(keel_task::KEY_STATEMENT_DOMAIN, &statement)
        .unwrap();
    let mut keys = AgentState::load(&scratch.0).unwrap().signing_keys;
    keys[0].retires_at = Some(100);
    keys[0].ca_signature = Some(base64::engine::general_purpose::STANDARD.encode(signature));
    keel_agent::state::save_signing_keys(&scratch.0, &keys).unwrap();

    // The enrolment answer lists the key as first published (no retirement).
    let mut again = options(&url, &scratch.0, None);
    again.reenrol = true;
    enrol(&again).await.unwrap();
    let state = AgentState::load(&scratch.0).unwrap();
    assert_eq!(state.signing_keys.len(), 1);
    assert_eq!(state.signing_keys[0].retires_at, Some(100));
}
