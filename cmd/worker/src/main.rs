//! `worker`: relays outbox events and runs their consumers.
//!
//! ```text
//! worker [--config FILE]
//! ```
//!
//! Reads the same configuration as the api (database, kms, log). Any
//! number of workers can run side by side: they coordinate through
//! Postgres only.

mod metrics;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use keel_api::keys::ControlPlaneKeys;
use keel_api::{Config, telemetry};
use keel_outbox::Consumer;
use keel_provisioning::consumer::{ProvisioningConsumer, WorkerCredentials};
use keel_provisioning::signing::SignerRing;

fn config_file() -> anyhow::Result<Option<PathBuf>> {
    let mut args = std::env::args().skip(1);
    let mut config = std::env::var_os("KEEL_CONFIG").map(PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config = Some(args.next().context("--config needs a file")?.into()),
            other => bail!("unexpected argument `{other}`; usage: worker [--config FILE]"),
        }
    }
    Ok(config)
}

async fn run() -> anyhow::Result<()> {
    let config = Config::load(config_file()?.as_deref())?;
    config.billing.validate().map_err(anyhow::Error::msg)?;
    // Held until `run` returns: dropping it sends the last spans.
    let _telemetry = telemetry::init("keel-worker", &config.log, &config.tracing)?;
    let db = keel_db::Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let kms = Arc::new(keel_api::keys::kms(&config, false)?);
    let keys = Arc::new(ControlPlaneKeys::load(&db, &kms).await?);
    let identity = keys.hot_service_identity("worker", &[])?;
    let signers = Arc::new(
        SignerRing::load(&db, &kms)
            .await
            .context("loading the task-signing keys")?,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reload = tokio::spawn(signers.clone().reload_until_stopped(
        db.clone(),
        kms.clone(),
        stop.subscribe(),
    ));

    let provisioning = ProvisioningConsumer::new(
        db.clone(),
        WorkerCredentials {
            signers,
            node_ca_pem: keys.node_ca.cert_pem().to_owned(),
            identity: Arc::clone(&identity),
        },
    );
    // Provisioning and billing read the same events and share nothing else.
    let consumers: Vec<Arc<dyn Consumer>> = vec![
        Arc::new(provisioning),
        Arc::new(
            keel_billing::meter::MeteringConsumer::new(db.clone())
                .in_batches_of(config.billing.meter_batch_size as usize),
        ),
    ];
    keel_outbox::check_names(&consumers).map_err(anyhow::Error::msg)?;

    let instance = format!("{}-{}", hostname(), std::process::id());
    let relay = tokio::spawn(keel_outbox::relay::run(
        db.clone(),
        consumers.clone(),
        stopped,
    ));
    let purge = tokio::spawn(purge_expired(
        db.clone(),
        config.idempotency.clone(),
        stop.subscribe(),
    ));
    let sealer = tokio::spawn(seal_audit_chains(db.clone(), stop.subscribe()));
    let invoicer = tokio::spawn(run_invoices(
        db.clone(),
        config.billing.clone(),
        stop.subscribe(),
    ));
    let reissuer = tokio::spawn(keel_api::keys::reissue_periodically(
        Arc::clone(&keys),
        identity,
        "worker".to_owned(),
        Vec::new(),
        stop.subscribe(),
    ));
    let mut registry = keel_http::metrics::Registry::default();
    let worker_metrics = metrics::WorkerMetrics::register(&mut registry);
    let metrics_server = match config.metrics.worker_listen {
        Some(listen) => {
            let listener = keel_http::metrics::bind(listen)
                .await
                .with_context(|| format!("binding metrics.worker_listen = {listen}"))?;
            let mut stopped = stop.subscribe();
            Some(tokio::spawn(keel_http::metrics::serve(
                listener,
                Arc::new(registry),
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            )))
        }
        None => None,
    };
    let liveness = tokio::spawn(watch_host_liveness(
        db.clone(),
        time::Duration::seconds(i64::from(config.agent.offline_after_secs.max(1))),
        config.lifecycle,
        worker_metrics,
        stop.subscribe(),
    ));
    let monitor = keel_outbox::worker::monitor(&db, &consumers, &instance);
    tracing::info!(%instance, "worker running");
    let result = monitor
        .run_with_signal(async {
            keel_api::shutdown_signal().await;
            Ok(())
        })
        .await;
    let _ = stop.send(true);
    relay.await.context("relay task")?.context("relay")?;
    purge.await.context("purge task")?;
    sealer.await.context("audit sealer task")?;
    invoicer.await.context("invoice task")?;
    liveness.await.context("host liveness task")?;
    reissuer.await.context("certificate re-issuer")?;
    if let Some(server) = metrics_server {
        server
            .await
            .context("metrics listener")?
            .context("serving metrics")?;
    }
    reload.await.context("signing-key reload task")?;
    result.context("consumer workers")?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Every `idempotency.purge_interval_secs`, until stopped: deletes
/// idempotency keys past their retention, and what the outbox no longer
/// needs (`keel_outbox::retention`). A failed round is logged and retried
/// at the next tick.
async fn purge_expired(
    db: keel_db::Db,
    config: keel_auth::idempotency::IdempotencyConfig,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let period = std::time::Duration::from_secs(u64::from(config.purge_interval_secs.max(1)));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        match keel_auth::idempotency::purge(&db, config.retention()).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "purged expired idempotency keys"),
            Err(error) => tracing::warn!(error = %error, "purging idempotency keys failed"),
        }
        match keel_outbox::retention::purge(&db).await {
            Ok(purged) if purged == keel_outbox::retention::Purged::default() => {}
            Ok(purged) => tracing::info!(?purged, "purged delivered events and finished jobs"),
            Err(error) => tracing::warn!(error = %error, "purging the outbox failed"),
        }
    }
}

