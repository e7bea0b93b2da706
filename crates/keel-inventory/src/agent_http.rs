//! The node-facing endpoints of the inventory, served only on the api's
//! mutual-TLS agent listener: certificate renewal and the task-signing
//! keys. Not part of the public API document (agents are not its
//! clients). Every handler starts with [`authenticated_node`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::routing::{get, post};
use keel_db::Db;
use keel_http::tls::TlsPeer;
use keel_http::{ApiError, Json, RequestId, TraceParent};

use crate::enrol::NodeChannel;
use crate::nodes::{self, RenewRequest, RenewResponse, SigningKeys, authenticated_node};

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<NodeChannel>: FromRef<S>,
{
    Router::new()
        .route("/v1/agent/renew", post(renew))
        .route("/v1/agent/signing-keys", get(signing_keys))
}

async fn renew(
    State(db): State<Db>,
    State(channel): State<Arc<NodeChannel>>,
    peer: TlsPeer,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<RenewRequest>,
) -> Result<Json<RenewResponse>, ApiError> {
    let node = authenticated_node(&db, &peer).await?;
    let meta = keel_auth::context::anonymous_meta(&request_id, &trace);
    Ok(Json(
        nodes::renew(&db, meta, &channel, &node, request).await?,
    ))
}

async fn signing_keys(State(db): State<Db>, peer: TlsPeer) -> Result<Json<SigningKeys>, ApiError> {
    authenticated_node(&db, &peer).await?;
    Ok(Json(nodes::signing_keys(&db).await?))
}
