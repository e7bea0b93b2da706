//! `keel-billing-bench`: billing's numbers for `make bench`
//! (`scripts/bench-billing.sh` makes the database and runs it).
//!
//! ```text
//! keel-billing-bench --database-url URL --admin-url URL [--allocations N]
//! ```
//!
//! 1. **Metering**: N allocations each get a `running` and a `terminating`
//!    event in the outbox (2N events, written as the api writes them).
//!    Then one billing worker — the relay and the billing consumer's apalis
//!    worker, as `cmd/worker` runs them, on the same database — takes them
//!    all; events metered per second, from the start to the last delivery
//!    done. Checked: N closed runs, N usage records. Target ≥ 5,000/s.
//! 2. **Invoicing**: a tenant with 10,000 allocations' runs in one month
//!    (usage records over three flavors, one of them with a price change in
//!    the middle of the month): the draft (cut + generate) and the
//!    finalization, each timed, then the reconciliation of the invoice.
//!    Target < 2 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_billing::invoice::{self, Period, Policy};
use keel_billing::meter::{self, MeteringConsumer};
use keel_billing::money::Currency;
use keel_core::ResourceName;
use keel_core::ids::TenantId;
use keel_db::{Audit, DatabaseConfig, Db, NewEvent, RequestMeta};
use keel_outbox::Consumer;
use serde_json::json;
use sqlx::Connection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

struct Args {
    database_url: String,
    admin_url: String,
    allocations: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut database_url, mut admin_url, mut allocations) = (None, None, 10_000);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--database-url" => database_url = Some(value),
            "--admin-url" => admin_url = Some(value),
            "--allocations" => allocations = value.parse().context("--allocations")?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        database_url: database_url.context("--database-url is required")?,
        admin_url: admin_url.context("--admin-url is required")?,
        allocations,
    })
}

fn policy() -> Policy {
    Policy {
        currency: Currency::USD,
        tax_rate_bp: 2_000,
    }
}

async fn new_tenant(admin: &mut sqlx::PgConnection, name: &str) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(admin)
        .await?;
    Ok(id)
}

/// Writes `running` then `terminating` for `allocations` allocations, as
/// the api does (one transaction per batch, events and audit together).
async fn write_events(db: &Db, tenant: Uuid, allocations: usize) -> anyhow::Result<()> {
    let tenant_id = TenantId::from(tenant);
    let project = Uuid::now_v7();
    let start = OffsetDateTime::now_utc() - time::Duration::hours(2);
    let mut written = 0;
    while written < allocations {
        let batch = (allocations - written).min(500);
        let mut tx = db
            .begin_system(RequestMeta::system("bench", "bench"))
            .await?;
        for n in 0..batch {
            let id = Uuid::now_v7();
            let at = start + time::Duration::milliseconds((written + n) as i64);
            let resource = ResourceName::new(None, Some(tenant_id), None, "allocation", id);
            for (version, state, previous, when) in [
                (1, "running", "provisioning", at),
                (
                    2,
                    "terminating",
                    "running",
                    at + time::Duration::minutes(30),
                ),
            ] {
                tx.emit(NewEvent::new(
                    if state == "running" {
                        "allocation.running"
                    } else {
                        "allocation.terminating"
                    },
                    "allocation",
                    id,
                    version,
                    Some(tenant_id),
                    resource.clone(),
                    json!({
                        "allocation_id": id, "tenant_id": tenant, "project_id": project,
                        "state": state, "previous_state": previous, "host_id": Uuid::now_v7(),
                        "flavor": "cpu.small", "region": "local-1", "failure_reason": null,
                        "at": when.format(&Rfc3339)?,
                    }),
                ));
            }
        }
        tx.commit(Audit::new(
            "bench.events",
            Some(tenant_id),
            ResourceName::tenant(tenant_id),
        ))
        .await?;
        written += batch;
    }
    Ok(())
}

async fn metering(db: &Db, admin_url: &str, allocations: usize) -> anyhow::Result<f64> {
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    let tenant = new_tenant(&mut admin, "metering bench").await?;
    write_events(db, tenant, allocations).await?;
    let events = 2 * allocations;
    let consumers: Vec<Arc<dyn Consumer>> = vec![Arc::new(
        MeteringConsumer::new(db.clone())
            .in_batches_of(keel_billing::BillingConfig::default().meter_batch_size as usize),
    )];
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let began = Instant::now();
    let relay = tokio::spawn(keel_outbox::relay::run(
        db.clone(),
        consumers.clone(),
        stopped,
    ));
    let monitor = keel_outbox::worker::monitor(db, &consumers, "bench");
    let mut monitor_stop = stop.subscribe();
    let worker = tokio::spawn(async move {
        monitor
            .run_with_signal(async move {
                let _ = monitor_stop.wait_for(|stop| *stop).await;
                Ok(())
            })
            .await
    });
    let elapsed = loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_deliveries WHERE consumer = 'billing' AND status = 'done'",
        )
        .fetch_one(&mut admin)
        .await?;
        if done as usize >= events {
            break began.elapsed();
        }
        if began.elapsed() > Duration::from_secs(600) {
            bail!("metering did not finish in 10 minutes ({done} of {events} done)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(true);
    let _ = relay.await;
    let _ = worker.await;
    let (runs, records): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM meter_runs WHERE tenant_id = $1 AND ended_at IS NOT NULL),
                (SELECT count(*) FROM usage_records WHERE tenant_id = $1)",
    )
    .bind(tenant)
    .fetch_one(&mut admin)
    .await?;
    if runs as usize != allocations || records as usize != allocations {
        bail!("expected {allocations} closed runs and records, found {runs} and {records}");
    }
    Ok(events as f64 / elapsed.as_secs_f64())
}

