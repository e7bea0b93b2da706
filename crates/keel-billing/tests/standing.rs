//! The prepaid credit policy: a prepaid tenant whose available credit runs
//! out is warned, then its launches stop, then (after the grace) what runs
//! stops, one evented and audited step at a time; credit brings it back;
//! low-balance events go out once per threshold crossed; invoiced tenants
//! are never touched.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use common::{Allocation, tenant};
use keel_billing::BillingConfig;
use keel_billing::config::BillingMode;
use keel_billing::ledger::{self, NewGrant};
use keel_billing::meter::MeteringConsumer;
use keel_billing::money::Currency;
use keel_billing::standing::{self, AccountUpdate, Change};
use keel_core::ids::TenantId;
use keel_db::RequestMeta;
use keel_outbox::Consumer;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

fn config() -> BillingConfig {
    BillingConfig {
        low_balance_thresholds: vec![1_000, 300],
        stop_launches_after_secs: 3_600,
        suspend_after_secs: 86_400,
        ..BillingConfig::default()
    }
}

async fn events(test: &keel_testing::TestDb, tenant: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM outbox WHERE tenant_id = $1
            AND (event_type LIKE 'billing.%' OR event_type LIKE 'credit.low%') ORDER BY seq",
    )
    .bind(tenant)
    .fetch_all(&mut test.admin().await)
    .await
    .unwrap()
}

