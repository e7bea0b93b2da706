//! Rate cards, invoices and the credit ledger against a real Postgres:
//! usage priced by the card in effect while it ran, drafts that regenerate
//! to nothing new, finalization that claims usage and draws credit, late
//! usage on the next invoice, voids, manual payment, and a reconciliation
//! that holds for every invoice (and catches one that was tampered with).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use common::{Allocation, run, tenant};
use keel_billing::BillingError;
use keel_billing::invoice::{self, Generated, InvoiceDetail, Period, Policy};
use keel_billing::ledger::{self, NewGrant};
use keel_billing::meter::{self, MeteringConsumer};
use keel_billing::money::{Currency, PriceUnit};
use keel_billing::rates::{self, NewRateCard};
use keel_billing::runs;
use keel_core::ids::{InvoiceId, TenantId};
use keel_core::page::PageParams;
use keel_db::{RequestMeta, WriteTx};
use keel_outbox::Consumer;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const HOUR_US: i64 = 3_600_000_000;

fn policy() -> Policy {
    Policy {
        currency: Currency::USD,
        tax_rate_bp: 1_000,
    }
}

async fn system(test: &keel_testing::TestDb) -> WriteTx {
    test.db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap()
}

/// A card written as set-up (cards made through the API start now or
/// later; these price usage in the past).
async fn card(
    test: &keel_testing::TestDb,
    flavor: &str,
    price_per_hour: i64,
    from: OffsetDateTime,
    until: Option<OffsetDateTime>,
) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from, effective_until)
         VALUES ($1, $2, 'local-1', 'USD', 'hour', $3, $4, $5)",
    )
    .bind(id)
    .bind(flavor)
    .bind(price_per_hour)
    .bind(from)
    .bind(until)
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    id
}

fn january() -> Period {
    Period::parse("2026-01").unwrap()
}

async fn generate(
    test: &keel_testing::TestDb,
    tenant: Uuid,
    period: Period,
) -> (Option<InvoiceDetail>, Generated) {
    meter::cut_open_runs(&test.db, tenant, period)
        .await
        .unwrap();
    invoice::generate(
        system(test).await,
        policy(),
        TenantId::from(tenant),
        period,
        false,
    )
    .await
    .unwrap()
}

async fn count(test: &keel_testing::TestDb, sql: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(id)
        .fetch_one(&mut test.admin().await)
        .await
        .unwrap()
}

async fn reconciles(test: &keel_testing::TestDb) -> usize {
    let mut snapshot = test.db.begin_snapshot().await.unwrap();
    let (checked, found) = invoice::reconcile(&mut snapshot, None).await.unwrap();
    assert!(found.is_empty(), "discrepancies: {found:?}");
    checked
}

