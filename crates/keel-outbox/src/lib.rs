//! Outbox delivery: from the `outbox` table to every consumer, at least
//! once, in order per aggregate, with retries and dead letters.
//!
//! Three steps, all coordinated through Postgres:
//!
//! 1. **Fan-out** ([`relay`]): each new outbox event gets one
//!    `outbox_deliveries` row per consumer that [`Consumer::wants`] it.
//! 2. **Release** ([`relay`]): a pending delivery whose predecessors for the
//!    same aggregate and consumer are all finished becomes an apalis job
//!    on the consumer's queue, in the same transaction (idempotency key =
//!    delivery and attempt). A consumer that takes batches
//!    ([`Consumer::batch_size`]) gets up to that many deliveries per job,
//!    of distinct aggregates. Fan-out and release run as one pass, in one
//!    transaction, under a lock that lets one relay at a time pass (every
//!    worker process runs a relay; the others wait for the next
//!    notification), so an aggregate's order never depends on another
//!    relay's uncommitted rows.
//! 3. **Run** ([`worker`]): an apalis worker per consumer (any number of
//!    worker processes side by side) runs the job: skips it if the
//!    consumer's inbox already has the event, else calls the consumer;
//!    success writes the inbox row and marks the delivery done in one
//!    transaction (a batch: one call of [`Consumer::handle_batch`] and one
//!    transaction for every outcome); failure stores the error, the attempt count and the next
//!    attempt time (exponential backoff) in the delivery, and after
//!    [`MAX_ATTEMPTS`] marks it dead. A run that could not record its
//!    outcome at all leaves the delivery `queued` behind an ended job; the
//!    relay's sweep ([`relay::requeue_stranded`]) hands it back.
//!
//! The worker purges what is no longer needed ([`retention`]): finished
//! apalis jobs after an hour, fully delivered events after a week.
//!
//! The relay sleeps on `LISTEN keel_outbox` (committed changes and finished
//! deliveries NOTIFY it), with a polling fallback. A new consumer is one
//! more [`Consumer`] implementation registered in `cmd/worker`: nothing
//! else changes.

pub mod relay;
pub mod retention;
pub mod worker;

use futures::future::BoxFuture;
use keel_core::ids::{EventId, TenantId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Attempts before a delivery is dead.
pub const MAX_ATTEMPTS: i32 = 10;

/// One event as a consumer receives it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeliveredEvent {
    pub id: EventId,
    pub tenant_id: Option<TenantId>,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub aggregate_version: i64,
    pub resource: String,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    pub request_id: String,
    pub created_at: OffsetDateTime,
}

/// Why a consumer could not handle an event this time; it will be retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    pub fn new(error: impl std::fmt::Display) -> Self {
        Self(error.to_string())
    }
}

/// A consumer of outbox events. It must be idempotent: a delivery can run
/// more than once (a worker crash between the effect and the inbox write).
pub trait Consumer: Send + Sync + 'static {
    /// Stable name: the apalis queue and the `consumer` column.
    fn name(&self) -> &'static str;
    /// Whether this consumer wants events of this type.
    fn wants(&self, event_type: &str) -> bool;
    fn handle<'a>(&'a self, event: &'a DeliveredEvent) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// How many deliveries one job may carry. With 1 (the default) each
    /// delivery is a job of its own; with more, the relay puts up to this
    /// many due deliveries of the consumer in one job, never two of one
    /// aggregate, and the worker hands them to
    /// [`Consumer::handle_batch`].
    fn batch_size(&self) -> usize {
        1
    }

    /// Handles events of distinct aggregates together: one result per
    /// event, in their order (a missing result is a failure). As
    /// idempotent as `handle`: a job can run more than once. The default
    /// handles them one after the other.
    fn handle_batch<'a>(
        &'a self,
        events: &'a [DeliveredEvent],
    ) -> BoxFuture<'a, Vec<Result<(), HandlerError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(events.len());
            for event in events {
                results.push(self.handle(event).await);
            }
            results
        })
    }
}

/// Refuses a consumer whose name is not a plain name (ASCII letters,
/// digits, `_`, `-`, `.`): the name is written into bookkeeping statements
/// as a literal. Checked before anything is relayed to it.
pub fn check_names(consumers: &[std::sync::Arc<dyn Consumer>]) -> Result<(), String> {
    match consumers
        .iter()
        .find(|consumer| keel_db::SqlLiteral::name(consumer.name()).is_none())
    {
        Some(consumer) => Err(format!(
            "consumer name {:?} must be a plain name (letters, digits, `_`, `-`, `.`)",
            consumer.name()
        )),
        None => Ok(()),
    }
}

/// The apalis job: which delivery to run (and, for a batch consumer, which
/// more after it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryJob {
    pub consumer: String,
    pub event_id: EventId,
    /// Further deliveries of the same job; absent in one-delivery jobs
    /// (and in the jobs of versions before batches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<EventId>,
}

/// Backoff before attempt `attempts + 1`: 1 s, 2 s, 4 s … capped at 5 min.
pub fn backoff_secs(attempts: i32) -> i64 {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(0);
    2_i64.pow(exponent).min(300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_secs(0), 1);
        assert_eq!(backoff_secs(3), 8);
        assert_eq!(backoff_secs(9), 300);
        assert_eq!(backoff_secs(-1), 1);
    }
}
