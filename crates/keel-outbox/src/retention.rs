//! What the outbox keeps, and for how long: without a purge the events,
//! their deliveries, the consumers' inbox rows and apalis' finished jobs
//! would grow with every change ever made.
//!
//! - A finished apalis job (done, killed, or failed for good) is kept for
//!   [`JOB_RETENTION`]: the delivery row, not the job, is the record of
//!   what happened (status, attempts, last error). A delivery still
//!   `queued` behind a purged job is one whose run never recorded its
//!   outcome, and [`crate::relay::requeue_stranded`] hands it back exactly
//!   as it would with the job still there.
//! - An event is kept for [`EVENT_RETENTION`] after its fan-out, and then
//!   only while it has a delivery that is not `done`: a dead one stays
//!   until an operator has dealt with it. Its deliveries and inbox rows go
//!   with it. The audit log, not the outbox, is the lasting history.

use std::time::Duration;

use keel_db::Db;

use crate::relay::RelayError;

/// How long a finished apalis job is kept.
pub const JOB_RETENTION: Duration = Duration::from_secs(60 * 60);
/// How long a delivered event is kept after its fan-out.
pub const EVENT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Rows deleted per statement, so no purge holds its locks for long.
const BATCH: i64 = 5_000;

/// What one [`purge`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub jobs: u64,
    pub events: u64,
}

/// Deletes finished apalis jobs older than [`JOB_RETENTION`] and fully
/// delivered events older than [`EVENT_RETENTION`] (with their deliveries
/// and inbox rows), a batch per transaction until none is left.
pub async fn purge(db: &Db) -> Result<Purged, RelayError> {
    let mut purged = Purged::default();
    loop {
        let jobs = purge_batch(db, PURGE_JOBS, JOB_RETENTION).await?;
        purged.jobs += jobs;
        if jobs < BATCH as u64 {
            break;
        }
    }
    loop {
        let events = purge_batch(db, PURGE_EVENTS, EVENT_RETENTION).await?;
        purged.events += events;
        if events < BATCH as u64 {
            break;
        }
    }
    Ok(purged)
}

const PURGE_JOBS: &str = "
    DELETE FROM apalis.jobs WHERE id IN (
        SELECT id FROM apalis.jobs
        WHERE (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
          AND done_at < now() - make_interval(secs => $1)
        LIMIT $2 FOR UPDATE SKIP LOCKED)";

// The inbox rows and deliveries are deleted by the same statement as their
// events: the foreign keys are checked at its end.
const PURGE_EVENTS: &str = "
    WITH old AS (
        SELECT o.id FROM outbox o
        WHERE o.fanned_out_at < now() - make_interval(secs => $1)
          AND NOT EXISTS (SELECT FROM outbox_deliveries d
                          WHERE d.event_id = o.id AND d.status <> 'done')
        ORDER BY o.seq LIMIT $2 FOR UPDATE SKIP LOCKED),
    inbox AS (DELETE FROM consumer_inbox i USING old WHERE i.event_id = old.id),
    deliveries AS (DELETE FROM outbox_deliveries d USING old WHERE d.event_id = old.id)
    DELETE FROM outbox o USING old WHERE o.id = old.id";

async fn purge_batch(
    db: &Db,
    statement: &'static str,
    retention: Duration,
) -> Result<u64, RelayError> {
    let mut tx = db.begin_bookkeeping().await?;
    // A batch that takes this long is cut short (and retried at the next
    // purge) rather than holding its locks.
    sqlx::query("SELECT set_config('statement_timeout', '60s', true)")
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query(statement)
        .bind(retention.as_secs_f64())
        .bind(BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}