#[tokio::test]
async fn usage_is_priced_by_the_card_in_effect_and_regenerating_adds_nothing() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let old = card(
        &test,
        "cpu.small",
        100,
        datetime!(2026-01-01 00:00 UTC),
        Some(datetime!(2026-01-15 00:00 UTC)),
    )
    .await;
    let new = card(
        &test,
        "cpu.small",
        200,
        datetime!(2026-01-15 00:00 UTC),
        None,
    )
    .await;
    // Two hours across the price change: one at each price.
    let small = Allocation::of(tenant, "cpu.small");
    run(
        &meter,
        &small,
        datetime!(2026-01-14 23:00 UTC),
        datetime!(2026-01-15 01:00 UTC),
    )
    .await;
    // Half an hour of a flavor without a price: on the invoice at 0.
    let medium = Allocation::of(tenant, "cpu.medium");
    run(
        &meter,
        &medium,
        datetime!(2026-01-20 10:00 UTC),
        datetime!(2026-01-20 10:30 UTC),
    )
    .await;
    // Another tenant's usage is not on this invoice.
    let other = Allocation::of(common::tenant(&test).await, "cpu.small");
    run(
        &meter,
        &other,
        datetime!(2026-01-20 10:00 UTC),
        datetime!(2026-01-20 12:00 UTC),
    )
    .await;

    let (draft, outcome) = generate(&test, tenant, january()).await;
    let draft = draft.unwrap();
    assert_eq!(outcome, Generated::Created);
    let lines: Vec<_> = draft
        .lines
        .iter()
        .map(|l| {
            (
                l.flavor.as_str(),
                l.rate_card_id.map(|c| c.as_uuid()),
                l.quantity,
                l.unit_price,
                l.amount,
            )
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("cpu.medium", None, HOUR_US / 2, 0, 0),
            ("cpu.small", Some(old), HOUR_US, 100, 100),
            ("cpu.small", Some(new), HOUR_US, 200, 200),
        ]
    );
    let invoice = &draft.invoice;
    assert_eq!(
        (
            invoice.state.as_str(),
            invoice.subtotal,
            invoice.tax,
            invoice.credits,
            invoice.total
        ),
        ("draft", 300, 30, 0, 330)
    );
    assert_eq!(
        (invoice.period_start, invoice.period_end),
        (
            time::macros::date!(2026 - 01 - 01),
            time::macros::date!(2026 - 02 - 01)
        )
    );

    // Again: nothing new, nothing written (no version, no audit row).
    let audits = "SELECT count(*) FROM audit_log WHERE resource LIKE '%invoice/' || $1::text";
    let before = count(&test, audits, invoice.id.as_uuid()).await;
    assert_eq!(before, 1, "the draft's creation");
    let (again, outcome) = generate(&test, tenant, january()).await;
    assert_eq!(outcome, Generated::Unchanged);
    assert_eq!(again.unwrap(), draft);
    assert_eq!(count(&test, audits, invoice.id.as_uuid()).await, before);

    // More January usage: the draft is recomputed.
    run(
        &meter,
        &small,
        datetime!(2026-01-16 00:00 UTC),
        datetime!(2026-01-16 00:30 UTC),
    )
    .await;
    let (updated, outcome) = generate(&test, tenant, january()).await;
    let updated = updated.unwrap();
    assert_eq!(outcome, Generated::Updated);
    assert_eq!(
        (updated.invoice.subtotal, updated.invoice.version),
        (400, invoice.version + 1)
    );

    // Finalized, it claims the usage and never changes again.
    let finalized = invoice::finalize(system(&test).await, policy(), invoice.id)
        .await
        .unwrap();
    assert_eq!(
        (finalized.invoice.state.as_str(), finalized.invoice.total),
        ("finalized", 440)
    );
    assert_eq!(finalized.lines, updated.lines);
    let unclaimed = count(
        &test,
        "SELECT count(*) FROM usage_records WHERE tenant_id = $1 AND invoice_id IS NULL",
        tenant,
    )
    .await;
    assert_eq!(unclaimed, 0);
    let (same, outcome) = generate(&test, tenant, january()).await;
    assert_eq!(outcome, Generated::Unchanged);
    assert_eq!(same.unwrap().invoice, finalized.invoice);
    let refinalized = invoice::finalize(system(&test).await, policy(), invoice.id)
        .await
        .unwrap();
    assert_eq!(refinalized.invoice, finalized.invoice);

    // January usage that arrives now is billed by the next invoice.
    run(
        &meter,
        &small,
        datetime!(2026-01-31 12:00 UTC),
        datetime!(2026-01-31 13:00 UTC),
    )
    .await;
    let (february, _) = generate(&test, tenant, Period::parse("2026-02").unwrap()).await;
    let february = february.unwrap();
    assert_eq!((february.invoice.subtotal, february.lines.len()), (200, 1));
    assert_eq!(reconciles(&test).await, 2);
}

#[tokio::test]
async fn bad_periods_and_tenants_are_refused() {
    let test = keel_testing::test_db().await;
    let tenant = tenant(&test).await;
    let now = OffsetDateTime::now_utc();
    let this_month = Period(keel_billing::period::period_of(now));
    let refused = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        this_month,
        true,
    )
    .await;
    assert!(matches!(refused, Err(BillingError::PeriodNotEnded)));
    assert!(matches!(
        meter::cut_open_runs(&test.db, tenant, this_month).await,
        Err(BillingError::PeriodNotEnded)
    ));
    let unknown = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::new(),
        january(),
        true,
    )
    .await;
    assert!(matches!(unknown, Err(BillingError::UnknownTenant)));
    for text in [
        "2026-13",
        "2026-00",
        "2026-1",
        "26-01",
        "2026/01",
        "",
        "2026-01-01",
        "9999-12",
        "1999-12",
    ] {
        assert!(Period::parse(text).is_none(), "{text}");
    }
    // An empty draft when asked; none from the worker's run.
    let (empty, outcome) = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        january(),
        false,
    )
    .await
    .unwrap();
    assert_eq!((empty, outcome), (None, Generated::Nothing));
    let (empty, _) = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        january(),
        true,
    )
    .await
    .unwrap();
    let empty = empty.unwrap();
    assert_eq!((empty.invoice.total, empty.lines.len()), (0, 0));
    // February waits for January's draft.
    let later = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        Period::parse("2026-02").unwrap(),
        true,
    )
    .await;
    assert!(matches!(later, Err(BillingError::EarlierInvoiceOpen)));
}

