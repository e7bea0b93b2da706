//! Who may talk to the agent, and which tasks it acts on, proven over real
//! mutual TLS against a running agent.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use keel_pki::{CaKind, CertificateAuthority};
use keel_task::{TaskEnvelope, TaskSigner};
use reqwest::StatusCode;
use uuid::Uuid;

use crate::support::{Credentials, Fixture, now_unix, start, stop};

fn edit_envelope(envelope_bytes: &[u8], edit: impl FnOnce(&mut TaskEnvelope)) -> Vec<u8> {
    let mut envelope: TaskEnvelope = serde_json::from_slice(envelope_bytes).unwrap();
    edit(&mut envelope);
    envelope.to_json_bytes().unwrap()
}

fn assert_rejected((status, body): (StatusCode, serde_json::Value), expected_code: &str) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], expected_code, "{body}");
    assert!(body["message"].is_string(), "{body}");
}

#[tokio::test]
async fn a_worker_with_a_good_task_is_answered_with_accepted() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let payload = fixture.payload(1, stop(Uuid::new_v4()));

    let (status, body) = agent
        .post_task(&fixture.worker_client(), fixture.sign(&payload))
        .await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({ "task_id": payload.task_id, "status": "accepted" })
    );
    assert_eq!(agent.agent.inbox().high_water().await, 1);
    // Stopping an unknown allocation is reported as terminated right away.
    assert_eq!(
        agent.next_report().await.allocation_id,
        payload.operation.allocation_id()
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_cannot_complete_a_request() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let payload = fixture.payload(1, stop(Uuid::new_v4()));

    let outcome = fixture
        .client_without_certificate()
        .post(agent.tasks_url())
        .body(fixture.sign(&payload))
        .send()
        .await;

    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}

#[tokio::test]
async fn a_worker_certificate_from_another_control_plane_ca_is_refused_in_the_handshake() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let impostor_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
    let (certificate, key_pem) = impostor_ca
        .issue_control_plane_client("worker", time::Duration::hours(1))
        .unwrap();
    let impostor = fixture.client_presenting(&Credentials {
        cert_pem: certificate.cert_pem,
        key_pem,
    });

    let outcome = impostor
        .post(agent.tasks_url())
        .body(fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))))
        .send()
        .await;

    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}

#[tokio::test]
async fn a_node_certificate_is_refused_as_a_client_even_from_our_own_node_ca() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    // The agent's own certificate and key: valid, ours, but the wrong root.
    let node_client = fixture.client_presenting(&Credentials {
        cert_pem: fixture.state.cert_pem.clone(),
        key_pem: fixture.state.key_pem.clone(),
    });

    let outcome = node_client
        .post(agent.tasks_url())
        .body(fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))))
        .send()
        .await;

    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn a_control_plane_component_other_than_the_worker_is_forbidden() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let (certificate, key_pem) = fixture
        .control_plane_ca
        .issue_control_plane_client("api", time::Duration::hours(1))
        .unwrap();
    let api_client = fixture.client_presenting(&Credentials {
        cert_pem: certificate.cert_pem,
        key_pem,
    });

    let (status, body) = agent
        .post_task(
            &api_client,
            fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))),
        )
        .await;

    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["code"], "forbidden_peer");
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}

#[tokio::test]
async fn an_unsigned_task_is_rejected_and_nothing_happens() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let envelope = edit_envelope(
        &fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))),
        |envelope| envelope.sig = String::new(),
    );

    assert_rejected(
        agent.post_task(&fixture.worker_client(), envelope).await,
        "bad_signature",
    );
    assert_eq!(agent.agent.inbox().high_water().await, 0);
    agent.assert_no_pending_report();
}

#[tokio::test]
async fn a_task_with_one_flipped_bit_is_rejected() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let envelope = edit_envelope(
        &fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))),
        |envelope| {
            let mut payload_bytes = BASE64_STANDARD.decode(&envelope.payload).unwrap();
            payload_bytes[10] ^= 0x01;
            envelope.payload = BASE64_STANDARD.encode(payload_bytes);
        },
    );

    assert_rejected(
        agent.post_task(&fixture.worker_client(), envelope).await,
        "bad_signature",
    );
    agent.assert_no_pending_report();
}

#[tokio::test]
async fn a_task_signed_by_an_unknown_key_is_rejected() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let stranger = TaskSigner::generate();
    let envelope = stranger
        .sign_to_bytes(&fixture.payload(1, stop(Uuid::new_v4())))
        .unwrap();

    assert_rejected(
        agent.post_task(&fixture.worker_client(), envelope).await,
        "unknown_key",
    );
}

