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

/// A queued delivery's [`Queued`] columns and the join they come from.
const QUEUED_COLUMNS: &str = "d.attempts,
        EXISTS (SELECT FROM consumer_inbox i
                WHERE i.consumer = d.consumer AND i.event_id = d.event_id) AS processed,
        o.id, o.tenant_id, o.event_type, o.aggregate_type, o.aggregate_id,
        o.aggregate_version, o.resource, o.payload, o.traceparent, o.request_id,
        (extract(epoch FROM o.created_at) * 1000000)::bigint AS created_at_us
     FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id";

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
            "SELECT {QUEUED_COLUMNS}
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
                 WHERE consumer = $1 AND event_id = $2
                   -- Only as this run found it: another run that recorded
                   -- first wins.
                   AND status = 'queued' AND attempts = $3 - 1",
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

/// Runs a job of several deliveries (a batch consumer's): one read of the
/// deliveries still queued and their events, one call of
/// [`Consumer::handle_batch`], one transaction recording every outcome.
pub async fn run_batch(
    db: &Db,
    consumer: &dyn Consumer,
    job: &DeliveryJob,
) -> Result<(), keel_db::DbError> {
    let ids: Vec<Uuid> = std::iter::once(job.event_id)
        .chain(job.more.iter().copied())
        .map(|id| id.as_uuid())
        .collect();
    let mut tx = db.begin_bookkeeping().await?;
    let queued: Vec<Queued> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {QUEUED_COLUMNS}
         WHERE d.consumer = $1 AND d.event_id = ANY($2) AND d.status = 'queued'
         ORDER BY d.seq"
    )))
    .bind(consumer.name())
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut done = Vec::new();
    let mut attempts = Vec::new();
    let mut events = Vec::new();
    let mut handled = Vec::new();
    // Per failed delivery: its id, the attempts read, the error, the delay.
    let mut failed: (Vec<Uuid>, Vec<i32>, Vec<String>, Vec<f64>) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut fail = |id: Uuid, previous_attempts: i32, error: String| {
        let attempts = previous_attempts + 1;
        let delay = backoff_secs(previous_attempts);
        if attempts >= MAX_ATTEMPTS {
            tracing::error!(consumer = consumer.name(), event = %id, %error, attempts, "delivery is dead");
        } else {
            tracing::warn!(consumer = consumer.name(), event = %id, %error, attempts, retry_in_secs = delay, "delivery failed; will retry");
        }
        DELIVERY_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        failed.0.push(id);
        failed.1.push(previous_attempts);
        failed.2.push(error);
        failed.3.push(delay as f64);
    };
    for queued in queued {
        let (id, previous_attempts) = (queued.id.as_uuid(), queued.attempts);
        if queued.processed {
            done.push(id);
            continue;
        }
        // An event that cannot be read fails alone.
        match queued.event() {
            Ok(event) => {
                attempts.push(previous_attempts);
                events.push(event);
            }
            Err(error) => fail(id, previous_attempts, format!("unreadable event: {error}")),
        }
    }
    if !events.is_empty() {
        let span = tracing::info_span!(
            "deliver_batch",
            otel.name = %format_args!("deliver {} events", events.len()),
            consumer = consumer.name(),
            events = events.len(),
        );
        let mut results = consumer.handle_batch(&events).instrument(span).await;
        // A consumer that answers for fewer events failed the others.
        results.resize_with(events.len(), || {
            Err(crate::HandlerError(
                "the consumer gave no result for it".into(),
            ))
        });
        for ((event, previous_attempts), result) in events.iter().zip(attempts).zip(results) {
            match result {
                Ok(()) => handled.push(event.id.as_uuid()),
                Err(error) => fail(event.id.as_uuid(), previous_attempts, error.to_string()),
            }
        }
    }
    done.extend_from_slice(&handled);
    // Every outcome in one transaction. Each update applies only to a
    // delivery still queued as this run read it: another run of the same
    // job (apalis may run one twice) that recorded first wins, and none
    // turns a finished delivery back. The rows are locked in one order
    // first, so two such runs cannot deadlock.
    let mut tx = db.begin_bookkeeping().await?;
    sqlx::query(
        "SELECT FROM outbox_deliveries WHERE consumer = $1 AND event_id = ANY($2)
          ORDER BY event_id FOR UPDATE",
    )
    .bind(consumer.name())
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO consumer_inbox (consumer, event_id)
         SELECT $1, id FROM unnest($2::uuid[]) AS handled(id) ON CONFLICT DO NOTHING",
    )
    .bind(consumer.name())
    .bind(&handled)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE outbox_deliveries SET status = 'done', updated_at = now()
          WHERE consumer = $1 AND event_id = ANY($2) AND status = 'queued'",
    )
    .bind(consumer.name())
    .bind(&done)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE outbox_deliveries d
            SET attempts = f.attempts + 1, last_error = f.error, updated_at = now(),
                status = CASE WHEN f.attempts + 1 >= $2 THEN 'dead' ELSE 'pending' END,
                available_at = now() + make_interval(secs => f.delay)
           FROM unnest($3::uuid[], $4::int[], $5::text[], $6::float8[])
                AS f(event_id, attempts, error, delay)
          WHERE d.consumer = $1 AND d.event_id = f.event_id
            AND d.status = 'queued' AND d.attempts = f.attempts",
    )
    .bind(consumer.name())
    .bind(MAX_ATTEMPTS)
    .bind(&failed.0)
    .bind(&failed.1)
    .bind(&failed.2)
    .bind(&failed.3)
    .execute(&mut *tx)
    .await?;
    // Wakes the relay: the next events of these aggregates may go.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_notify('{OUTBOX_CHANNEL}', '')"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn handle_job(job: DeliveryJob, runner: Data<Runner>) -> Result<(), BoxDynError> {
    let ran = if job.more.is_empty() {
        run_delivery(&runner.db, runner.consumer.as_ref(), &job).await
    } else {
        run_batch(&runner.db, runner.consumer.as_ref(), &job).await
    };
    ran.map_err(|error| Box::new(error) as BoxDynError)
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
