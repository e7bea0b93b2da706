//! The state every handler can extract parts of (through `FromRef`).

use std::sync::Arc;

use axum::extract::FromRef;
use keel_auth::TokenKeys;
use keel_db::Db;

#[derive(Clone, Debug)]
pub struct AppState {
    pub db: Db,
    pub tokens: Arc<TokenKeys>,
}

impl FromRef<AppState> for Db {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}

impl FromRef<AppState> for Arc<TokenKeys> {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
}