#[tokio::test]
async fn a_task_for_another_node_is_rejected() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let mut payload = fixture.payload(1, stop(Uuid::new_v4()));
    payload.node_id = Uuid::new_v4();

    assert_rejected(
        agent
            .post_task(&fixture.worker_client(), fixture.sign(&payload))
            .await,
        "wrong_node",
    );
}

#[tokio::test]
async fn a_task_for_another_enrolment_epoch_is_rejected() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let mut payload = fixture.payload(1, stop(Uuid::new_v4()));
    payload.enrolment_epoch += 1;

    assert_rejected(
        agent
            .post_task(&fixture.worker_client(), fixture.sign(&payload))
            .await,
        "wrong_epoch",
    );
}

#[tokio::test]
async fn an_expired_task_is_rejected() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let now = now_unix();
    let mut payload = fixture.payload(1, stop(Uuid::new_v4()));
    payload.issued_at = now - 600;
    payload.not_before = now - 600;
    payload.expires_at = now - 120;

    assert_rejected(
        agent
            .post_task(&fixture.worker_client(), fixture.sign(&payload))
            .await,
        "expired",
    );
}

#[tokio::test]
async fn an_oversized_body_is_rejected_before_verification() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;

    let (status, body) = agent
        .post_task(&fixture.worker_client(), vec![b' '; 64 * 1024 + 1])
        .await;

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "too_large");
}

#[tokio::test]
async fn a_replayed_task_is_rejected_also_after_the_agent_restarts() {
    let fixture = Fixture::new();
    let worker = fixture.worker_client();
    let first = fixture.sign(&fixture.payload(1, stop(Uuid::new_v4())));
    let second = fixture.sign(&fixture.payload(2, stop(Uuid::new_v4())));

    let agent = fixture.start_agent().await;
    assert_eq!(
        agent.post_task(&worker, first.clone()).await.0,
        StatusCode::OK
    );
    assert_rejected(agent.post_task(&worker, first.clone()).await, "replayed");
    assert_eq!(
        agent.post_task(&worker, second.clone()).await.0,
        StatusCode::OK
    );
    agent.agent.shutdown().await;

    let restarted = fixture.start_agent().await;
    assert_eq!(restarted.agent.inbox().high_water().await, 2);
    assert_rejected(restarted.post_task(&worker, second).await, "replayed");
    assert_rejected(restarted.post_task(&worker, first).await, "replayed");
    let third = fixture.sign(&fixture.payload(3, stop(Uuid::new_v4())));
    assert_eq!(restarted.post_task(&worker, third).await.0, StatusCode::OK);
}

#[tokio::test]
async fn two_concurrent_tasks_with_the_same_sequence_number_are_accepted_once() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let worker_a = fixture.worker_client();
    let worker_b = fixture.worker_client();
    let task_a = fixture.sign(&fixture.payload(1, stop(Uuid::new_v4())));
    let task_b = fixture.sign(&fixture.payload(1, stop(Uuid::new_v4())));

    let (outcome_a, outcome_b) = tokio::join!(
        agent.post_task(&worker_a, task_a),
        agent.post_task(&worker_b, task_b)
    );

    let mut statuses = [outcome_a.0, outcome_b.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::UNPROCESSABLE_ENTITY]);
    let log = std::fs::read_to_string(fixture.state_dir().join("tasks.log")).unwrap();
    assert_eq!(log.lines().count(), 1);
}

#[tokio::test]
async fn an_accepted_task_is_logged_durably_before_it_is_answered() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();
    let payload = fixture.payload(7, stop(allocation_id));

    let (status, _) = agent
        .post_task(&fixture.worker_client(), fixture.sign(&payload))
        .await;

    assert_eq!(status, StatusCode::OK);
    let high_water = std::fs::read_to_string(fixture.state_dir().join("high-water")).unwrap();
    assert_eq!(high_water.trim(), "7");
    let log = std::fs::read_to_string(fixture.state_dir().join("tasks.log")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(entry["seq"], 7);
    assert_eq!(entry["task_id"], payload.task_id.to_string());
    assert_eq!(entry["allocation_id"], allocation_id.to_string());
    assert_eq!(entry["op"], "stop_workload");
    assert!(entry["accepted_at"].is_string());
}

#[tokio::test]
async fn an_expired_worker_certificate_is_refused_in_the_handshake() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let (certificate, key_pem) = fixture
        .control_plane_ca
        .issue_control_plane_client("worker", time::Duration::seconds(1))
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let expired = fixture.client_presenting(&Credentials {
        cert_pem: certificate.cert_pem,
        key_pem,
    });

    let outcome = expired
        .post(agent.tasks_url())
        .body(fixture.sign(&fixture.payload(1, stop(Uuid::new_v4()))))
        .send()
        .await;

    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}

