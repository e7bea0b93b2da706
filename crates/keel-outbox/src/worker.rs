//! Running deliveries: one apalis worker per consumer.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BackendExt, BoxDynError, Data, Monitor, WorkerBuilder};
use apalis_postgres::{Config, PostgresStorage};
use keel_core::ids::{EventId, TenantId};
use keel_db::{Db, OUTBOX_CHANNEL, SqlLiteral};
use sqlx::FromRow as _;
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{Consumer, DeliveredEvent, DeliveryJob, MAX_ATTEMPTS, backoff_secs};

/// Failed delivery attempts in this process (the worker's metrics read it).
static DELIVERY_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many delivery attempts failed in this process so far.
pub fn delivery_failures() -> u64 {
    DELIVERY_FAILURES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A queued delivery with its event, as the one-round-trip read returns
/// it. A simple query answers in text, and sqlx cannot read every text
/// timestamp back (a whole second has no fraction), so the event's time
/// comes as microseconds since the epoch.
#[derive(sqlx::FromRow)]
struct Queued {
    attempts: i32,
    processed: bool,
    id: EventId,
    tenant_id: Option<TenantId>,
    event_type: String,
    aggregate_type: String,
    aggregate_id: Uuid,
    aggregate_version: i64,
    resource: String,
    payload: serde_json::Value,
    traceparent: Option<String>,
    request_id: String,
    created_at_us: i64,
}

impl Queued {
    fn event(self) -> Result<DeliveredEvent, sqlx::Error> {
        let created_at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.created_at_us) * 1_000)
                .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
        Ok(DeliveredEvent {
            id: self.id,
            tenant_id: self.tenant_id,
            event_type: self.event_type,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            aggregate_version: self.aggregate_version,
            resource: self.resource,
            payload: self.payload,
            traceparent: self.traceparent,
            request_id: self.request_id,
            created_at,
        })
    }
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
    // Written into the statements below as literals (one round trip each,
    // see `Db::bookkeeping_once`).
    let (Some(consumer_name), event_id) = (
        SqlLiteral::name(consumer.name()),
        SqlLiteral::uuid(job.event_id.as_uuid()),
    ) else {
        // `monitor` refuses such a consumer at start-up.
        return Err(keel_db::DbError::Sqlx(sqlx::Error::Configuration(
            format!("consumer name {:?} is not a plain name", consumer.name()).into(),
        )));
    };
    // The delivery, if it is still this job's to run, whether the consumer
    // already acted on the event, and the event: one round trip, and
    // nothing held while the consumer works.
    let found = db
        .bookkeeping_once(&format!(
            "SELECT d.attempts,
                    EXISTS (SELECT FROM consumer_inbox i
                            WHERE i.consumer = d.consumer AND i.event_id = d.event_id) AS processed,
                    o.id, o.tenant_id, o.event_type, o.aggregate_type, o.aggregate_id,
                    o.aggregate_version, o.resource, o.payload, o.traceparent, o.request_id,
                    (extract(epoch FROM o.created_at) * 1000000)::bigint AS created_at_us
             FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
             WHERE d.consumer = {consumer_name} AND d.event_id = {event_id} AND d.status = 'queued'"
        ))
        .await?
        .map(|row| Queued::from_row(&row))
        .transpose()?;
    let Some(queued) = found else {
        // Done, dead or re-queued by another path: nothing to do.
        return Ok(());
    };
    let (previous_attempts, processed) = (queued.attempts, queued.processed);
    let event = queued.event()?;
    // Marks the delivery done and wakes the relay: the next event of the
    // same aggregate may now be released.
    let done = format!(
        "WITH done AS (
             UPDATE outbox_deliveries SET status = 'done', updated_at = now()
             WHERE consumer = {consumer_name} AND event_id = {event_id})
         SELECT pg_notify('{OUTBOX_CHANNEL}', '')"
    );
    if processed {
        db.bookkeeping_once(&done).await?;
        return Ok(());
    }

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
    match outcome {
        Ok(()) => {
            // The inbox row and the mark, in one implicit transaction.
            db.bookkeeping_once(&format!(
                "INSERT INTO consumer_inbox (consumer, event_id)
                 VALUES ({consumer_name}, {event_id}) ON CONFLICT DO NOTHING; {done}"
            ))
            .await?;
        }
        Err(error) => {
            let mut tx = db.begin_bookkeeping().await?;
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
            tx.commit().await?;
            if attempts >= MAX_ATTEMPTS {
                tracing::error!(consumer = consumer.name(), event = %job.event_id, %error, attempts, "delivery is dead");
            } else {
                tracing::warn!(consumer = consumer.name(), event = %job.event_id, %error, attempts, retry_in_secs = delay, "delivery failed; will retry");
            }
        }
    }
    Ok(())
}

async fn handle_job(job: DeliveryJob, runner: Data<Runner>) -> Result<(), BoxDynError> {
    run_delivery(&runner.db, runner.consumer.as_ref(), &job)
        .await
        .map_err(|error| Box::new(error) as BoxDynError)
}

/// Builds an apalis monitor with one worker per consumer.
///
/// # Panics
///
/// If a consumer's name is not a plain name (see [`crate::check_names`],
/// which `cmd/worker` calls before it starts the relay): a programming
/// error, caught at start-up rather than when its first delivery is
/// already queued.
pub fn monitor(db: &Db, consumers: &[Arc<dyn Consumer>], instance: &str) -> Monitor {
    if let Err(error) = crate::check_names(consumers) {
        panic!("{error}");
    }
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