/// Until stopped: every `billing.invoice_interval_secs` the invoice run
/// (`keel_billing::runs`: due drafts finalized, last month's drafted), and
/// every `billing.standing_interval_secs` the prepaid credit policy
/// (`keel_billing::standing`).
async fn run_invoices(
    db: keel_db::Db,
    config: keel_billing::BillingConfig,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let period = std::time::Duration::from_secs(u64::from(config.invoice_interval_secs.max(1)));
    let finalize_after = time::Duration::seconds(i64::from(config.finalize_after_secs));
    let policy = keel_billing::invoice::Policy::from(&config);
    let mut invoice_ticks = tokio::time::interval(period);
    let mut standing_ticks = tokio::time::interval(std::time::Duration::from_secs(u64::from(
        config.standing_interval_secs.max(1),
    )));
    loop {
        let invoices = tokio::select! {
            _ = invoice_ticks.tick() => true,
            _ = standing_ticks.tick() => false,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        if invoices {
            match keel_billing::runs::invoice_run(&db, policy, finalize_after).await {
                Ok(report) if report == keel_billing::runs::RunReport::default() => {}
                Ok(report) => tracing::info!(?report, "invoice run"),
                Err(error) => tracing::warn!(error = %error, "the invoice run failed"),
            }
        } else {
            match keel_billing::standing::standing_run(&db, &config).await {
                Ok(0) => {}
                Ok(changed) => tracing::info!(changed, "prepaid credit checked"),
                Err(error) => tracing::warn!(error = %error, "the credit check failed"),
            }
        }
    }
}

/// Seals new audit entries into their tenant's hash chain about once a
/// second (see `keel_auth::audit_chain`), until stopped.
async fn seal_audit_chains(db: keel_db::Db, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if let Err(error) = keel_auth::audit_chain::seal(&db).await {
            tracing::warn!(error = %error, "sealing the audit log failed");
        }
    }
}

/// Every 5 s, until stopped: marks hosts that stopped sending heartbeats
/// offline (and their allocations lost; see `keel_provisioning::liveness`)
/// finishes the drains of hosts nothing holds capacity on any more
/// (`keel_inventory::hosts`), purges allocations terminated longer than
/// the retention window ago, and retries or settles allocations past their
/// deadline (`keel_provisioning::reconcile`).
async fn watch_host_liveness(
    db: keel_db::Db,
    grace: time::Duration,
    deadlines: keel_provisioning::reconcile::Deadlines,
    metrics: metrics::WorkerMetrics,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let meta =
            keel_db::RequestMeta::system("worker", uuid::Uuid::now_v7().simple().to_string());
        if let Err(error) =
            keel_provisioning::liveness::mark_silent_hosts_offline(&db, meta, grace).await
        {
            tracing::warn!(error = %error, "checking host liveness failed");
        }
        let meta =
            keel_db::RequestMeta::system("worker", uuid::Uuid::now_v7().simple().to_string());
        if let Err(error) = keel_inventory::hosts::finish_drains(&db, meta).await {
            tracing::warn!(error = %error, "finishing host drains failed");
        }
        let meta =
            keel_db::RequestMeta::system("worker", uuid::Uuid::now_v7().simple().to_string());
        if let Err(error) = keel_provisioning::service::purge_terminated(&db, meta).await {
            tracing::warn!(error = %error, "purging terminated allocations failed");
        }
        let meta =
            keel_db::RequestMeta::system("worker", uuid::Uuid::now_v7().simple().to_string());
        let past_deadline =
            match keel_provisioning::reconcile::reconcile_deadlines(&db, meta, &deadlines).await {
                Ok(report) => {
                    if report.past_deadline > 0 {
                        tracing::warn!(?report, "allocations past their deadline");
                    }
                    Some(report.past_deadline)
                }
                Err(error) => {
                    tracing::warn!(error = %error, "reconciling allocations failed");
                    None
                }
            };
        if let Err(error) = metrics.refresh(&db, past_deadline).await {
            tracing::warn!(error = %error, "refreshing the metrics failed");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "worker".to_owned())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}
