//! What the billing tests share: allocations as their events describe
//! them, and reading the usage they were metered into.

#![allow(clippy::unwrap_used, dead_code)] // Tests fail loudly; not every test uses every helper.

use keel_billing::meter::RUN_METER;
use keel_core::ids::{EventId, TenantId};
use keel_outbox::DeliveredEvent;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

/// One allocation's identity, as its events carry it.
#[derive(Clone, Copy)]
pub struct Allocation {
    pub id: Uuid,
    pub tenant: Uuid,
    pub project: Uuid,
    pub flavor: &'static str,
}

impl Allocation {
    pub fn new() -> Self {
        Self::of(Uuid::now_v7(), "cpu.small")
    }

    /// An allocation of `flavor` in `tenant`.
    pub fn of(tenant: Uuid, flavor: &'static str) -> Self {
        Self {
            id: Uuid::now_v7(),
            tenant,
            project: Uuid::now_v7(),
            flavor,
        }
    }

    pub fn payload(
        &self,
        state: &str,
        previous: Option<&str>,
        at: OffsetDateTime,
    ) -> serde_json::Value {
        json!({
            "allocation_id": self.id,
            "tenant_id": self.tenant,
            "project_id": self.project,
            "state": state,
            "previous_state": previous,
            "host_id": Uuid::now_v7(),
            "flavor": self.flavor,
            "region": "local-1",
            "failure_reason": null,
            "at": at.format(&time::format_description::well_known::Rfc3339).unwrap(),
        })
    }

    /// An event as a delivery hands it to the consumer.
    pub fn event(&self, state: &str, previous: Option<&str>, at: OffsetDateTime) -> DeliveredEvent {
        DeliveredEvent {
            id: EventId::new(),
            tenant_id: Some(TenantId::from(self.tenant)),
            event_type: format!("allocation.{state}"),
            aggregate_type: "allocation".into(),
            aggregate_id: self.id,
            aggregate_version: 1,
            resource: "krn:keel:test".into(),
            payload: self.payload(state, previous, at),
            traceparent: None,
            request_id: "test".into(),
            created_at: at,
        }
    }
}

/// (period, started_at, ended_at, quantity) of the allocation's records.
pub async fn records(
    test: &keel_testing::TestDb,
    allocation: Uuid,
) -> Vec<(time::Date, OffsetDateTime, OffsetDateTime, i64)> {
    sqlx::query_as(
        "SELECT period_start, started_at, ended_at, quantity FROM usage_records
         WHERE allocation_id = $1 AND meter = $2 ORDER BY started_at",
    )
    .bind(allocation)
    .bind(RUN_METER)
    .fetch_all(&mut test.admin().await)
    .await
    .unwrap()
}

/// Meters one run of `allocation` from `start` to `end` (a `running` event,
/// then a `terminating` one), as the billing worker's deliveries would.
pub async fn run(
    meter: &keel_billing::meter::MeteringConsumer,
    allocation: &Allocation,
    start: OffsetDateTime,
    end: OffsetDateTime,
) {
    use keel_outbox::Consumer;
    meter
        .handle(&allocation.event("running", Some("provisioning"), start))
        .await
        .unwrap();
    meter
        .handle(&allocation.event("terminating", Some("running"), end))
        .await
        .unwrap();
}

/// A tenant row (invoices and credit refer to their tenant).
pub async fn tenant(test: &keel_testing::TestDb) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'billing test')")
        .bind(id)
        .execute(&mut test.admin().await)
        .await
        .unwrap();
    id
}
