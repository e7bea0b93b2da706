//! The node channel at production depth, control-plane side: keys sealed by
//! the KMS in Postgres, task-signing key rotation with endorsements,
//! re-enrolment with epoch bumps, certificate renewal, and revocation
//! (operator endpoint, request checks, the handshake deny list) — the
//! agent listener is a real mutual-TLS server here.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::TestApp;
use keel_api::keys::ControlPlaneKeys;
use keel_auth::authz::PlatformRole;
use keel_db::RequestMeta;
use keel_http::tls::MtlsServer;
use keel_inventory::trust;
use keel_kms::{AnyKms, KmsConfig};
use keel_pki::DenyList;
use serde_json::{Value, json};

async fn join_token(app: &TestApp, for_host: Option<&str>) -> String {
    keel_inventory::enrol::join_token_create(
        &app.state.db,
        RequestMeta::system("test", "test"),
        &app.state.node_channel,
        "local-1",
        time::Duration::hours(1),
        for_host.map(|id| keel_core::ids::HostId::from(id.parse::<uuid::Uuid>().unwrap())),
    )
    .await
    .unwrap()
    .token
}

/// A node as its agent holds it after enrolment.
struct Node {
    id: String,
    epoch: i64,
    cert_pem: String,
    key_pem: String,
    body: Value,
}

async fn enrol(app: &TestApp, token: &str) -> Node {
    let (csr, key_pem) = keel_pki::make_csr("node-1").unwrap();
    let enrolled = app
        .post(
            "/v1/nodes/enrol",
            None,
            json!({
                "join_token": token,
                "csr_pem": csr,
                "name": "node-1",
                "agent_url": "https://127.0.0.1:7443",
                "capacity": {"vcpus": 8, "memory_mib": 16384, "disk_gib": 500}
            }),
        )
        .await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{:?}", enrolled.body);
    Node {
        id: enrolled.body["node_id"].as_str().unwrap().to_owned(),
        epoch: enrolled.body["enrolment_epoch"].as_i64().unwrap(),
        cert_pem: enrolled.body["certificate_pem"]
            .as_str()
            .unwrap()
            .to_owned(),
        key_pem,
        body: enrolled.body,
    }
}

/// The api's agent listener, served for real.
struct Listener {
    address: SocketAddr,
    deny_list: Arc<DenyList>,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn listener(app: &TestApp, max_age: Duration) -> Listener {
    let deny_list = Arc::new(DenyList::new(max_age));
    deny_list.replace(
        keel_inventory::nodes::revoked_serials(&app.state.db)
            .await
            .unwrap(),
    );
    let identity = app
        .keys
        .hot_service_identity("api", &app.config.agent.server_names)
        .unwrap();
    let tls = keel_api::agent_tls_config(&app.keys, identity, deny_list.clone()).unwrap();
    let server = MtlsServer::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        tls,
        keel_api::agent_app(app.state.clone()),
    )
    .await
    .unwrap();
    let address = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    Listener {
        address,
        deny_list,
        stop,
    }
}

impl Listener {
    async fn refresh(&self, app: &TestApp) {
        self.deny_list.replace(
            keel_inventory::nodes::revoked_serials(&app.state.db)
                .await
                .unwrap(),
        );
    }
}

