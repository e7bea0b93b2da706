//! The tenant's usage so far: closed runs and open ones up to now, priced
//! as the invoice would price them, per project; the same after the open
//! run is cut at the period end (nothing counted twice); and the CSV
//! exports.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use common::{Allocation, run, tenant};
use keel_billing::invoice::{Period, Policy};
use keel_billing::meter::{self, MeteringConsumer};
use keel_billing::money::Currency;
use keel_billing::usage;
use keel_core::ids::TenantId;
use keel_db::RequestMeta;
use keel_outbox::Consumer;
use time::macros::datetime;
use uuid::Uuid;

const HOUR_US: i64 = 3_600_000_000;

fn policy() -> Policy {
    Policy {
        currency: Currency::USD,
        tax_rate_bp: 0,
    }
}

#[tokio::test]
async fn usage_so_far_counts_open_runs_up_to_now_once() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    sqlx::query(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
         VALUES ($1, 'cpu.small', 'local-1', 'USD', 'hour', 100, '2026-01-01T00:00:00Z')",
    )
    .bind(Uuid::now_v7())
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    let closed = Allocation::of(tenant, "cpu.small");
    run(
        &meter,
        &closed,
        datetime!(2026-01-05 10:00 UTC),
        datetime!(2026-01-05 12:00 UTC),
    )
    .await;
    let open = Allocation::of(tenant, "cpu.small");
    meter
        .handle(&open.event(
            "running",
            Some("provisioning"),
            datetime!(2026-01-19 00:00 UTC),
        ))
        .await
        .unwrap();
    // Someone else's usage is not counted.
    run(
        &meter,
        &Allocation::of(common::tenant(&test).await, "cpu.small"),
        datetime!(2026-01-05 10:00 UTC),
        datetime!(2026-01-05 20:00 UTC),
    )
    .await;

    let january = Period::parse("2026-01").unwrap();
    let id = TenantId::from(tenant);
    let mut tx = test
        .db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    let mid = usage::so_far(
        tx.conn(),
        id,
        january,
        datetime!(2026-01-20 00:00 UTC),
        policy(),
    )
    .await
    .unwrap();
    assert_eq!(mid.lines.len(), 1);
    assert_eq!(
        (mid.lines[0].quantity, mid.lines[0].amount, mid.subtotal),
        (26 * HOUR_US, 2_600, 2_600)
    );
    let mut projects: Vec<(Uuid, i64)> = mid
        .by_project
        .iter()
        .map(|p| (p.project_id.0, p.quantity))
        .collect();
    projects.sort();
    let mut expected = vec![(closed.project, 2 * HOUR_US), (open.project, 24 * HOUR_US)];
    expected.sort();
    assert_eq!(projects, expected);

    // After the month: the open run counts to the month's end, before and
    // after it is cut there.
    let after = datetime!(2026-02-10 00:00 UTC);
    let before_cut = usage::so_far(tx.conn(), id, january, after, policy())
        .await
        .unwrap();
    assert_eq!(before_cut.lines[0].quantity, (2 + 13 * 24) * HOUR_US);
    meter::cut_open_runs(&test.db, tenant, january)
        .await
        .unwrap();
    let after_cut = usage::so_far(tx.conn(), id, january, after, policy())
        .await
        .unwrap();
    assert_eq!(after_cut.lines, before_cut.lines);
    assert_eq!(after_cut.by_project, before_cut.by_project);

    let csv = usage::usage_csv(tx.conn(), id, Period::parse("2026-02").unwrap(), after)
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "allocation_id,project_id,flavor,region,started_at,ended_at,quantity_us,status,invoice_id"
    );
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(
        lines[1].ends_with(&format!(",{},open,", 9 * 24 * HOUR_US)),
        "{csv}"
    );
    let csv = usage::usage_csv(tx.conn(), id, january, after)
        .await
        .unwrap();
    let statuses: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|line| line.split(',').nth(7).unwrap())
        .collect();
    assert_eq!(statuses, ["unbilled", "unbilled"]);
}