/// A January invoice of 300 + 30 tax for a new tenant.
async fn january_invoice(test: &keel_testing::TestDb) -> (Uuid, InvoiceId) {
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(test).await;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM rate_cards)")
        .fetch_one(&mut test.admin().await)
        .await
        .unwrap();
    if !exists {
        card(
            test,
            "cpu.small",
            100,
            datetime!(2026-01-01 00:00 UTC),
            None,
        )
        .await;
    }
    run(
        &meter,
        &Allocation::of(tenant, "cpu.small"),
        datetime!(2026-01-10 00:00 UTC),
        datetime!(2026-01-10 03:00 UTC),
    )
    .await;
    let (draft, _) = generate(test, tenant, january()).await;
    (tenant, draft.unwrap().invoice.id)
}

fn grant(amount: i64, reference: Option<&str>) -> NewGrant {
    NewGrant {
        amount,
        currency: "USD".into(),
        reference: reference.map(str::to_owned),
        note: "welcome".into(),
    }
}

async fn balance(test: &keel_testing::TestDb, tenant: Uuid) -> i64 {
    let mut tx = system(test).await;
    ledger::credit(
        tx.conn(),
        TenantId::from(tenant),
        Currency::USD,
        PageParams::default().validate().unwrap(),
    )
    .await
    .unwrap()
    .balance
}

#[tokio::test]
async fn credit_is_drawn_at_finalization_and_given_back_by_a_void() {
    let test = keel_testing::test_db().await;
    let (tenant, invoice_id) = january_invoice(&test).await;
    let id = TenantId::from(tenant);
    let granted = ledger::grant(
        system(&test).await,
        Currency::USD,
        id,
        grant(250, Some("po-1")),
    )
    .await
    .unwrap();
    // The same grant again is the same entry; the reference elsewhere is refused.
    let again = ledger::grant(
        system(&test).await,
        Currency::USD,
        id,
        grant(250, Some("po-1")),
    )
    .await
    .unwrap();
    assert_eq!(again, granted);
    assert!(matches!(
        ledger::grant(
            system(&test).await,
            Currency::USD,
            id,
            grant(999, Some("po-1"))
        )
        .await,
        Err(BillingError::ReferenceUsed(_))
    ));
    assert_eq!(balance(&test, tenant).await, 250);

    let finalized = invoice::finalize(system(&test).await, policy(), invoice_id)
        .await
        .unwrap()
        .invoice;
    assert_eq!(
        (
            finalized.state.as_str(),
            finalized.subtotal,
            finalized.tax,
            finalized.credits,
            finalized.total
        ),
        ("finalized", 300, 30, 250, 80)
    );
    assert_eq!(balance(&test, tenant).await, 0);

    // Voided, the draw comes back; voiding again changes nothing.
    let void = invoice::void(system(&test).await, policy(), invoice_id, "goodwill")
        .await
        .unwrap()
        .invoice;
    assert_eq!(void.state, "void");
    assert_eq!(balance(&test, tenant).await, 250);
    let again = invoice::void(system(&test).await, policy(), invoice_id, "again")
        .await
        .unwrap()
        .invoice;
    assert_eq!(again, void);
    assert_eq!(balance(&test, tenant).await, 250);
    assert!(matches!(
        invoice::finalize(system(&test).await, policy(), invoice_id).await,
        Err(BillingError::InvoiceState(_))
    ));
    assert_eq!(reconciles(&test).await, 1);
}

