//! The api: configuration, the merged router and OpenAPI document, and the
//! server loop. Only this crate knows about routing as a whole; each domain
//! contributes an `OpenApiRouter` and knows nothing of the others' routes.
//!
//! A request flows: request-id middleware (id, span, error envelope) →
//! domain handler (extract, authorise, one service call) → `keel_db`
//! transaction (change + audit + outbox) → JSON response.

pub mod config;
pub mod console;
mod health;
pub mod keys;
pub mod openapi;
mod state;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use keel_auth::TokenKeys;
use keel_auth::limits::Limits;
use keel_db::Db;
use keel_http::tls::MtlsServer;
use keel_inventory::enrol::NodeChannel;
use tokio::net::TcpListener;

use keel_provisioning::signing::SignerRing;
use keel_provisioning::terminal::Terminals;

use crate::keys::ControlPlaneKeys;

pub use config::Config;
pub use state::AppState;

/// Builds the whole router and the OpenAPI document from the state; paths
/// no route matches go to the console when one is configured.
pub fn app(state: AppState) -> Router {
    let (router, document) = openapi::router_and_document();
    let document = Arc::new(document);
    let router = router
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            keel_http::metrics::http_layer,
        ));
    let router = match state.console.clone() {
        Some(console) => router.fallback(move |request| console.serve(request)),
        None => router.fallback(keel_http::route_not_found),
    };
    router
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            keel_auth::idempotency::layer::<AppState>,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state,
            keel_auth::limits::layer::<AppState>,
        ))
        .layer(axum::middleware::from_fn(
            keel_auth::context::websocket_bearer_layer,
        ))
        .layer(axum::middleware::from_fn(keel_http::request_id_layer))
}

/// The shortest node certificate lifetime honoured (tests use short ones
/// to watch renewal; production keeps the default week).
const MIN_NODE_CERT_LIFETIME_SECS: u32 = 10;

/// What enrolment hands nodes, from the control plane's keys.
pub fn node_channel(keys: &ControlPlaneKeys, config: &Config) -> anyhow::Result<NodeChannel> {
    Ok(NodeChannel {
        node_ca: keel_pki::CertificateAuthority::from_pem(
            keel_pki::CaKind::Node,
            keys.node_ca.cert_pem(),
            &keys.node_ca.key_pem(),
        )?,
        control_plane_ca_pem: keys.control_plane_ca.cert_pem().to_owned(),
        agent_api_url: config.agent.url(),
        node_cert_lifetime: time::Duration::seconds(i64::from(
            config
                .pki
                .node_cert_lifetime_secs
                .max(MIN_NODE_CERT_LIFETIME_SECS),
        )),
    })
}

/// Connects to Postgres, after migrating when `migrate_on_start`.
pub async fn connect(config: &Config) -> anyhow::Result<Db> {
    if config.database_migrate_on_start {
        keel_db::migrate(&config.database)
            .await
            .context("applying migrations")?;
    }
    Db::connect(&config.database)
        .await
        .context("connecting to Postgres")
}

/// Builds the state from a loaded configuration and the control plane's
/// keys.
pub fn state_from_config(
    config: &Config,
    db: Db,
    keys: &ControlPlaneKeys,
    terminals: Arc<Terminals>,
) -> anyhow::Result<AppState> {
    let tokens = TokenKeys::new(&config.auth).context("invalid auth settings")?;
    config.billing.validate().map_err(anyhow::Error::msg)?;
    Ok(AppState {
        db,
        tokens: Arc::new(tokens),
        node_channel: Arc::new(node_channel(keys, config)?),
        limits: Arc::new(Limits::new(config.rate_limit.clone())),
        deadlines: config.lifecycle,
        metrics: keel_http::metrics::HttpMetrics::default(),
        terminals,
        console: config.console.dir.as_deref().map(console::Console::new),
        billing: Arc::new(config.billing.clone()),
        payments: keel_payments::Payments::from_config(&config.payments)
            .map_err(|error| anyhow::anyhow!("payments: {error}"))?,
    })
}

/// The longest terminal session (the agents' own cap).
const MAX_TERMINAL_SESSION_SECS: u64 = 8 * 3600;

/// What the api needs to open terminal sessions: the task-signing keys
/// (grants are signed like tasks) and a client certificate naming the
/// `api` component (agents accept terminal connections from it alone).
/// The caller keeps both fresh (`SignerRing::reload_until_stopped`,
/// `keys::reissue_periodically`).
pub async fn terminals(
    config: &Config,
    db: &Db,
    kms: &keel_kms::AnyKms,
    keys: &ControlPlaneKeys,
) -> anyhow::Result<Arc<Terminals>> {
    let limit = config.terminal.max_session_secs;
    if !(1..=MAX_TERMINAL_SESSION_SECS).contains(&limit) {
        anyhow::bail!(
            "terminal.max_session_secs must be between 1 and {MAX_TERMINAL_SESSION_SECS}, got {limit}"
        );
    }
    let signers = SignerRing::load(db, kms)
        .await
        .context("loading the task-signing keys")?;
    Ok(Arc::new(Terminals::new(
        Arc::new(signers),
        keys.hot_service_identity("api", &[])?,
        keys.node_ca.cert_pem().to_owned(),
        config.terminal,
    )))
}