async fn grant(test: &keel_testing::TestDb, tenant: Uuid, amount: i64) {
    let tx = test
        .db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    ledger::grant(
        tx,
        Currency::USD,
        TenantId::from(tenant),
        NewGrant {
            amount,
            currency: "USD".into(),
            reference: None,
            note: String::new(),
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn running_out_of_credit_warns_then_stops_launches_then_suspends_and_credit_restores() {
    let test = keel_testing::test_db().await;
    let config = config();
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let id = TenantId::from(tenant);
    sqlx::query(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
         VALUES ($1, 'cpu.small', 'local-1', 'USD', 'hour', 100, '2026-01-01T00:00:00Z')",
    )
    .bind(Uuid::now_v7())
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    let tx = test
        .db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    let account = standing::set_mode(
        tx,
        &config,
        id,
        AccountUpdate {
            mode: BillingMode::Prepaid,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (account.mode, account.standing.as_str()),
        (BillingMode::Prepaid, "active")
    );
    grant(&test, tenant, 1_200).await;
    let started = datetime!(2026-01-10 00:00 UTC);
    meter
        .handle(&Allocation::of(tenant, "cpu.small").event(
            "running",
            Some("provisioning"),
            started,
        ))
        .await
        .unwrap();
    let at = |hours: i64| started + time::Duration::hours(hours);
    let check = |now: OffsetDateTime| standing::evaluate(&test.db, &config, id, now);

    // 1,200 - 300 = 900: below 1,000.
    assert_eq!(check(at(3)).await.unwrap(), Change::LowBalance);
    assert_eq!(
        check(at(3)).await.unwrap(),
        Change::None,
        "once per crossing"
    );
    // 1,200 - 1,000 = 200: below 300 too.
    assert_eq!(check(at(10)).await.unwrap(), Change::LowBalance);
    // 1,200 - 1,300 < 0: warned; launches stop an hour later, not before.
    assert_eq!(check(at(13)).await.unwrap(), Change::Stepped);
    assert_eq!(
        check(at(13) + time::Duration::minutes(30)).await.unwrap(),
        Change::None
    );
    assert_eq!(check(at(14)).await.unwrap(), Change::Stepped);
    // The grace: a day later, what runs stops.
    assert_eq!(check(at(20)).await.unwrap(), Change::None);
    assert_eq!(check(at(14 + 24)).await.unwrap(), Change::Stepped);
    let mut conn = test.admin().await;
    let standing: String =
        sqlx::query_scalar("SELECT standing FROM billing_accounts WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(standing, "suspended");

    // Credit back above what is owed: active again, launches resume.
    grant(&test, tenant, 10_000).await;
    assert_eq!(check(at(40)).await.unwrap(), Change::Stepped);
    assert_eq!(
        events(&test, tenant).await,
        [
            "credit.low_balance",
            "credit.low_balance",
            "billing.credit_exhausted",
            "billing.launches_stopped",
            "billing.tenant_suspended",
            "billing.launches_resumed",
        ]
    );
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE tenant_id = $1
            AND action IN ('billing.warn', 'billing.stop_launches', 'billing.suspend',
                           'billing.reactivate', 'credit.low_balance')
          ORDER BY occurred_at, id",
    )
    .bind(tenant)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(audited.len(), 6, "{audited:?}");

    let mut tx = test
        .db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    let account = standing::account(tx.conn(), &config, id, at(40))
        .await
        .unwrap();
    assert_eq!(
        (account.balance, account.outstanding, account.available),
        (11_200, 4_000, 7_200)
    );
}

#[tokio::test]
async fn invoiced_tenants_are_never_held_and_leaving_prepaid_lifts_a_hold() {
    let test = keel_testing::test_db().await;
    let config = BillingConfig {
        stop_launches_after_secs: 0,
        ..config()
    };
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let id = TenantId::from(tenant);
    meter
        .handle(&Allocation::of(tenant, "cpu.small").event(
            "running",
            Some("provisioning"),
            datetime!(2026-01-10 00:00 UTC),
        ))
        .await
        .unwrap();
    // Usage without a price owes nothing: a prepaid tenant with no credit
    // is at 0 available, which is out.
    let now = datetime!(2026-01-11 00:00 UTC);
    assert_eq!(
        standing::evaluate(&test.db, &config, id, now)
            .await
            .unwrap(),
        Change::None,
        "the default mode is invoiced"
    );
    set(&test, &config, id, BillingMode::Prepaid).await;
    // Both thresholds crossed at once: one event each.
    assert_eq!(
        standing::evaluate(&test.db, &config, id, now)
            .await
            .unwrap(),
        Change::Stepped
    );
    assert_eq!(
        standing::evaluate(&test.db, &config, id, now)
            .await
            .unwrap(),
        Change::Stepped,
        "no wait before launches stop"
    );
    let account = set(&test, &config, id, BillingMode::Invoiced).await;
    assert_eq!(
        (account.mode, account.standing.as_str()),
        (BillingMode::Invoiced, "active")
    );
    assert_eq!(
        events(&test, tenant).await,
        [
            "billing.credit_exhausted",
            "credit.low_balance",
            "credit.low_balance",
            "billing.launches_stopped",
            "billing.launches_resumed",
        ]
    );
    assert_eq!(
        standing::evaluate(&test.db, &config, id, now)
            .await
            .unwrap(),
        Change::None
    );
}

async fn set(
    test: &keel_testing::TestDb,
    config: &BillingConfig,
    id: TenantId,
    mode: BillingMode,
) -> standing::AccountView {
    let tx = test
        .db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    standing::set_mode(tx, config, id, AccountUpdate { mode })
        .await
        .unwrap()
}

#[tokio::test]
async fn owed_money_counts_once_through_a_draft_and_a_finalization() {
    use keel_billing::invoice::{self, Period};
    let test = keel_testing::test_db().await;
    let config = config();
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let id = TenantId::from(tenant);
    sqlx::query(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
         VALUES ($1, 'cpu.small', 'local-1', 'USD', 'hour', 100, '2026-01-01T00:00:00Z')",
    )
    .bind(Uuid::now_v7())
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    common::run(
        &meter,
        &Allocation::of(tenant, "cpu.small"),
        datetime!(2026-01-05 00:00 UTC),
        datetime!(2026-01-05 03:00 UTC),
    )
    .await;
    grant(&test, tenant, 100).await;
    let figures = || async {
        let mut tx = test
            .db
            .begin_system(RequestMeta::system("test", "test"))
            .await
            .unwrap();
        let account = standing::account(tx.conn(), &config, id, datetime!(2026-02-10 00:00 UTC))
            .await
            .unwrap();
        (account.balance, account.outstanding, account.available)
    };
    assert_eq!(figures().await, (100, 300, -200), "unbilled usage");
    let policy = invoice::Policy::from(&config);
    let system = || async {
        test.db
            .begin_system(RequestMeta::system("test", "test"))
            .await
            .unwrap()
    };
    let january = Period::parse("2026-01").unwrap();
    let (draft, _) = invoice::generate(system().await, policy, id, january, false)
        .await
        .unwrap();
    assert_eq!(figures().await, (100, 300, -200), "a draft claims nothing");
    invoice::finalize(system().await, policy, draft.unwrap().invoice.id)
        .await
        .unwrap();
    assert_eq!(
        figures().await,
        (0, 200, -200),
        "finalized: credit drawn, the rest due"
    );
}

#[tokio::test]
async fn marks_re_arm_stale_checks_change_nothing_and_a_reopened_run_is_stopped_once() {
    let test = keel_testing::test_db().await;
    let config = BillingConfig {
        stop_launches_after_secs: 300,
        suspend_after_secs: 300,
        ..config()
    };
    let meter = MeteringConsumer::new(test.db.clone());
    let tenant = tenant(&test).await;
    let id = TenantId::from(tenant);
    set(&test, &config, id, BillingMode::Prepaid).await;
    let start = datetime!(2026-03-01 00:00 UTC);
    let at = |minutes: i64| start + time::Duration::minutes(minutes);
    let check = |now| standing::evaluate(&test.db, &config, id, now);
    assert_eq!(check(at(0)).await.unwrap(), Change::Stepped); // warned (0 available)
    // A check as of an earlier moment (a slower worker) changes nothing.
    grant(&test, tenant, 5_000).await;
    assert_eq!(check(at(-1)).await.unwrap(), Change::None);
    // Credit back: active, and the marks re-arm above the thresholds.
    assert_eq!(check(at(1)).await.unwrap(), Change::Stepped);
    let before = events(&test, tenant).await.len();
    assert_eq!(check(at(2)).await.unwrap(), Change::None);
    assert_eq!(events(&test, tenant).await.len(), before);

    // Out again (a void-free way: a refund-like entry is not ours to make,
    // so an open run at a price eats the credit).
    sqlx::query(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
         VALUES ($1, 'cpu.small', 'local-1', 'USD', 'hour', 100000, '2026-01-01T00:00:00Z')",
    )
    .bind(Uuid::now_v7())
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    let allocation = Allocation::of(tenant, "cpu.small");
    meter
        .handle(&allocation.event("running", Some("provisioning"), at(2)))
        .await
        .unwrap();
    assert_eq!(check(at(10)).await.unwrap(), Change::Stepped); // warned, below both marks again
    assert_eq!(check(at(16)).await.unwrap(), Change::Stepped); // launches stopped
    assert_eq!(check(at(22)).await.unwrap(), Change::Stepped); // suspended
    assert_eq!(
        check(at(23)).await.unwrap(),
        Change::None,
        "the run opened before the stop"
    );
    // A run that opens after the stop request is asked to stop, once.
    let late = Allocation::of(tenant, "cpu.small");
    meter
        .handle(&late.event("running", Some("starting"), at(24)))
        .await
        .unwrap();
    assert_eq!(check(at(25)).await.unwrap(), Change::Stepped);
    assert_eq!(check(at(26)).await.unwrap(), Change::None);
    let kinds = events(&test, tenant).await;
    let suspensions = kinds
        .iter()
        .filter(|k| *k == "billing.tenant_suspended")
        .count();
    let lows = kinds.iter().filter(|k| *k == "credit.low_balance").count();
    assert_eq!((suspensions, lows), (2, 4), "{kinds:?}");
}