#[tokio::test]
async fn an_invoice_credit_covers_is_paid_and_others_are_marked_paid_once() {
    let test = keel_testing::test_db().await;
    let (rich, covered) = january_invoice(&test).await;
    ledger::grant(
        system(&test).await,
        Currency::USD,
        TenantId::from(rich),
        grant(1_000, None),
    )
    .await
    .unwrap();
    let paid = invoice::finalize(system(&test).await, policy(), covered)
        .await
        .unwrap()
        .invoice;
    assert_eq!(
        (
            paid.state.as_str(),
            paid.credits,
            paid.total,
            paid.payment_method.as_deref()
        ),
        ("paid", 330, 0, Some("credit"))
    );
    assert_eq!(balance(&test, rich).await, 670);
    assert!(matches!(
        invoice::void(system(&test).await, policy(), covered, "no").await,
        Err(BillingError::InvoiceState(_))
    ));

    let (_, due) = january_invoice(&test).await;
    assert!(matches!(
        invoice::mark_paid(system(&test).await, due, "manual", "wire-1").await,
        Err(BillingError::InvoiceState(_))
    ));
    invoice::finalize(system(&test).await, policy(), due)
        .await
        .unwrap();
    let marked = invoice::mark_paid(system(&test).await, due, "manual", "wire-1")
        .await
        .unwrap()
        .invoice;
    assert_eq!(
        (marked.state.as_str(), marked.payment_reference.as_deref()),
        ("paid", Some("wire-1"))
    );
    let again = invoice::mark_paid(system(&test).await, due, "manual", "wire-1")
        .await
        .unwrap()
        .invoice;
    assert_eq!(again, marked);
    assert!(matches!(
        invoice::mark_paid(system(&test).await, due, "manual", "wire-2").await,
        Err(BillingError::InvoiceState(_))
    ));
    assert_eq!(reconciles(&test).await, 2);
}

#[tokio::test]
async fn bad_grants_are_refused_and_the_ledger_is_append_only() {
    let test = keel_testing::test_db().await;
    let tenant = tenant(&test).await;
    let id = TenantId::from(tenant);
    for amount in [0, -5, keel_billing::money::MAX_AMOUNT + 1] {
        assert!(matches!(
            ledger::grant(system(&test).await, Currency::USD, id, grant(amount, None)).await,
            Err(BillingError::Validation(_))
        ));
    }
    let mut euros = grant(100, None);
    euros.currency = "EUR".into();
    assert!(matches!(
        ledger::grant(system(&test).await, Currency::USD, id, euros).await,
        Err(BillingError::CurrencyMismatch { .. })
    ));
    let mut nonsense = grant(100, None);
    nonsense.currency = "usd".into();
    assert!(matches!(
        ledger::grant(system(&test).await, Currency::USD, id, nonsense).await,
        Err(BillingError::Validation(_))
    ));
    assert!(matches!(
        ledger::grant(
            system(&test).await,
            Currency::USD,
            TenantId::new(),
            grant(1, None)
        )
        .await,
        Err(BillingError::UnknownTenant)
    ));
    let entry = ledger::grant(system(&test).await, Currency::USD, id, grant(100, None))
        .await
        .unwrap();
    let mut admin = test.admin().await;
    for statement in [
        "UPDATE credit_entries SET amount = 1000000 WHERE id = $1",
        "DELETE FROM credit_entries WHERE id = $1",
    ] {
        let refused = sqlx::query(statement)
            .bind(entry.id)
            .execute(&mut admin)
            .await;
        assert!(refused.is_err(), "{statement} must be refused");
    }
    assert_eq!(balance(&test, tenant).await, 100);
    let audited = count(
        &test,
        "SELECT count(*) FROM audit_log WHERE action = 'credit.grant' AND tenant_id = $1",
        tenant,
    )
    .await;
    assert_eq!(audited, 1);
}