/// A client presenting `cert_pem`/`key_pem`, one fresh connection per
/// client (so every call is a new handshake).
fn client(app: &TestApp, cert_pem: &str, key_pem: &str) -> reqwest::Client {
    let tls = keel_pki::client_config(
        &[app.keys.control_plane_ca.cert_der().clone()],
        cert_pem,
        key_pem,
    )
    .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_keys(
    app: &TestApp,
    listener: &Listener,
    cert: &str,
    key: &str,
) -> Result<reqwest::Response, reqwest::Error> {
    client(app, cert, key)
        .get(format!(
            "https://127.0.0.1:{}/v1/agent/signing-keys",
            listener.address.port()
        ))
        .send()
        .await
}

async fn renew(
    app: &TestApp,
    listener: &Listener,
    cert: &str,
    key: &str,
) -> Result<(reqwest::StatusCode, Value, String), reqwest::Error> {
    let (csr, new_key) = keel_pki::make_csr("node-1").unwrap();
    let response = client(app, cert, key)
        .post(format!(
            "https://127.0.0.1:{}/v1/agent/renew",
            listener.address.port()
        ))
        .json(&json!({ "csr_pem": csr }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Ok((status, body, new_key))
}

#[tokio::test]
async fn private_keys_are_stored_only_sealed_and_bound_to_their_row() {
    let app = TestApp::spawn().await;
    let mut admin = app.database.admin().await;
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT private_key_sealed FROM certificate_authorities
         UNION ALL SELECT private_key_sealed FROM task_signing_keys",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(sealed.len(), 3, "two CAs and one task-signing key");
    for envelope in &sealed {
        assert!(envelope.starts_with(b"KEV1"));
        assert!(
            !envelope
                .windows(b"PRIVATE KEY".len())
                .any(|window| window == b"PRIVATE KEY")
        );
    }

    // Another process with the same KMS loads the same CAs.
    let again = ControlPlaneKeys::load(&app.state.db, &app.kms)
        .await
        .unwrap();
    assert_eq!(
        again.node_ca.fingerprint_sha256_hex(),
        app.keys.node_ca.fingerprint_sha256_hex()
    );

    // A process with another master key opens nothing.
    let stranger = AnyKms::from_config(
        &KmsConfig::Local {
            master_key_file: std::env::temp_dir().join(format!(
                "keel-test-kms-{}.json",
                uuid::Uuid::new_v4().simple()
            )),
        },
        true,
    )
    .unwrap();
    assert!(
        ControlPlaneKeys::load(&app.state.db, &stranger)
            .await
            .is_err()
    );

    // One row's envelope moved into another row does not open there.
    sqlx::query(
        "UPDATE certificate_authorities SET private_key_sealed =
            (SELECT private_key_sealed FROM certificate_authorities WHERE kind = 'control-plane')
          WHERE kind = 'node'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let swapped = ControlPlaneKeys::load(&app.state.db, &app.kms).await;
    let message = format!("{:#}", swapped.err().unwrap());
    assert!(message.contains("could not be decrypted"), "{message}");
}

#[tokio::test]
async fn a_master_key_rotation_keeps_old_envelopes_open_and_rewrap_moves_them() {
    let app = TestApp::spawn().await;
    let KmsConfig::Local { master_key_file } = &app.config.kms else {
        unreachable!("tests use the local KMS");
    };
    let old_key = match keel_kms::LocalKms::open(master_key_file) {
        Ok(local) => local.current_key_id().to_owned(),
        Err(error) => panic!("{error}"),
    };
    let mut local = keel_kms::LocalKms::open(master_key_file).unwrap();
    let new_key = local.rotate().unwrap();
    let rotated = AnyKms::Local(keel_kms::LocalKms::open(master_key_file).unwrap());

    // Old envelopes still open; every stored key is still under the old one.
    ControlPlaneKeys::load(&app.state.db, &rotated)
        .await
        .unwrap();
    assert_eq!(
        trust::master_key_usage(&app.state.db).await.unwrap(),
        vec![(old_key, 3)]
    );

    let count = trust::rewrap(&app.state.db, &rotated, RequestMeta::system("test", "t"))
        .await
        .unwrap();
    assert_eq!(count, 3);
    assert_eq!(
        trust::master_key_usage(&app.state.db).await.unwrap(),
        vec![(new_key, 3)]
    );
    let reloaded = ControlPlaneKeys::load(&app.state.db, &rotated)
        .await
        .unwrap();
    assert_eq!(
        reloaded.node_ca.fingerprint_sha256_hex(),
        app.keys.node_ca.fingerprint_sha256_hex()
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'kms.rewrap'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_rotated_task_signing_key_is_vouched_for_signs_after_the_overlap_and_retires_the_old() {
    let app = TestApp::spawn().await;
    let db = &app.state.db;
    let ca = &app.keys.control_plane_ca;
    let before = trust::signers(db, &app.kms).await.unwrap();
    assert_eq!(before.len(), 1);
    let old_id = before[0].signer.key_id().to_owned();
    let rotate = |overlap: time::Duration| {
        trust::rotate_signing_key(db, &app.kms, ca, RequestMeta::system("test", "t"), overlap)
    };

    assert!(matches!(
        rotate(time::Duration::seconds(60)).await,
        Err(trust::TrustError::InvalidOverlap)
    ));
    let overlap = time::Duration::minutes(10);
    let new = rotate(overlap).await.unwrap();
    // One rotation at a time: the next waits until this key signs.
    assert!(matches!(
        rotate(overlap).await,
        Err(trust::TrustError::RotationPending(pending)) if pending == new.key_id
    ));

    let signers = trust::signers(db, &app.kms).await.unwrap();
    assert_eq!(signers.len(), 2);
    let now = time::OffsetDateTime::now_utc();
    // The old key signs until the new one's time comes; then the new one.
    assert_eq!(
        trust::current_signer(&signers, now).unwrap().key_id(),
        old_id
    );
    let later = now + overlap + time::Duration::seconds(2);
    assert_eq!(
        trust::current_signer(&signers, later).unwrap().key_id(),
        new.key_id
    );
    let old_row = signers
        .iter()
        .find(|key| key.signer.key_id() == old_id)
        .unwrap();
    assert_eq!(
        old_row.retires_at.unwrap().unix_timestamp(),
        new.signs_from + overlap.whole_seconds()
    );

    // Every key and its retirement carry the control-plane CA's signature,
    // over exactly what is published; another CA's key verifies nothing.
    let mut tx = db.begin_bookkeeping().await.unwrap();
    let published = trust::published_signing_keys(&mut tx).await.unwrap();
    drop(tx);
    assert_eq!(published.len(), 2);
    let stranger =
        keel_pki::CertificateAuthority::generate(keel_pki::CaKind::ControlPlane).unwrap();
    for key in &published {
        let public = keel_task::verifying_key_from_base64(&key.public_key).unwrap();
        let statement = keel_task::key_statement(&public, key.signs_from, key.retires_at);
        let signature = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &key.ca_signature,
        )
        .unwrap();
        let verify = |der: &[u8], statement: &[u8]| {
            keel_pki::verify_statement(der, keel_task::KEY_STATEMENT_DOMAIN, statement, &signature)
        };
        assert!(verify(ca.cert_der(), &statement));
        assert!(!verify(stranger.cert_der(), &statement));
        let unretired = keel_task::key_statement(&public, key.signs_from, None);
        if key.retires_at.is_some() {
            assert!(
                !verify(ca.cert_der(), &unretired),
                "a retirement cannot be undone"
            );
        }
    }
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'task_signing_key.rotate'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_worker_s_signer_ring_picks_up_a_rotation_on_reload() {
    let app = TestApp::spawn().await;
    let ring = keel_provisioning::signing::SignerRing::load(&app.state.db, &app.kms)
        .await
        .unwrap();
    trust::rotate_signing_key(
        &app.state.db,
        &app.kms,
        &app.keys.control_plane_ca,
        RequestMeta::system("test", "t"),
        time::Duration::minutes(10),
    )
    .await
    .unwrap();
    ring.reload(&app.state.db, &app.kms).await.unwrap();
    assert_eq!(ring.len(), 2);
}

#[tokio::test]
async fn re_enrolment_keeps_the_node_bumps_its_epoch_and_supersedes_its_certificates() {
    let app = TestApp::spawn().await;
    let first = enrol(&app, &join_token(&app, None).await).await;
    assert_eq!(first.epoch, 1);
    let keys = first.body["task_signing_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0]["signs_from"].is_i64());

    let token = join_token(&app, Some(&first.id)).await;
    let second = enrol(&app, &token).await;
    assert_eq!(second.id, first.id, "the node keeps its id");
    assert_eq!(second.epoch, 2);
    assert_eq!(app.count("SELECT count(*) FROM hosts").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM node_certificates WHERE revoked_at IS NOT NULL")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.reenrol'")
            .await,
        1
    );

    // The superseded certificate is refused at the handshake and per request.
    let listener = listener(&app, Duration::from_secs(60)).await;
    assert!(
        get_keys(&app, &listener, &first.cert_pem, &first.key_pem)
            .await
            .is_err()
    );
    listener.deny_list.replace(Vec::new());
    let stale_cert = get_keys(&app, &listener, &first.cert_pem, &first.key_pem)
        .await
        .unwrap();
    assert_eq!(stale_cert.status(), reqwest::StatusCode::FORBIDDEN);
    let current = get_keys(&app, &listener, &second.cert_pem, &second.key_pem)
        .await
        .unwrap();
    assert_eq!(current.status(), reqwest::StatusCode::OK);
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn a_revoked_node_cannot_re_enrol_and_unknown_nodes_get_no_token() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let early_token = join_token(&app, Some(&node.id)).await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let revoked = app
        .post(
            &format!("/v1/admin/hosts/{}/revoke", node.id),
            Some(&operator),
            json!({}),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);

    let (csr, _) = keel_pki::make_csr("node-1").unwrap();
    app.post(
        "/v1/nodes/enrol",
        None,
        json!({
            "join_token": early_token, "csr_pem": csr, "name": "node-1",
            "agent_url": "https://127.0.0.1:7443", "capacity": {"vcpus": 8, "memory_mib": 16384}
        }),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_join_token");
    for host in [node.id.clone(), uuid::Uuid::new_v4().to_string()] {
        let refused = keel_inventory::enrol::join_token_create(
            &app.state.db,
            RequestMeta::system("test", "test"),
            &app.state.node_channel,
            "local-1",
            time::Duration::hours(1),
            Some(keel_core::ids::HostId::from(
                host.parse::<uuid::Uuid>().unwrap(),
            )),
        )
        .await;
        assert!(matches!(
            refused,
            Err(keel_inventory::InventoryError::HostNotFound)
        ));
    }
}

#[tokio::test]
async fn a_node_renews_with_a_new_key_and_the_old_certificate_keeps_working() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_secs(60)).await;

    let (status, body, new_key) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{body:?}");
    let new_cert = body["certificate_pem"].as_str().unwrap();
    assert_ne!(new_cert, node.cert_pem);
    let der = keel_pki::certs_from_pem(new_cert).unwrap();
    assert_eq!(
        keel_pki::node_identity(&der[0]).unwrap().to_string(),
        node.id
    );

    for (cert, key) in [
        (new_cert, new_key.as_str()),
        (&node.cert_pem, &node.key_pem),
    ] {
        let response = get_keys(&app, &listener, cert, key).await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let keys: Value = response.json().await.unwrap();
        assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    }
    assert_eq!(app.count("SELECT count(*) FROM node_certificates").await, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.certificate_renew'")
            .await,
        1
    );

    // The superseded certificate still serves requests until it expires,
    // but it cannot renew: a stolen older key cannot extend itself.
    let (status, body, _) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{body:?}");
    assert_eq!(body["code"], "forbidden_peer");

    // A CSR that is not one is refused and changes nothing.
    let response = client(&app, new_cert, &new_key)
        .post(format!(
            "https://127.0.0.1:{}/v1/agent/renew",
            listener.address.port()
        ))
        .json(&json!({ "csr_pem": "not a csr" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.count("SELECT count(*) FROM node_certificates").await, 2);
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn a_renewal_whose_answer_was_lost_can_be_asked_again_until_the_new_certificate_is_used() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_secs(60)).await;

    // The first answer never reaches the node.
    let (status, lost, lost_key) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{lost:?}");
    let lost_cert = lost["certificate_pem"].as_str().unwrap().to_owned();

    // The node asks again with the certificate it still has, and gets one.
    let (status, body, new_key) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{body:?}");
    let new_cert = body["certificate_pem"].as_str().unwrap().to_owned();
    assert_eq!(
        app.count("SELECT count(*) FROM node_certificates WHERE revoked_at IS NOT NULL")
            .await,
        1,
        "the unused answer is revoked"
    );
    let refused = get_keys(&app, &listener, &lost_cert, &lost_key)
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);
    listener.refresh(&app).await;
    assert!(
        get_keys(&app, &listener, &lost_cert, &lost_key)
            .await
            .is_err()
    );

    // Once the new certificate has been used, the old one renews no more.
    let response = get_keys(&app, &listener, &new_cert, &new_key)
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let (status, body, _) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{body:?}");
    let (status, body, _) = renew(&app, &listener, &new_cert, &new_key).await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{body:?}");
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn revoking_a_node_refuses_its_requests_renewals_and_handshakes() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let other = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_secs(60)).await;

    // Who may revoke: operators, not read-only operators, not tenants.
    let path = format!("/v1/admin/hosts/{}/revoke", node.id);
    let (_, read_only) = app.operator(PlatformRole::ReadOnlyOperator).await;
    app.post(&path, Some(&read_only), json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let tenant = app.tenant("acme").await;
    app.post(&path, Some(&tenant.token), json!({}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    app.post(
        &format!("/v1/admin/hosts/{}/revoke", uuid::Uuid::new_v4()),
        Some(&operator),
        json!({}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");

    let revoked = app.post(&path, Some(&operator), json!({})).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert!(revoked.body["revoked_at"].is_string());
    assert_eq!(revoked.body["state"], "offline");

    // At once, before the deny list reloads: every request is refused.
    let response = get_keys(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
    let (status, _, _) = renew(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);

    // After the reload, the handshake itself fails; other nodes are fine.
    listener.refresh(&app).await;
    assert!(
        get_keys(&app, &listener, &node.cert_pem, &node.key_pem)
            .await
            .is_err()
    );
    let fine = get_keys(&app, &listener, &other.cert_pem, &other.key_pem)
        .await
        .unwrap();
    assert_eq!(fine.status(), reqwest::StatusCode::OK);

    // Revoking again changes nothing.
    let again = app.post(&path, Some(&operator), json!({})).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["revoked_at"], revoked.body["revoked_at"]);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.revoke'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'host.revoked'")
            .await,
        1
    );
    let listed = app.get("/v1/admin/hosts", Some(&read_only)).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn a_stale_deny_list_refuses_every_node() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        get_keys(&app, &listener, &node.cert_pem, &node.key_pem)
            .await
            .is_err()
    );
    // The same client gets in as soon as the list is fresh again.
    listener.refresh(&app).await;
    let fresh = get_keys(&app, &listener, &node.cert_pem, &node.key_pem)
        .await
        .unwrap();
    assert_eq!(fresh.status(), reqwest::StatusCode::OK);
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn the_allocations_of_a_revoked_host_fail_and_release_their_capacity() {
    let app = TestApp::spawn().await;
    let host = app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &format!("/v1/projects/{}/allocations", tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-1", "flavor": "cpu.medium"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{:?}", created.body);
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let revoked = app
        .post(
            &format!("/v1/admin/hosts/{host}/revoke"),
            Some(&operator),
            json!({}),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);

    // What the worker does on `host.revoked` (run twice: idempotent).
    for expected in [1, 0] {
        let mut tx = app
            .state
            .db
            .begin_system(RequestMeta::system("test", "t"))
            .await
            .unwrap();
        let failed = keel_provisioning::service::fail_allocations_of_revoked_host(
            &mut tx,
            keel_core::ids::HostId::from(host),
        )
        .await
        .unwrap();
        assert_eq!(failed, expected);
        tx.commit(keel_db::Audit::new(
            "test",
            None,
            keel_core::ResourceName::new(None, None, None, "host", host),
        ))
        .await
        .unwrap();
    }
    let allocation = app
        .get(
            &format!(
                "/v1/projects/{}/allocations/{}",
                tenant.project_id,
                created.body["id"].as_str().unwrap()
            ),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(allocation.body["state"], "failed");
    assert_eq!(
        allocation.body["failure_reason"],
        "the host was revoked by an operator"
    );
    assert_eq!(
        app.count("SELECT reserved_vcpus::bigint FROM hosts").await,
        0
    );
}

async fn heartbeat(
    app: &TestApp,
    listener: &Listener,
    node: &Node,
    body: Value,
) -> reqwest::StatusCode {
    client(app, &node.cert_pem, &node.key_pem)
        .post(format!(
            "https://127.0.0.1:{}/v1/agent/heartbeat",
            listener.address.port()
        ))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn heartbeats_keep_a_host_seen_and_update_its_capacity() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_secs(60)).await;
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE hosts SET last_seen_at = now() - interval '1 hour'")
        .execute(&mut admin)
        .await
        .unwrap();

    let same =
        json!({"capacity": {"vcpus": 8, "memory_mib": 16384, "disk_gib": 500}, "workloads": []});
    assert_eq!(
        heartbeat(&app, &listener, &node, same).await,
        reqwest::StatusCode::NO_CONTENT
    );
    let recent: bool =
        sqlx::query_scalar("SELECT last_seen_at > now() - interval '1 minute' FROM hosts")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(recent);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action LIKE 'host.capacity%'")
            .await,
        0,
        "an unchanged heartbeat is not audited"
    );

    let bigger = json!({"capacity": {"vcpus": 16, "memory_mib": 32768, "disk_gib": 500,
                                     "gpu_model": "nvidia-a100", "gpu_count": 2}});
    assert_eq!(
        heartbeat(&app, &listener, &node, bigger).await,
        reqwest::StatusCode::NO_CONTENT
    );
    let capacity: (i32, i64, i64, Option<String>, i32) =
        sqlx::query_as("SELECT vcpus, memory_mib, disk_gib, gpu_model, gpu_count FROM hosts")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(
        capacity,
        (16, 32768, 500, Some("nvidia-a100".to_owned()), 2)
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.capacity_change'")
            .await,
        1
    );

    // Nonsense is refused and changes nothing.
    for bad in [
        json!({"capacity": {"vcpus": 0, "memory_mib": 1}}),
        json!({"capacity": {"vcpus": 1, "memory_mib": 1, "gpu_count": 3}}),
        json!({"capacity": {"vcpus": 1, "memory_mib": 1}, "surprise": true}),
        json!({"capacity": {"vcpus": 1, "memory_mib": 1}, "workloads": [{"allocation_id": "x"}]}),
    ] {
        let status = heartbeat(&app, &listener, &node, bad).await;
        assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    }
    let vcpus: i32 = sqlx::query_scalar("SELECT vcpus FROM hosts")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(vcpus, 16);
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn a_silent_host_goes_offline_with_its_allocations_lost_and_comes_back_with_them() {
    let app = TestApp::spawn().await;
    let node = enrol(&app, &join_token(&app, None).await).await;
    let listener = listener(&app, Duration::from_secs(60)).await;
    let tenant = app.tenant("acme").await;
    let mut ids = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let created = app
            .post(
                &format!("/v1/projects/{}/allocations", tenant.project_id),
                Some(&tenant.token),
                json!({"name": name, "flavor": "cpu.small"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::ACCEPTED, "{:?}", created.body);
        ids.push(created.body["id"].as_str().unwrap().to_owned());
    }
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE allocations SET state = 'running'")
        .execute(&mut admin)
        .await
        .unwrap();
    // The third one's start task is still on its way: not lost.
    sqlx::query("UPDATE allocations SET state = 'provisioning' WHERE id = $1::uuid")
        .bind(&ids[2])
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("UPDATE hosts SET last_seen_at = now() - interval '5 minutes', state = 'cordoned'")
        .execute(&mut admin)
        .await
        .unwrap();

    let sweep = || async {
        keel_provisioning::liveness::mark_silent_hosts_offline(
            &app.state.db,
            RequestMeta::system("test", "t"),
            time::Duration::seconds(90),
        )
        .await
        .unwrap()
    };
    assert_eq!(sweep().await, 1);
    assert_eq!(sweep().await, 0, "a second sweep finds nothing");
    let (state, before): (String, Option<String>) =
        sqlx::query_as("SELECT state, state_before_offline FROM hosts")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), before.as_deref()),
        ("offline", Some("cordoned"))
    );
    assert_eq!(
        app.count("SELECT count(*) FROM allocations WHERE state = 'lost' AND reserved")
            .await,
        2,
        "lost allocations keep their capacity"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM allocations WHERE state = 'provisioning'")
            .await,
        1
    );
    // Once its start task has expired with the host still away, it is lost
    // too.
    sqlx::query(
        "UPDATE allocations SET updated_at = now() - interval '6 minutes' WHERE id = $1::uuid",
    )
    .bind(&ids[2])
    .execute(&mut admin)
    .await
    .unwrap();
    assert_eq!(sweep().await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM allocations WHERE state = 'lost'")
            .await,
        3
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'host.offline'")
            .await,
        1
    );
    let seen = app
        .get(
            &format!("/v1/projects/{}/allocations/{}", tenant.project_id, ids[0]),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(seen.body["state"], "lost");

    // The host returns and says it runs the first allocation only.
    let status = heartbeat(
        &app,
        &listener,
        &node,
        json!({"capacity": {"vcpus": 8, "memory_mib": 16384},
               "workloads": [{"allocation_id": ids[0]}]}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    let state: String = sqlx::query_scalar("SELECT state FROM hosts")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(state, "cordoned", "it comes back as it was");
    for (id, expected) in [(&ids[0], "running"), (&ids[1], "lost")] {
        let state: String = sqlx::query_scalar("SELECT state FROM allocations WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(state, expected);
    }
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.online'")
            .await,
        1
    );
    let _ = listener.stop.send(());
}

#[tokio::test]
async fn two_apis_starting_at_once_create_one_set_of_keys() {
    let database = keel_testing::test_db().await;
    let config = common::test_config(&database);
    let kms = keel_api::keys::kms(&config, true).unwrap();
    let (first, second) = tokio::join!(
        ControlPlaneKeys::load_or_create(&database.db, &kms),
        ControlPlaneKeys::load_or_create(&database.db, &kms),
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(
        first.node_ca.fingerprint_sha256_hex(),
        second.node_ca.fingerprint_sha256_hex()
    );
    assert_eq!(
        first.control_plane_ca.fingerprint_sha256_hex(),
        second.control_plane_ca.fingerprint_sha256_hex()
    );
    let mut admin = database.admin().await;
    let (authorities, keys): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM certificate_authorities), (SELECT count(*) FROM task_signing_keys)",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((authorities, keys), (2, 1));
    if let KmsConfig::Local { master_key_file } = &config.kms {
        let _ = std::fs::remove_file(master_key_file);
    }
}