async fn invoicing(db: &Db, admin_url: &str) -> anyhow::Result<(Duration, Duration, usize)> {
    const ALLOCATIONS: i64 = 10_000;
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    let tenant = new_tenant(&mut admin, "invoice bench").await?;
    // A month that ended long ago, whatever the day the bench runs.
    let period = Period::before(OffsetDateTime::now_utc() - time::Duration::days(31));
    let start = period.start();
    let middle = start + time::Duration::days(14);
    // Prices: cpu.small changes price in the middle of the month.
    for (flavor, price, from, until) in [
        ("cpu.small", 120, start, Some(middle)),
        ("cpu.small", 150, middle, None),
        ("cpu.medium", 480, start, None),
        ("cpu.large", 1_900, start, None),
    ] {
        sqlx::query(
            "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from, effective_until)
             VALUES ($1, $2, 'local-1', 'USD', 'hour', $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(flavor)
        .bind(price)
        .bind(from)
        .bind(until)
        .execute(&mut admin)
        .await?;
    }
    // One run per allocation, spread over the month, 1 to 100 hours each.
    sqlx::query(
        "INSERT INTO usage_records (id, tenant_id, project_id, allocation_id, meter, flavor, region,
                                    period_start, started_at, ended_at, quantity, source_event_id)
         SELECT gen_random_uuid(), $1, $1, gen_random_uuid(), 'allocation.run',
                (ARRAY['cpu.small', 'cpu.medium', 'cpu.large'])[1 + n % 3], 'local-1', $2::date,
                s, s + (1 + n % 100) * interval '1 hour',
                (1 + n % 100)::bigint * 3600000000, gen_random_uuid()
           FROM generate_series(1, $3) AS n,
                LATERAL (SELECT $4::timestamptz + (n % 500) * interval '1 hour' AS s) t",
    )
    .bind(tenant)
    .bind(period.0)
    .bind(ALLOCATIONS)
    .bind(start)
    .execute(&mut admin)
    .await?;
    sqlx::query("ANALYZE usage_records")
        .execute(&mut admin)
        .await?;

    let tenant_id = TenantId::from(tenant);
    let began = Instant::now();
    meter::cut_open_runs(db, tenant, period).await?;
    let tx = db
        .begin_system(RequestMeta::system("bench", "bench"))
        .await?;
    let (draft, _) = invoice::generate(tx, policy(), tenant_id, period, false).await?;
    let drafted = began.elapsed();
    let draft = draft.context("the tenant has usage")?;
    let began = Instant::now();
    let tx = db
        .begin_system(RequestMeta::system("bench", "bench"))
        .await?;
    let finalized = invoice::finalize(tx, policy(), draft.invoice.id).await?;
    let finalizing = began.elapsed();
    let mut snapshot = db.begin_snapshot().await?;
    let (checked, discrepancies) = invoice::reconcile(&mut snapshot, Some(tenant_id)).await?;
    if checked != 1 || !discrepancies.is_empty() {
        bail!("the invoice does not reconcile: {discrepancies:?}");
    }
    Ok((drafted, finalizing, finalized.lines.len()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let mut config = DatabaseConfig::new(&args.database_url);
    config.max_connections = 16;
    let db = Db::connect(&config).await?;

    let rate = metering(&db, &args.admin_url, args.allocations).await?;
    let (drafted, finalized, lines) = invoicing(&db, &args.admin_url).await?;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("| measure | result | target |");
    println!("|---|---|---|");
    println!(
        "| usage events metered by one billing worker ({} events) | {rate:.0} events/s | ≥ 5,000/s: {} |",
        2 * args.allocations,
        verdict(rate >= 5_000.0)
    );
    println!(
        "| invoice draft (cut + rate) for 10,000 allocations in a month ({lines} lines) | {} ms | < 2 s: {} |",
        drafted.as_millis(),
        verdict(drafted < Duration::from_secs(2))
    );
    println!(
        "| invoice finalization (claim, rate, draw credit) | {} ms | < 2 s: {} |",
        finalized.as_millis(),
        verdict(finalized < Duration::from_secs(2))
    );
    Ok(())
}
