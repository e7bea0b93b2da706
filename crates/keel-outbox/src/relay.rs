//! The relay: fan-out of new outbox events into deliveries, and release of
//! deliveries into apalis jobs, in order per aggregate.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::TaskBuilder;
use keel_db::{Db, OUTBOX_CHANNEL};
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::{Consumer, DeliveryJob};

/// How long the relay sleeps without a notification before it looks anyway
/// (the fallback that also catches retries coming due).
const POLL_FALLBACK: Duration = Duration::from_secs(2);
const BATCH: i64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
    #[error("apalis error")]
    Apalis(#[from] apalis_postgres::Error),
    #[error("could not encode a job")]
    Encode(#[from] serde_json::Error),
}

/// Fans out up to one batch of new events. Returns how many were handled.
pub async fn fan_out(db: &Db, consumers: &[Arc<dyn Consumer>]) -> Result<usize, RelayError> {
    let mut tx = db.begin_bookkeeping().await?;
    let events: Vec<(Uuid, i64, Uuid, String)> = sqlx::query_as(
        "SELECT id, seq, aggregate_id, event_type FROM outbox WHERE fanned_out_at IS NULL
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    for (event_id, seq, aggregate_id, event_type) in &events {
        for consumer in consumers
            .iter()
            .filter(|consumer| consumer.wants(event_type))
        {
            sqlx::query(
                "INSERT INTO outbox_deliveries (consumer, event_id, aggregate_id, seq)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(consumer.name())
            .bind(event_id)
            .bind(aggregate_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE outbox SET fanned_out_at = now() WHERE id = $1")
            .bind(event_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(events.len())
}

/// Releases due deliveries whose predecessors (same consumer, same
/// aggregate, earlier event) are all done or dead, as apalis jobs in the
/// same transaction. Returns how many were released.
pub async fn release(db: &Db) -> Result<usize, RelayError> {
    let mut tx = db.begin_bookkeeping().await?;
    let due: Vec<(String, Uuid, i32)> = sqlx::query_as(
        "SELECT d.consumer, d.event_id, d.attempts FROM outbox_deliveries d
         WHERE d.status = 'pending' AND d.available_at <= now()
           AND NOT EXISTS (
               SELECT FROM outbox_deliveries earlier
               WHERE earlier.consumer = d.consumer AND earlier.aggregate_id = d.aggregate_id
                 AND earlier.seq < d.seq AND earlier.status IN ('pending', 'queued'))
         ORDER BY d.seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    for (consumer, event_id, attempts) in &due {
        let job = DeliveryJob {
            consumer: consumer.clone(),
            event_id: (*event_id).into(),
        };
        // One job per attempt: a retry is a new job, not a re-run of a
        // finished one. apalis must not retry on its own: we do, with
        // backoff stored in the delivery.
        let task = TaskBuilder::new(serde_json::to_vec(&job)?)
            .idempotency_key(format!("{event_id}:{attempts}"))
            .max_attempts(1)
            .build();
        apalis_postgres::queries::push_tasks(&mut *tx, consumer, vec![task]).await?;
        sqlx::query(
            "UPDATE outbox_deliveries SET status = 'queued', updated_at = now() WHERE consumer = $1 AND event_id = $2",
        )
        .bind(consumer)
        .bind(event_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(due.len())
}

/// Runs fan-out and release until there is nothing left to do.
pub async fn drain(db: &Db, consumers: &[Arc<dyn Consumer>]) -> Result<(), RelayError> {
    loop {
        let fanned = fan_out(db, consumers).await?;
        let released = release(db).await?;
        if fanned == 0 && released == 0 {
            return Ok(());
        }
    }
}

/// The relay loop: drain, then sleep until a NOTIFY on `keel_outbox` or
/// the polling fallback, until `stop` resolves.
pub async fn run(
    db: Db,
    consumers: Vec<Arc<dyn Consumer>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut listener = PgListener::connect_with(db.pool()).await?;
    listener.listen(OUTBOX_CHANNEL).await?;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if let Err(error) = drain(&db, &consumers).await {
            tracing::error!(error = %error, "relay pass failed; retrying");
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            notification = tokio::time::timeout(POLL_FALLBACK, listener.recv()) => {
                if let Ok(Err(error)) = notification {
                    // The listener reconnects by itself on the next recv.
                    tracing::warn!(%error, "outbox listener interrupted");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
