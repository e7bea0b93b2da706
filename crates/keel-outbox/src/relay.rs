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
/// Events fanned out, and deliveries released, per pass (large: a batch
/// consumer takes up to a thousand per job; doc/performance.md).
const BATCH: i64 = 5000;
/// How often the relay looks for stranded deliveries ([`requeue_stranded`]).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How long a delivery must have been `queued` before a sweep may judge it
/// stranded.
const STRANDED_AFTER_SECS: f64 = 10.0;

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

/// Fans out up to one batch of new events in `tx`. Returns how many were
/// handled.
async fn fan_out(
    tx: &mut keel_db::PgTransaction,
    consumers: &[Arc<dyn Consumer>],
) -> Result<usize, RelayError> {
    let events: Vec<(Uuid, i64, Uuid, String)> = sqlx::query_as(
        "SELECT id, seq, aggregate_id, event_type FROM outbox WHERE fanned_out_at IS NULL
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut **tx)
    .await?;
    // One statement for every delivery of the batch, one for the marks.
    let (mut names, mut event_ids, mut aggregate_ids, mut seqs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (event_id, seq, aggregate_id, event_type) in &events {
        for consumer in consumers
            .iter()
            .filter(|consumer| consumer.wants(event_type))
        {
            names.push(consumer.name());
            event_ids.push(*event_id);
            aggregate_ids.push(*aggregate_id);
            seqs.push(*seq);
        }
    }
    if !names.is_empty() {
        sqlx::query(
            "INSERT INTO outbox_deliveries (consumer, event_id, aggregate_id, seq)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::bigint[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&names)
        .bind(&event_ids)
        .bind(&aggregate_ids)
        .bind(&seqs)
        .execute(&mut **tx)
        .await?;
    }
    if !events.is_empty() {
        let fanned: Vec<Uuid> = events.iter().map(|(id, ..)| *id).collect();
        sqlx::query("UPDATE outbox SET fanned_out_at = now() WHERE id = ANY($1)")
            .bind(&fanned)
            .execute(&mut **tx)
            .await?;
    }
    Ok(events.len())
}

/// Releases due deliveries whose predecessors (same consumer, same
/// aggregate, earlier event) are all done or dead, as apalis jobs in the
/// same transaction (`tx`): one job per delivery, or, for a consumer that
/// takes batches ([`Consumer::batch_size`]), up to that many deliveries
/// per job (the ordering check lets at most one delivery of an aggregate
/// through at a time, so a job never holds two of one aggregate). Each
/// delivery records the key of its job (`job_key`), which the stranded
/// sweep looks for. Returns how many were released.
async fn release(
    tx: &mut keel_db::PgTransaction,
    consumers: &[Arc<dyn Consumer>],
) -> Result<usize, RelayError> {
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
    .fetch_all(&mut **tx)
    .await?;
    // Per consumer (an apalis queue): one insert of its jobs, one update.
    let mut by_consumer: std::collections::BTreeMap<&str, Vec<(Uuid, i32)>> =
        std::collections::BTreeMap::new();
    for (consumer, event_id, attempts) in &due {
        by_consumer
            .entry(consumer)
            .or_default()
            .push((*event_id, *attempts));
    }
    for (consumer, deliveries) in by_consumer {
        // A consumer this process does not know (another version's) gets
        // one job per delivery, which every version runs.
        let per_job = consumers
            .iter()
            .find(|known| known.name() == consumer)
            .map_or(1, |known| known.batch_size().max(1));
        let mut tasks = Vec::new();
        let (mut released, mut keys) = (Vec::new(), Vec::new());
        for chunk in deliveries.chunks(per_job) {
            let (first, first_attempts) = chunk[0];
            let job = DeliveryJob {
                consumer: consumer.to_owned(),
                event_id: first.into(),
                more: chunk[1..].iter().map(|(id, _)| (*id).into()).collect(),
            };
            // One job per attempt: a retry is a new job, not a re-run of a
            // finished one. apalis must not retry on its own: we do, with
            // backoff stored in the delivery.
            let key = format!("{first}:{first_attempts}");
            tasks.push(
                TaskBuilder::new(serde_json::to_vec(&job)?)
                    .idempotency_key(key.clone())
                    .max_attempts(1)
                    .build(),
            );
            for (event_id, _) in chunk {
                released.push(*event_id);
                keys.push(key.clone());
            }
        }
        apalis_postgres::queries::push_tasks(&mut **tx, consumer, tasks).await?;
        sqlx::query(
            "UPDATE outbox_deliveries d SET status = 'queued', job_key = r.job_key, updated_at = now()
               FROM unnest($2::uuid[], $3::text[]) AS r(event_id, job_key)
              WHERE d.consumer = $1 AND d.event_id = r.event_id",
        )
        .bind(consumer)
        .bind(&released)
        .bind(&keys)
        .execute(&mut **tx)
        .await?;
    }
    Ok(due.len())
}

/// One pass, in one transaction: fans out a batch of new events, then
/// releases what is due, the deliveries just made included.
///
/// One relay at a time (each worker process runs one): two side by side
/// could each fan out part of a backlog, and one could then release an
/// aggregate's later event while the other's earlier delivery is still
/// uncommitted, so invisible to its ordering check. A relay that finds
/// the lock taken does nothing: the one holding it is woken by the same
/// notifications and passes again.
pub async fn pass(db: &Db, consumers: &[Arc<dyn Consumer>]) -> Result<Pass, RelayError> {
    let mut tx = db.begin_bookkeeping().await?;
    // A relay that hangs (its process stopped mid-pass) must not hold the
    // lock, and with it every other relay, for longer than this: Postgres
    // ends the session and the lock goes with it.
    let (ours,): (bool,) = sqlx::query_as(
        "SELECT pg_try_advisory_xact_lock(hashtext('keel.relay')),
                set_config('idle_in_transaction_session_timeout', '30s', true),
                set_config('statement_timeout', '30s', true)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !ours {
        tx.rollback().await?;
        return Ok(Pass {
            fanned: 0,
            released: 0,
        });
    }
    let fanned = fan_out(&mut tx, consumers).await?;
    let released = release(&mut tx, consumers).await?;
    tx.commit().await?;
    Ok(Pass { fanned, released })
}

/// What a [`pass`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    pub fanned: usize,
    pub released: usize,
}

impl Pass {
    /// Whether a batch was full, so that more may be waiting. A pass that
    /// took less than a batch saw everything committed before it began;
    /// whatever commits later sends its own notification.
    fn full(self) -> bool {
        self.fanned as i64 >= BATCH || self.released as i64 >= BATCH
    }
}

/// Runs passes until one finds less than a full batch.
pub async fn drain(db: &Db, consumers: &[Arc<dyn Consumer>]) -> Result<(), RelayError> {
    while pass(db, consumers).await?.full() {}
    Ok(())
}

/// Hands back every delivery still `queued` although its apalis job will
/// not run again (finished, failed for good or gone) and it has been
/// queued for a while: a run that could not record its own outcome (the
/// database unreachable as it read or marked the delivery). Each goes back
/// to `pending` with one attempt more (or `dead` after the last), so it is
/// released again as a new job, and the later events of its aggregate are
/// no longer held back behind it. A delivery whose job is still pending
/// or running (an orphaned job apalis re-runs included) is left alone.
/// Returns how many were handed back.
pub async fn requeue_stranded(db: &Db) -> Result<usize, RelayError> {
    let mut tx = db.begin_bookkeeping().await?;
    let stranded = sqlx::query(
        "WITH stranded AS (
             SELECT d.consumer, d.event_id FROM outbox_deliveries d
             WHERE d.status = 'queued' AND d.updated_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (
                   SELECT FROM apalis.jobs j
                   WHERE j.job_type = d.consumer
                     -- The job it was released in (a batch's), or its
                     -- own (a relay of a version before batches sets no
                     -- job_key, and may leave an older one behind).
                     AND j.idempotency_key IN (d.job_key, d.event_id::text || ':' || d.attempts)
                     -- A job that will still run, or is running.
                     AND (j.status IN ('Pending', 'Queued', 'Running')
                          OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))
             ORDER BY d.seq LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE outbox_deliveries d
         SET attempts = d.attempts + 1, updated_at = now(), available_at = now(),
             last_error = 'the delivery ended without recording its outcome',
             status = CASE WHEN d.attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END
         FROM stranded
         WHERE d.consumer = stranded.consumer AND d.event_id = stranded.event_id",
    )
    .bind(STRANDED_AFTER_SECS)
    .bind(BATCH)
    .bind(crate::MAX_ATTEMPTS)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(usize::try_from(stranded).unwrap_or(usize::MAX))
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
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            match requeue_stranded(&db).await {
                Ok(0) => {}
                Ok(count) => tracing::warn!(count, "handed stranded deliveries back to the relay"),
                Err(error) => {
                    tracing::error!(error = %error, "sweeping stranded deliveries failed")
                }
            }
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
                // Notifications that came meanwhile ask for the same pass:
                // one drain answers them all.
                while listener.next_buffered().is_some() {}
            }
        }
    }
}
