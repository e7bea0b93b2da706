//! The worker's Prometheus metrics: allocations by state and past their
//! deadline, outbox lag, dead and failed deliveries. Refreshed with the
//! worker's 5-second sweep, served by `keel_http::metrics::serve`.

use keel_http::metrics::Registry;
use keel_http::metrics::prometheus_client::metrics::counter::Counter;
use keel_http::metrics::prometheus_client::metrics::family::Family;
use keel_http::metrics::prometheus_client::metrics::gauge::Gauge;

/// `state`: an allocation state.
type StateLabels = [(&'static str, String); 1];

const ALL_STATES: &[&str] = &[
    "requested",
    "scheduled",
    "provisioning",
    "running",
    "stopping",
    "stopped",
    "starting",
    "terminating",
    "terminated",
    "failed",
    "lost",
];

/// What the worker reports.
#[derive(Clone, Debug, Default)]
pub struct WorkerMetrics {
    allocations: Family<StateLabels, Gauge>,
    past_deadline: Gauge,
    pending: Gauge,
    oldest_pending_secs: Gauge,
    dead: Gauge,
    failures: Counter,
    failures_seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "keel_allocations",
            "Allocations by state",
            metrics.allocations.clone(),
        );
        registry.register(
            "keel_allocations_past_deadline",
            "Allocations past the deadline of their state (waiting for an offline host, or a stop not yet confirmed)",
            metrics.past_deadline.clone(),
        );
        registry.register(
            "keel_outbox_pending_deliveries",
            "Outbox deliveries not yet done",
            metrics.pending.clone(),
        );
        registry.register(
            "keel_outbox_lag_seconds",
            "Age of the oldest outbox event not yet delivered",
            metrics.oldest_pending_secs.clone(),
        );
        registry.register(
            "keel_outbox_dead_deliveries",
            "Outbox deliveries given up on (dead letters)",
            metrics.dead.clone(),
        );
        registry.register(
            "keel_outbox_delivery_failures",
            "Failed delivery attempts in this worker",
            metrics.failures.clone(),
        );
        metrics
    }

    /// Reads the current numbers from the database.
    /// `past_deadline` is the reconciler's latest count (`None`: its pass
    /// failed, and the last count stands).
    pub async fn refresh(
        &self,
        db: &keel_db::Db,
        past_deadline: Option<i64>,
    ) -> anyhow::Result<()> {
        let mut tx = db.begin_bookkeeping().await?;
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM allocations GROUP BY state")
                .fetch_all(&mut *tx)
                .await?;
        let (pending, lag, dead): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE d.status IN ('pending', 'queued')),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(o.created_at)
                                 FILTER (WHERE d.status IN ('pending', 'queued')))::bigint, 0),
                    count(*) FILTER (WHERE d.status = 'dead')
               FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
              WHERE d.status IN ('pending', 'queued', 'dead')",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        // Every state is reported, 0 included, so none drops out.
        for state in ALL_STATES {
            let count = states
                .iter()
                .find(|(name, _)| name == state)
                .map_or(0, |(_, count)| *count);
            self.allocations
                .get_or_create(&[("state", (*state).to_owned())])
                .set(count);
        }
        if let Some(past_deadline) = past_deadline {
            self.past_deadline.set(past_deadline);
        }
        self.pending.set(pending);
        self.oldest_pending_secs.set(lag);
        self.dead.set(dead);
        let failures = keel_outbox::worker::delivery_failures();
        let seen = self
            .failures_seen
            .swap(failures, std::sync::atomic::Ordering::Relaxed);
        self.failures.inc_by(failures.saturating_sub(seen));
        Ok(())
    }
}
