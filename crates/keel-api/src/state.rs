//! The state every handler can extract parts of (through `FromRef`).

use std::sync::Arc;

use axum::extract::FromRef;
use keel_auth::TokenKeys;
use keel_auth::limits::Limits;
use keel_db::Db;
use keel_inventory::enrol::NodeChannel;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub tokens: Arc<TokenKeys>,
    pub node_channel: Arc<NodeChannel>,
    pub limits: Arc<Limits>,
    /// How long each allocation state may last (`[lifecycle]`).
    pub deadlines: keel_provisioning::reconcile::Deadlines,
    /// Request counts and latencies (served by the metrics listener).
    pub metrics: keel_http::metrics::HttpMetrics,
    /// Signing keys and the client identity terminal sessions use.
    pub terminals: Arc<keel_provisioning::terminal::Terminals>,
    /// The web console served at `/` (`[console] dir`), if any.
    pub console: Option<crate::console::Console>,
    /// The billing currency and tax (`[billing]`).
    pub billing: Arc<keel_billing::BillingConfig>,
    /// The payment provider (`[payments]`).
    pub payments: keel_payments::Payments,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material stays out of logs.
        f.debug_struct("AppState")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl FromRef<AppState> for Db {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}

impl FromRef<AppState> for Arc<keel_billing::BillingConfig> {
    fn from_ref(state: &AppState) -> Self {
        state.billing.clone()
    }
}

impl FromRef<AppState> for keel_payments::Payments {
    fn from_ref(state: &AppState) -> Self {
        state.payments.clone()
    }
}

impl FromRef<AppState> for Arc<TokenKeys> {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
}

impl FromRef<AppState> for Arc<NodeChannel> {
    fn from_ref(state: &AppState) -> Self {
        state.node_channel.clone()
    }
}

impl FromRef<AppState> for keel_provisioning::reconcile::Deadlines {
    fn from_ref(state: &AppState) -> Self {
        state.deadlines
    }
}

impl FromRef<AppState> for Arc<keel_provisioning::terminal::Terminals> {
    fn from_ref(state: &AppState) -> Self {
        state.terminals.clone()
    }
}

impl FromRef<AppState> for Arc<Limits> {
    fn from_ref(state: &AppState) -> Self {
        state.limits.clone()
    }
}
