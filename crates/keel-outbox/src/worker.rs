//! Running deliveries: one apalis worker per consumer.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BackendExt, BoxDynError, Data, Monitor, WorkerBuilder};
use apalis_postgres::{Config, PostgresStorage};
use keel_db::{Db, OUTBOX_CHANNEL};
use tracing::Instrument as _;

use crate::{Consumer, DeliveredEvent, DeliveryJob, MAX_ATTEMPTS, backoff_secs};

/// Failed delivery attempts in this process (the worker's metrics read it).
static DELIVERY_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many delivery attempts failed in this process so far.
pub fn delivery_failures() -> u64 {
    DELIVERY_FAILURES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A queued delivery with its event.
#[derive(sqlx::FromRow)]
struct Queued {
    attempts: i32,
    processed: bool,
    #[sqlx(flatten)]
    event: DeliveredEvent,
}

/// What the apalis handler needs.
#[derive(Clone)]
struct Runner {
    db: Db,
    consumer: Arc<dyn Consumer>,
}

/// Runs one delivery. Never fails towards apalis: every outcome is stored
/// in `outbox_deliveries` (done, pending with backoff, or dead).
pub async fn run_delivery(
    db: &Db,
    consumer: &dyn Consumer,
    job: &DeliveryJob,
) -> Result<(), keel_db::DbError> {
    let mut tx = db.begin_bookkeeping().await?;
    // The delivery, if it is still this job's to run, whether the consumer
    // already acted on the event, and the event: one round trip.
    let found: Option<Queued> = sqlx::query_as(
        "SELECT d.attempts,
                EXISTS (SELECT FROM consumer_inbox i
                        WHERE i.consumer = d.consumer AND i.event_id = d.event_id) AS processed,
                o.id, o.tenant_id, o.event_type, o.aggregate_type, o.aggregate_id,
                o.aggregate_version, o.resource, o.payload, o.traceparent, o.request_id,
                o.created_at
         FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
         WHERE d.consumer = $1 AND d.event_id = $2 AND d.status = 'queued'",
    )
    .bind(consumer.name())
    .bind(job.event_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(Queued {
        attempts: previous_attempts,
        processed,
        event,
    }) = found
    else {
        // Done, dead or re-queued by another path: nothing to do.
        return Ok(());
    };
    if processed {
        mark_done(&mut tx, consumer.name(), job).await?;
        tx.commit().await?;
        return Ok(());
    }
    // The bookkeeping transaction must not stay open across the consumer's
    // own work (which may call a node agent).
    tx.commit().await?;

    // The delivery is a span of the trace the event's request started.
    let span = tracing::info_span!(
        "deliver",
        otel.name = %format_args!("deliver {}", event.event_type),
        consumer = consumer.name(),
        event_id = %event.id,
        aggregate_id = %event.aggregate_id,
        // The same id the request's log lines carry.
        trace_id = event.traceparent.as_deref().and_then(|traceparent| traceparent.split('-').nth(1)),
    );
    if let Some(traceparent) = &event.traceparent {
        keel_telemetry::continue_trace(&span, traceparent);
    }
    let outcome = consumer.handle(&event).instrument(span).await;
    let mut tx = db.begin_bookkeeping().await?;
    match outcome {
        Ok(()) => {
            sqlx::query("INSERT INTO consumer_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(consumer.name())
                .bind(job.event_id)
                .execute(&mut *tx)
                .await?;
            mark_done(&mut tx, consumer.name(), job).await?;
        }
        Err(error) => {
            DELIVERY_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let attempts = previous_attempts + 1;
            let delay = backoff_secs(previous_attempts);
            sqlx::query(
                "UPDATE outbox_deliveries
                 SET attempts = $3, last_error = $4, updated_at = now(),
                     status = CASE WHEN $3 >= $5 THEN 'dead' ELSE 'pending' END,
                     available_at = now() + make_interval(secs => $6)
                 WHERE consumer = $1 AND event_id = $2",
            )
            .bind(consumer.name())
            .bind(job.event_id)
            .bind(attempts)
            .bind(error.to_string())
            .bind(MAX_ATTEMPTS)
            .bind(delay as f64)
            .execute(&mut *tx)
            .await?;
            if attempts >= MAX_ATTEMPTS {
                tracing::error!(consumer = consumer.name(), event = %job.event_id, %error, attempts, "delivery is dead");
            } else {
                tracing::warn!(consumer = consumer.name(), event = %job.event_id, %error, attempts, retry_in_secs = delay, "delivery failed; will retry");
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn mark_done(
    tx: &mut keel_db::PgTransaction,
    consumer: &str,
    job: &DeliveryJob,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox_deliveries SET status = 'done', updated_at = now() WHERE consumer = $1 AND event_id = $2")
        .bind(consumer)
        .bind(job.event_id)
        .execute(&mut **tx)
        .await?;
    // The next event of the same aggregate may now be released.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(OUTBOX_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn handle_job(job: DeliveryJob, runner: Data<Runner>) -> Result<(), BoxDynError> {
    run_delivery(&runner.db, runner.consumer.as_ref(), &job)
        .await
        .map_err(|error| Box::new(error) as BoxDynError)
}

/// Builds an apalis monitor with one worker per consumer.
pub fn monitor(db: &Db, consumers: &[Arc<dyn Consumer>], instance: &str) -> Monitor {
    let mut monitor = Monitor::new().shutdown_timeout(Duration::from_secs(20));
    for consumer in consumers {
        let runner = Runner {
            db: db.clone(),
            consumer: consumer.clone(),
        };
        let pool = db.pool().clone();
        let name = format!("{}-{instance}", consumer.name());
        let queue = consumer.name();
        monitor = monitor.register(move |restarts| {
            let config = Config::default()
                .queue(queue)
                .batch_size(10)
                .heartbeat_interval(Duration::from_secs(5))
                .missed_heartbeats(3);
            let backend = PostgresStorage::<DeliveryJob>::new(&pool)
                .with_config(config)
                .with_pubsub()
                .poll_with_interval(Duration::from_secs(2));
            WorkerBuilder::new(format!("{name}-{restarts}"))
                .backend(backend)
                .data(runner.clone())
                .build(handle_job)
        });
    }
    monitor.should_restart(|_, error| {
        tracing::error!(%error, "a consumer worker stopped; restarting it");
        true
    })
}
