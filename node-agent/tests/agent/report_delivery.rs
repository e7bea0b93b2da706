//! Report delivery to a stand-in control plane over real mutual TLS: the
//! stand-in serves a control-plane-CA server certificate and requires node-CA
//! client certificates, as the api's agent-facing listener does.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use keel_agent::{PeerIdentity, ReportDelivery, ReportSink, RetryPolicy, WorkloadReport};
use keel_http::tls::{MtlsServer, TlsPeer};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::support::{Fixture, eventually};

/// What the stand-in received, and the statuses it answers with, in order
/// (204 once the script runs out).
#[derive(Default)]
struct StandInControlPlane {
    received: Mutex<Vec<(Option<Uuid>, WorkloadReport)>>,
    scripted_statuses: Mutex<VecDeque<StatusCode>>,
}

async fn reports_endpoint(
    State(stand_in): State<Arc<StandInControlPlane>>,
    Extension(peer): Extension<TlsPeer>,
    Json(report): Json<WorkloadReport>,
) -> StatusCode {
    let status = stand_in
        .scripted_statuses
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(StatusCode::NO_CONTENT);
    stand_in
        .received
        .lock()
        .unwrap()
        .push((PeerIdentity::from_tls_peer(&peer).node_id, report));
    status
}

struct Harness {
    stand_in: Arc<StandInControlPlane>,
    sink: tokio::sync::mpsc::UnboundedSender<WorkloadReport>,
    _stop_server: oneshot::Sender<()>,
    _stop_delivery: oneshot::Sender<()>,
}

async fn start_harness(fixture: &Fixture, scripted_statuses: &[StatusCode]) -> Harness {
    let stand_in = Arc::new(StandInControlPlane::default());
    stand_in
        .scripted_statuses
        .lock()
        .unwrap()
        .extend(scripted_statuses.iter().copied());
    let (server_certificate, server_key_pem) = fixture
        .control_plane_ca
        .issue_server(
            "api",
            &[],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            time::Duration::hours(1),
        )
        .unwrap();
    let server_tls = keel_pki::server_config_requiring_client_certs(
        &[fixture.node_ca.cert_der().clone()],
        &server_certificate.cert_pem,
        &server_key_pem,
    )
    .unwrap();
    let app = Router::new()
        .route("/v1/agent/reports", post(reports_endpoint))
        .with_state(Arc::clone(&stand_in));
    let server = MtlsServer::bind("127.0.0.1:0".parse().unwrap(), server_tls, app)
        .await
        .unwrap();
    let address = server.local_addr().unwrap();
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = server_stopped.await;
    }));

    let client_tls = fixture.state.report_client_tls_config().unwrap();
    let (sink, delivery) = ReportDelivery::new(
        &format!("https://{address}/"),
        Arc::unwrap_or_clone(client_tls),
        RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        },
    )
    .unwrap();
    let (stop_delivery, delivery_stopped) = oneshot::channel::<()>();
    tokio::spawn(delivery.run(async move {
        let _ = delivery_stopped.await;
    }));
    Harness {
        stand_in,
        sink,
        _stop_server: stop_server,
        _stop_delivery: stop_delivery,
    }
}

impl Harness {
    fn received(&self) -> Vec<(Option<Uuid>, WorkloadReport)> {
        self.stand_in.received.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn reports_arrive_in_order_authenticated_as_this_node_despite_transient_errors() {
    let fixture = Fixture::new();
    let harness = start_harness(
        &fixture,
        &[
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::INTERNAL_SERVER_ERROR,
        ],
    )
    .await;
    let allocation_id = Uuid::new_v4();
    let sent = [
        WorkloadReport::running(allocation_id),
        WorkloadReport::failed(allocation_id, "workload exited with status 3"),
        WorkloadReport::terminated(Uuid::new_v4()),
    ];

    for report in &sent {
        harness.sink.report(report.clone());
    }
    // Two refused attempts of the first report, then one stored of each.
    eventually("every report is stored", || harness.received().len() == 5).await;

    let received = harness.received();
    assert!(
        received
            .iter()
            .all(|(node_id, _)| *node_id == Some(fixture.node_id())),
        "every report is sent with this node's certificate"
    );
    let delivered: Vec<WorkloadReport> = received
        .into_iter()
        .skip(2)
        .map(|(_, report)| report)
        .collect();
    assert_eq!(delivered, sent);
    let retried: Vec<WorkloadReport> = harness
        .received()
        .into_iter()
        .take(2)
        .map(|(_, report)| report)
        .collect();
    assert_eq!(retried, [sent[0].clone(), sent[0].clone()]);
}

#[tokio::test]
async fn a_report_the_control_plane_refuses_for_good_is_dropped_and_the_next_one_goes_through() {
    let fixture = Fixture::new();
    let harness = start_harness(&fixture, &[StatusCode::BAD_REQUEST]).await;
    let refused = WorkloadReport::running(Uuid::new_v4());
    let next = WorkloadReport::terminated(Uuid::new_v4());

    harness.sink.report(refused.clone());
    harness.sink.report(next.clone());
    eventually("both reports were posted", || harness.received().len() == 2).await;

    let posted: Vec<WorkloadReport> = harness
        .received()
        .into_iter()
        .map(|(_, report)| report)
        .collect();
    assert_eq!(posted, [refused, next]);
}