/// The router of the agent listener: node agents only. Served by
/// [`MtlsServer`], which gives handlers the peer certificate as a
/// [`keel_http::tls::TlsPeer`].
pub fn agent_app(state: AppState) -> Router {
    keel_provisioning::agent_http::router()
        .merge(keel_inventory::agent_http::router())
        .fallback(keel_http::route_not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(
            keel_http::untraced_request_id_layer,
        ))
}

/// The TLS configuration of the agent listener: the api's certificate
/// from the control-plane CA; clients must present a node-CA certificate
/// whose serial is not on `deny_list`.
pub fn agent_tls_config(
    keys: &ControlPlaneKeys,
    identity: Arc<keel_pki::HotIdentity>,
    deny_list: Arc<keel_pki::DenyList>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(keel_pki::server_config_with_deny_list(
        &[keys.node_ca.cert_der().clone()],
        identity,
        deny_list,
    )?)
}

/// The deny list of the agent listener, loaded once (so the listener
/// starts fresh) and then kept fresh by
/// `keel_inventory::nodes::refresh_deny_list`.
pub async fn deny_list(db: &Db) -> anyhow::Result<Arc<keel_pki::DenyList>> {
    let deny_list = Arc::new(keel_pki::DenyList::new(
        keel_inventory::nodes::DENY_LIST_MAX_AGE,
    ));
    deny_list.replace(
        keel_inventory::nodes::revoked_serials(db)
            .await
            .context("loading the certificate deny list")?,
    );
    Ok(deny_list)
}

/// Runs the api (public listener and agent listener) until Ctrl-C or
/// SIGTERM, then drains in-flight requests on both.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    if let Some(dir) = &config.pki.dir {
        tracing::warn!(
            dir = %dir.display(),
            "pki.dir is ignored: the CAs and signing keys live in Postgres, sealed by the KMS; \
             nodes enrolled with keys from that directory must join again"
        );
    }
    let db = connect(&config).await?;
    let kms = keys::kms(&config, true)?;
    let keys = Arc::new(ControlPlaneKeys::load_or_create(&db, &kms).await?);
    let identity = keys.hot_service_identity("api", &config.agent.server_names)?;
    let deny_list = deny_list(&db).await?;
    let terminals = terminals(&config, &db, &kms, &keys).await?;
    let mut state = state_from_config(&config, db.clone(), &keys, Arc::clone(&terminals))?;
    let mut registry = keel_http::metrics::Registry::default();
    state.metrics = keel_http::metrics::HttpMetrics::register(&mut registry);
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen = {}", config.server.listen))?;
    let agent_server = MtlsServer::bind(
        config.agent.listen,
        agent_tls_config(&keys, Arc::clone(&identity), deny_list.clone())?,
        agent_app(state.clone()),
    )
    .await
    .with_context(|| format!("binding agent.listen = {}", config.agent.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        agent_address = %agent_server.local_addr()?,
        "api listening"
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(keel_inventory::nodes::refresh_deny_list(
        db.clone(),
        deny_list,
        stopped.clone(),
    ));
    let reissuer = tokio::spawn(keys::reissue_periodically(
        Arc::clone(&keys),
        identity,
        "api".to_owned(),
        config.agent.server_names.clone(),
        stopped.clone(),
    ));
    let terminal_identity = tokio::spawn(keys::reissue_periodically(
        Arc::clone(&keys),
        Arc::clone(&terminals.identity),
        "api".to_owned(),
        Vec::new(),
        stopped.clone(),
    ));
    let terminal_signers = tokio::spawn(Arc::clone(&terminals.signers).reload_until_stopped(
        db.clone(),
        Arc::new(kms),
        stopped.clone(),
    ));
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let metrics = match config.metrics.api_listen {
        Some(listen) => {
            let listener = keel_http::metrics::bind(listen)
                .await
                .with_context(|| format!("binding metrics.api_listen = {listen}"))?;
            Some(tokio::spawn(keel_http::metrics::serve(
                listener,
                Arc::new(registry),
                until_stopped(stopped.clone()),
            )))
        }
        None => None,
    };
    // The peer address feeds the per-IP rate limits.
    let public = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(until_stopped(stopped.clone()));
    // Stops accepting on the same signal, then drains its own connections
    // (with a grace period; see `MtlsServer::serve`).
    let agents = agent_server.serve(until_stopped(stopped));
    let sessions = Arc::clone(&terminals);
    let signal = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
        // Terminal sessions are upgraded connections, which the server's
        // drain does not wait for: end them so each is closed and audited.
        sessions.end_sessions(Duration::from_secs(10)).await;
        Ok::<(), std::io::Error>(())
    };
    tokio::try_join!(
        async { public.await.context("serving the public api") },
        async {
            agents.await;
            Ok::<(), anyhow::Error>(())
        },
        async { signal.await.context("waiting for a signal") },
    )?;
    refresher.await.context("deny-list refresher")?;
    terminal_identity
        .await
        .context("terminal identity reissuer")?;
    terminal_signers
        .await
        .context("task-signing key reloader")?;
    reissuer.await.context("certificate re-issuer")?;
    if let Some(metrics) = metrics {
        metrics
            .await
            .context("metrics listener")?
            .context("serving metrics")?;
    }
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