#[tokio::test]
async fn reconciliation_catches_an_invoice_that_does_not_add_up() {
    let test = keel_testing::test_db().await;
    let (_, invoice_id) = january_invoice(&test).await;
    invoice::finalize(system(&test).await, policy(), invoice_id)
        .await
        .unwrap();
    assert_eq!(reconciles(&test).await, 1);
    sqlx::query("UPDATE invoice_lines SET amount = amount + 1 WHERE invoice_id = $1")
        .bind(invoice_id)
        .execute(&mut test.admin().await)
        .await
        .unwrap();
    let mut snapshot = test.db.begin_snapshot().await.unwrap();
    let (_, found) = invoice::reconcile(&mut snapshot, None).await.unwrap();
    let problems: Vec<&str> = found.iter().map(|d| d.problem.as_str()).collect();
    assert!(
        problems.iter().any(|p| p.starts_with("subtotal")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("not the rating")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn open_runs_are_cut_at_the_period_end_once_billing_has_their_events() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let allocation = Allocation::of(tenant, "cpu.small");
    meter
        .handle(&allocation.event(
            "running",
            Some("provisioning"),
            datetime!(2026-01-31 22:00 UTC),
        ))
        .await
        .unwrap();
    let february = january();

    // An event of the allocation billing has not seen yet holds the cut.
    let mut admin = test.admin().await;
    let pending = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, tenant_id, event_type, aggregate_type, aggregate_id,
                             aggregate_version, resource, payload, request_id)
         VALUES ($1, $2, 'allocation.stopping', 'allocation', $3, 9, 'krn:keel:test', '{}', 'test')",
    )
    .bind(pending)
    .bind(tenant)
    .bind(allocation.id)
    .execute(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        meter::cut_open_runs(&test.db, tenant, february)
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE outbox SET fanned_out_at = now() WHERE id = $1")
        .bind(pending)
        .execute(&mut admin)
        .await
        .unwrap();
    // So does one whose billing delivery is waiting, or dead.
    for status in ["pending", "queued", "dead"] {
        sqlx::query(
            "INSERT INTO outbox_deliveries (consumer, event_id, aggregate_id, seq, status)
             SELECT 'billing', id, aggregate_id, seq, $2 FROM outbox WHERE id = $1
             ON CONFLICT (consumer, event_id) DO UPDATE SET status = $2",
        )
        .bind(pending)
        .bind(status)
        .execute(&mut admin)
        .await
        .unwrap();
        assert_eq!(
            meter::cut_open_runs(&test.db, tenant, february)
                .await
                .unwrap(),
            0,
            "{status}"
        );
    }
    sqlx::query("UPDATE outbox_deliveries SET status = 'done' WHERE event_id = $1")
        .bind(pending)
        .execute(&mut admin)
        .await
        .unwrap();

    assert_eq!(
        meter::cut_open_runs(&test.db, tenant, february)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        meter::cut_open_runs(&test.db, tenant, february)
            .await
            .unwrap(),
        0,
        "cut once"
    );
    meter
        .handle(&allocation.event("stopping", Some("running"), datetime!(2026-02-01 01:00 UTC)))
        .await
        .unwrap();
    let got: Vec<(time::Date, i64)> = common::records(&test, allocation.id)
        .await
        .into_iter()
        .map(|(period, _, _, quantity)| (period, quantity))
        .collect();
    assert_eq!(
        got,
        [
            (time::macros::date!(2026 - 01 - 01), 2 * HOUR_US),
            (time::macros::date!(2026 - 02 - 01), HOUR_US),
        ]
    );

    // A close that turns up with a time before the cut (its event was dead
    // when the cut ran) ends the run and bills nothing more.
    let late = Allocation::of(tenant, "cpu.small");
    meter
        .handle(&late.event(
            "running",
            Some("provisioning"),
            datetime!(2026-01-31 23:00 UTC),
        ))
        .await
        .unwrap();
    assert_eq!(
        meter::cut_open_runs(&test.db, tenant, february)
            .await
            .unwrap(),
        1
    );
    meter
        .handle(&late.event("stopping", Some("running"), datetime!(2026-01-31 23:30 UTC)))
        .await
        .unwrap();
    let got: Vec<i64> = common::records(&test, late.id)
        .await
        .into_iter()
        .map(|record| record.3)
        .collect();
    assert_eq!(got, [HOUR_US]);
    let open = count(
        &test,
        "SELECT count(*) FROM meter_runs WHERE allocation_id = $1 AND ended_at IS NULL",
        late.id,
    )
    .await;
    assert_eq!(open, 0);
}

#[tokio::test]
async fn the_worker_run_drafts_last_month_and_finalizes_when_due() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    // As of a day that makes "last month" one that ended weeks ago, so the
    // test does not depend on the day it runs.
    let as_of = OffsetDateTime::now_utc() - time::Duration::days(40);
    let last_month = Period::before(as_of);
    card(&test, "cpu.small", 60, last_month.start(), None).await;
    run(
        &meter,
        &Allocation::of(tenant, "cpu.small"),
        last_month.start() + time::Duration::days(2),
        last_month.start() + time::Duration::days(2) + time::Duration::hours(5),
    )
    .await;
    let later = time::Duration::days(3650);
    let run = |finalize_after| runs::invoice_run_as_of(&test.db, policy(), finalize_after, as_of);
    let report = run(later).await.unwrap();
    assert_eq!((report.drafted, report.finalized, report.failed), (1, 0, 0));
    let report = run(later).await.unwrap();
    assert_eq!(report, runs::RunReport::default(), "nothing new");
    let report = run(time::Duration::ZERO).await.unwrap();
    assert_eq!((report.drafted, report.finalized), (0, 1));
    let mut tx = system(&test).await;
    let invoices = invoice::list(
        tx.conn(),
        Some(TenantId::from(tenant)),
        None,
        PageParams::default().validate().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(invoices.items.len(), 1);
    assert_eq!(
        (invoices.items[0].state.as_str(), invoices.items[0].total),
        ("finalized", 330)
    );
}

#[tokio::test]
async fn rate_cards_change_prices_forward_and_refuse_overlaps_and_bad_input() {
    let test = keel_testing::test_db().await;
    let card = |from: Option<OffsetDateTime>| NewRateCard {
        flavor: "cpu.large".into(),
        region: "local-1".into(),
        currency: "USD".into(),
        unit: PriceUnit::Hour,
        unit_price: 500,
        effective_from: from,
    };
    let now = rates::create(system(&test).await, Currency::USD, card(None))
        .await
        .unwrap();
    let next_month = OffsetDateTime::now_utc() + time::Duration::days(30);
    let later = rates::create(system(&test).await, Currency::USD, card(Some(next_month)))
        .await
        .unwrap();
    let mut tx = system(&test).await;
    let listed = rates::list(tx.conn(), &Default::default()).await.unwrap();
    drop(tx);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, now.id);
    assert_eq!(listed[0].effective_until, Some(later.effective_from));
    assert_eq!(listed[1].effective_until, None);

    // Between the two: overlaps the first card's remaining time.
    let between = OffsetDateTime::now_utc() + time::Duration::days(10);
    assert!(matches!(
        rates::create(system(&test).await, Currency::USD, card(Some(between))).await,
        Err(BillingError::RateCardOverlap)
    ));
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert!(matches!(
        rates::create(system(&test).await, Currency::USD, card(Some(past))).await,
        Err(BillingError::EffectiveFromInPast)
    ));
    let mut euros = card(None);
    euros.currency = "EUR".into();
    assert!(matches!(
        rates::create(system(&test).await, Currency::USD, euros).await,
        Err(BillingError::CurrencyMismatch { .. })
    ));
    let mut bad = card(None);
    bad.currency = "dollars".into();
    bad.unit_price = -1;
    match rates::create(system(&test).await, Currency::USD, bad).await {
        Err(BillingError::Validation(fields)) => assert_eq!(fields.len(), 2),
        other => panic!("expected a validation error, got {other:?}"),
    }
    let mut unknown = card(None);
    unknown.flavor = "cpu.huge".into();
    assert!(matches!(
        rates::create(system(&test).await, Currency::USD, unknown).await,
        Err(BillingError::UnknownFlavor)
    ));
    let mut nowhere = card(None);
    nowhere.region = "mars-1".into();
    assert!(matches!(
        rates::create(system(&test).await, Currency::USD, nowhere).await,
        Err(BillingError::UnknownRegion)
    ));
    let mut tx = system(&test).await;
    assert_eq!(
        rates::list(tx.conn(), &Default::default())
            .await
            .unwrap()
            .len(),
        2,
        "refusals change nothing"
    );
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'rate_card.%' ORDER BY action",
    )
    .fetch_all(&mut test.admin().await)
    .await
    .unwrap();
    assert_eq!(
        audited,
        ["rate_card.create", "rate_card.create", "rate_card.end"]
    );
}

#[tokio::test]
async fn a_voided_draft_forgives_its_usage_for_good() {
    let test = keel_testing::test_db().await;
    let (tenant, invoice_id) = january_invoice(&test).await;
    let void = invoice::void(system(&test).await, policy(), invoice_id, "trial month")
        .await
        .unwrap();
    assert_eq!(
        (
            void.invoice.state.as_str(),
            void.invoice.subtotal,
            void.lines.len()
        ),
        ("void", 300, 1)
    );
    assert!(void.invoice.finalized_at.is_some());
    // February's invoice does not bill January again.
    let (february, _) = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        Period::parse("2026-02").unwrap(),
        true,
    )
    .await
    .unwrap();
    assert_eq!(february.unwrap().invoice.subtotal, 0);
    assert_eq!(balance(&test, tenant).await, 0, "no credit moved");
    assert_eq!(reconciles(&test).await, 2);
    // A tenant's earlier month is not drafted under a later draft.
    let refused = invoice::generate(
        system(&test).await,
        policy(),
        TenantId::from(tenant),
        Period::parse("2025-12").unwrap(),
        true,
    )
    .await;
    assert!(matches!(refused, Err(BillingError::InvoiceState(_))));
}