#[tokio::test]
async fn a_task_naming_another_tenant_than_the_workload_s_is_rejected() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let worker = fixture.worker_client();
    let allocation_id = Uuid::new_v4();
    let (status, _) = agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sleep", "30"]))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        agent.next_report().await,
        keel_agent::WorkloadReport::running(allocation_id)
    );

    let mut foreign = fixture.payload(2, stop(allocation_id));
    foreign.tenant_id = Some(Uuid::new_v4());
    assert_rejected(
        agent.post_task(&worker, fixture.sign(&foreign)).await,
        "wrong_tenant",
    );
    assert_eq!(
        agent.agent.inbox().high_water().await,
        1,
        "nothing recorded"
    );
    assert!(
        agent.driver.pid_of(allocation_id).is_some(),
        "still running"
    );

    let (status, _) = agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(3, stop(allocation_id))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        agent.next_report().await,
        keel_agent::WorkloadReport::terminated(allocation_id)
    );
}

/// A grant to open a terminal into `allocation_id`.
fn terminal_grant(allocation_id: Uuid) -> keel_task::Operation {
    keel_task::Operation::OpenTerminal {
        allocation_id,
        session_id: Uuid::new_v4(),
        max_secs: 60,
    }
}

#[tokio::test]
async fn a_terminal_grant_is_no_task_and_opens_nothing_at_the_task_endpoint() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let grant = fixture.sign(&fixture.payload(1, terminal_grant(Uuid::new_v4())));

    assert_rejected(
        agent.post_task(&fixture.worker_client(), grant).await,
        "not_a_task",
    );
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}

#[tokio::test]
async fn terminal_grants_come_from_the_api_name_the_workload_s_tenant_and_work_once() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let (certificate, key_pem) = fixture
        .control_plane_ca
        .issue_control_plane_client("api", time::Duration::hours(1))
        .unwrap();
    let api_client = fixture.client_presenting(&Credentials {
        cert_pem: certificate.cert_pem,
        key_pem,
    });
    let terminal_url = agent.tasks_url().replace("/v1/tasks", "/v1/terminal");
    let open = |client: &reqwest::Client, grant: &[u8]| {
        let request = client
            .get(&terminal_url)
            .header("x-keel-terminal-grant", BASE64_STANDARD.encode(grant));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let allocation_id = Uuid::new_v4();
    let grant = fixture.sign(&fixture.payload(1, terminal_grant(allocation_id)));

    // The worker may not open terminals.
    let (status, body) = open(&fixture.worker_client(), &grant).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "forbidden_peer");
    // Nothing runs for that allocation yet.
    let (status, body) = open(&api_client, &grant).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "not_running");

    let (status, body) = agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sleep", "30"]))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        agent.next_report().await.state,
        keel_agent::reports::WorkloadState::Running
    );

    // A forged grant, a task in place of a grant, another tenant's grant.
    let forged = edit_envelope(&grant, |envelope| envelope.sig = String::new());
    assert_rejected(open(&api_client, &forged).await, "bad_signature");
    let task = fixture.sign(&fixture.payload(2, stop(allocation_id)));
    assert_rejected(open(&api_client, &task).await, "not_a_grant");
    let mut foreign = fixture.payload(1, terminal_grant(allocation_id));
    foreign.tenant_id = Some(Uuid::new_v4());
    assert_rejected(
        open(&api_client, &fixture.sign(&foreign)).await,
        "wrong_tenant",
    );
    // One issued before this agent started might have been used before a
    // restart, which forgot the spent session ids.
    let mut old = fixture.payload(1, terminal_grant(allocation_id));
    old.issued_at -= 120;
    old.not_before -= 120;
    assert_rejected(
        open(&api_client, &fixture.sign(&old)).await,
        "issued_before_start",
    );

    // A good grant passes (this request is no WebSocket, so no session
    // opens) and is spent: the same grant again is a replay.
    let good = fixture.sign(&fixture.payload(1, terminal_grant(allocation_id)));
    let (status, body) = open(&api_client, &good).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "websocket_required");
    assert_rejected(open(&api_client, &good).await, "replayed");
    // Tasks were never affected.
    assert_eq!(agent.agent.inbox().high_water().await, 1);
}

