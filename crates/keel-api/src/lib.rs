//! The api: configuration, the merged router and OpenAPI document, and the
//! server loop. Only this crate knows about routing as a whole; each domain
//! contributes an `OpenApiRouter` and knows nothing of the others' routes.
//!
//! A request flows: request-id middleware (id, span, error envelope) →
//! domain handler (extract, authorise, one service call) → `keel_db`
//! transaction (change + audit + outbox) → JSON response.

pub mod config;
mod health;
pub mod openapi;
mod state;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use keel_auth::TokenKeys;
use keel_db::Db;
use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;

/// Builds the whole router and the OpenAPI document from the state.
pub fn app(state: AppState) -> Router {
    let (router, document) = openapi::router_and_document();
    let document = Arc::new(document);
    router
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .fallback(keel_http::route_not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(keel_http::request_id_layer))
}

/// Builds the state from a loaded configuration: connects to Postgres
/// (after migrating, when `migrate_on_start`).
pub async fn state_from_config(config: &Config) -> anyhow::Result<AppState> {
    if config.database_migrate_on_start {
        keel_db::migrate(&config.database)
            .await
            .context("applying migrations")?;
    }
    let db = Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let tokens = TokenKeys::new(&config.auth).context("invalid auth settings")?;
    Ok(AppState {
        db,
        tokens: Arc::new(tokens),
    })
}

/// Runs the api until Ctrl-C or SIGTERM, then drains in-flight requests.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let state = state_from_config(&config).await?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen = {}", config.server.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "api listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("api stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