#[tokio::test]
async fn a_task_that_arrives_before_a_lower_numbered_one_waits_for_it() {
    let fixture = Fixture::new();
    // Long enough that only the missing task's arrival can end the wait.
    let agent = agent_waiting(&fixture, std::time::Duration::from_secs(600)).await;
    let worker = fixture.worker_client();
    let first = fixture.payload(1, stop(Uuid::new_v4()));
    let second = fixture.payload(2, stop(Uuid::new_v4()));

    let (second_outcome, first_outcome) =
        tokio::join!(agent.post_task(&worker, fixture.sign(&second)), async {
            // The second is waiting for the first before the first is sent.
            until_waiting(&agent, 1).await;
            agent.post_task(&worker, fixture.sign(&first)).await
        });

    assert_eq!(first_outcome.0, StatusCode::OK, "{}", first_outcome.1);
    assert_eq!(second_outcome.0, StatusCode::OK, "{}", second_outcome.1);
    // Accepted, logged and acted on in sequence order.
    assert_eq!(accepted_order(&fixture), [1, 2]);
    assert_eq!(agent.agent.inbox().high_water().await, 2);
}

#[tokio::test]
async fn a_missing_number_is_waited_for_only_so_long_and_is_refused_after() {
    let fixture = Fixture::new();
    let agent = agent_waiting(&fixture, std::time::Duration::from_millis(50)).await;
    let worker = fixture.worker_client();
    let first = fixture.sign(&fixture.payload(1, stop(Uuid::new_v4())));
    let second = fixture.sign(&fixture.payload(2, stop(Uuid::new_v4())));

    // Number 1 never came in time: 2 goes ahead, and 1 is a replay now.
    assert_eq!(agent.post_task(&worker, second).await.0, StatusCode::OK);
    assert_rejected(agent.post_task(&worker, first).await, "replayed");
    assert_eq!(agent.agent.inbox().waiting(), 0);
}

/// An agent whose tasks wait `wait` for lower numbers.
async fn agent_waiting(fixture: &Fixture, wait: std::time::Duration) -> crate::support::TestAgent {
    let agent = fixture.start_agent().await;
    agent.agent.inbox().set_reorder_wait(wait);
    agent
}

/// The sequence numbers in the task log, in the order accepted.
fn accepted_order(fixture: &Fixture) -> Vec<u64> {
    let log = std::fs::read_to_string(fixture.state_dir().join("tasks.log")).unwrap();
    log.lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Polls until `count` tasks wait (or fails after a minute).
async fn until_waiting(agent: &crate::support::TestAgent, count: usize) {
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while agent.agent.inbox().waiting() != count {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} tasks never waited"));
}

#[tokio::test]
async fn a_task_whose_wait_ran_out_still_lets_a_lower_waiting_one_go_first() {
    let fixture = Fixture::new();
    let agent = fixture.start_agent().await;
    let inbox = agent.agent.inbox();
    let worker = fixture.worker_client();
    let [first, second, third] =
        [1, 2, 3].map(|seq| fixture.sign(&fixture.payload(seq, stop(Uuid::new_v4()))));

    // 2 waits for 1 (long); 3 has no wait left, but 2 is below it.
    inbox.set_reorder_wait(std::time::Duration::from_secs(600));
    let second = tokio::spawn({
        let (client, url) = (worker.clone(), agent.tasks_url());
        async move { client.post(url).body(second).send().await.unwrap().status() }
    });
    until_waiting(&agent, 1).await;
    inbox.set_reorder_wait(std::time::Duration::ZERO);
    let third = tokio::spawn({
        let (client, url) = (worker.clone(), agent.tasks_url());
        async move { client.post(url).body(third).send().await.unwrap().status() }
    });
    until_waiting(&agent, 2).await;
    assert_eq!(agent.post_task(&worker, first).await.0, StatusCode::OK);

    assert_eq!(second.await.unwrap(), StatusCode::OK);
    assert_eq!(third.await.unwrap(), StatusCode::OK);
    assert_eq!(accepted_order(&fixture), [1, 2, 3]);
}

#[tokio::test]
async fn a_waiting_task_whose_connection_drops_leaves_the_queue() {
    let fixture = Fixture::new();
    let agent = agent_waiting(&fixture, std::time::Duration::from_secs(600)).await;
    let ahead = fixture.sign(&fixture.payload(5, stop(Uuid::new_v4())));
    let worker = fixture.worker_client();

    // The client gives up (its request dropped with its connection); the
    // agent forgets the task that waited.
    let gave_up = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        tokio::select! {
            _ = agent.post_task(&worker, ahead) => panic!("the task was answered"),
            () = until_waiting(&agent, 1) => {}
        }
    })
    .await;
    assert!(gave_up.is_ok());
    drop(worker);
    until_waiting(&agent, 0).await;
    assert_eq!(agent.agent.inbox().high_water().await, 0);
}
