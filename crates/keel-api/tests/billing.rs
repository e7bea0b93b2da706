//! Billing over HTTP: operators price, invoice and grant credit; tenants
//! read prices, their own invoices and credit, and nobody else's; bad input
//! is refused with its code and changes nothing.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use keel_auth::authz::PlatformRole;
use serde_json::json;

fn rate_card(effective_from: Option<String>) -> serde_json::Value {
    let mut card = json!({
        "flavor": "cpu.medium", "region": "local-1", "currency": "USD",
        "unit": "hour", "unit_price": 120
    });
    if let Some(from) = effective_from {
        card["effective_from"] = json!(from);
    }
    card
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test]
async fn operators_manage_rate_cards_and_tenants_read_prices() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;

    let created = app
        .post("/v1/admin/rate-cards", Some(&operator), rate_card(None))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["unit_price"], 120);
    assert!(created.body["effective_until"].is_null());

    app.post("/v1/admin/rate-cards", Some(&reader), rate_card(None))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.post("/v1/admin/rate-cards", Some(&acme.token), rate_card(None))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");

    let now = time::OffsetDateTime::now_utc();
    let scheduled = app
        .post(
            "/v1/admin/rate-cards",
            Some(&operator),
            rate_card(Some(rfc3339(now + time::Duration::days(30)))),
        )
        .await;
    assert_eq!(
        scheduled.status,
        StatusCode::CREATED,
        "{:?}",
        scheduled.body
    );
    app.post(
        "/v1/admin/rate-cards",
        Some(&operator),
        rate_card(Some(rfc3339(now + time::Duration::days(10)))),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "rate_card_overlap");
    app.post(
        "/v1/admin/rate-cards",
        Some(&operator),
        rate_card(Some(rfc3339(now - time::Duration::days(1)))),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "effective_from_in_past");
    let mut euros = rate_card(None);
    euros["currency"] = json!("EUR");
    app.post("/v1/admin/rate-cards", Some(&operator), euros)
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch");
    let mut negative = rate_card(None);
    negative["unit_price"] = json!(-5);
    app.post("/v1/admin/rate-cards", Some(&operator), negative)
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let mut fractional = rate_card(None);
    fractional["unit_price"] = json!(1.5);
    app.post("/v1/admin/rate-cards", Some(&operator), fractional)
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    // The operator's list has both; tenants see the prices in effect and
    // scheduled.
    let listed = app.get("/v1/admin/rate-cards", Some(&reader)).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    let prices = app.get("/v1/prices", Some(&acme.token)).await;
    assert_eq!(prices.status, StatusCode::OK);
    let prices = prices.body.as_array().unwrap();
    assert_eq!(prices.len(), 2);
    assert_eq!(
        prices[0]["effective_until"],
        scheduled.body["effective_from"]
    );
}

#[tokio::test]
async fn invoices_and_credit_are_the_tenants_own_and_follow_their_states() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let other = app.tenant("other").await;
    let viewer = app.member(&acme, "viewer").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    // Two hours of January usage at 150 an hour (a past price: set-up).
    app.january_usage(&acme).await;

    let path = format!("/v1/admin/tenants/{}/invoices", acme.tenant_id);
    for (period, status, code) in [
        ("2026-13", StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (
            "2099-01",
            StatusCode::UNPROCESSABLE_ENTITY,
            "period_not_ended",
        ),
    ] {
        app.post(&path, Some(&operator), json!({"period": period}))
            .await
            .assert_error(status, code);
    }
    app.post(
        &format!("/v1/admin/tenants/{}/invoices", uuid::Uuid::now_v7()),
        Some(&operator),
        json!({"period": "2026-01"}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    let draft = app
        .post(&path, Some(&operator), json!({"period": "2026-01"}))
        .await;
    assert_eq!(draft.status, StatusCode::OK, "{:?}", draft.body);
    assert_eq!(draft.body["state"], "draft");
    assert_eq!(draft.body["subtotal"], 300);
    assert_eq!(draft.body["period_start"], "2026-01-01");
    assert_eq!(draft.body["lines"][0]["quantity"], 7_200_000_000_i64);
    let invoice_id = draft.body["id"].as_str().unwrap().to_owned();

    // The tenant's owner reads it; a viewer may not; another tenant cannot
    // see it at all.
    let listed = app.get("/v1/billing/invoices", Some(&acme.token)).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let mine = app
        .get(
            &format!("/v1/billing/invoices/{invoice_id}"),
            Some(&acme.token),
        )
        .await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(mine.body["lines"][0]["amount"], 300);
    app.get("/v1/billing/invoices", Some(&viewer.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.get(
        &format!("/v1/billing/invoices/{invoice_id}"),
        Some(&other.token),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    let theirs = app.get("/v1/billing/invoices", Some(&other.token)).await;
    assert_eq!(theirs.body["items"].as_array().unwrap().len(), 0);
    app.get("/v1/billing/invoices?state=unpaid", Some(&acme.token))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    // Credit: granted by an operator, drawn at finalization.
    let credit = format!("/v1/admin/tenants/{}/credit", acme.tenant_id);
    for (body, status, code) in [
        (
            json!({"amount": 0, "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"amount": 100, "currency": "EUR"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency_mismatch",
        ),
    ] {
        app.post(&credit, Some(&operator), body)
            .await
            .assert_error(status, code);
    }
    let granted = app
        .post(
            &credit,
            Some(&operator),
            json!({"amount": 100, "currency": "USD", "reference": "promo-1", "note": "welcome"}),
        )
        .await;
    assert_eq!(granted.status, StatusCode::CREATED, "{:?}", granted.body);
    let finalized = app
        .post(
            &format!("/v1/admin/invoices/{invoice_id}/finalize"),
            Some(&operator),
            json!({}),
        )
        .await;
    assert_eq!(finalized.status, StatusCode::OK, "{:?}", finalized.body);
    assert_eq!(
        (
            &finalized.body["state"],
            &finalized.body["credits"],
            &finalized.body["total"]
        ),
        (&json!("finalized"), &json!(100), &json!(200))
    );
    let balance = app.get("/v1/billing/credit", Some(&acme.token)).await;
    assert_eq!(balance.body["balance"], 0);
    let kinds: Vec<&str> = balance.body["entries"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "draw"]);
    let their_credit = app.get("/v1/billing/credit", Some(&other.token)).await;
    assert_eq!(their_credit.body["balance"], 0);
    assert_eq!(
        their_credit.body["entries"]["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Paid out of band, once; a paid invoice is not voided.
    let paid_path = format!("/v1/admin/invoices/{invoice_id}/mark-paid");
    let paid = app
        .post(&paid_path, Some(&operator), json!({"reference": "wire 42"}))
        .await;
    assert_eq!(paid.body["state"], "paid", "{:?}", paid.body);
    app.post(&paid_path, Some(&operator), json!({"reference": "wire 43"}))
        .await
        .assert_error(StatusCode::CONFLICT, "invoice_state");
    app.post(
        &format!("/v1/admin/invoices/{invoice_id}/void"),
        Some(&operator),
        json!({"reason": "changed my mind"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "invoice_state");

    // Usage so far, and the exports.
    let usage = app
        .get("/v1/billing/usage?period=2026-01", Some(&acme.token))
        .await;
    assert_eq!(usage.status, StatusCode::OK, "{:?}", usage.body);
    assert_eq!(usage.body["subtotal"], 300);
    assert_eq!(
        usage.body["by_project"][0]["project_id"],
        json!(acme.project_id)
    );
    let current = app.get("/v1/billing/usage", Some(&acme.token)).await;
    assert_eq!(current.status, StatusCode::OK);
    assert_eq!(current.body["subtotal"], 0);
    app.get("/v1/billing/usage?period=2099-01", Some(&acme.token))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "period_in_future");
    app.get("/v1/billing/usage?period=january", Some(&acme.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/billing/usage", Some(&viewer.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let csv = app
        .get("/v1/billing/usage.csv?period=2026-01", Some(&acme.token))
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let text = csv.body.as_str().unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains(",7200000000,billed,"), "{text}");
    let csv = app.get("/v1/billing/invoices.csv", Some(&acme.token)).await;
    let text = csv.body.as_str().unwrap();
    assert!(text.starts_with("invoice_id,period,state,"), "{text}");
    assert!(
        text.contains(&format!("{invoice_id},2026-01,paid,USD,300,100,0,200,")),
        "{text}"
    );
    let theirs = app
        .get("/v1/billing/invoices.csv", Some(&other.token))
        .await;
    assert_eq!(
        theirs.body.as_str().unwrap().lines().count(),
        1,
        "the header only"
    );

    let report = app
        .get("/v1/admin/billing/reconcile", Some(&operator))
        .await;
    assert_eq!(report.status, StatusCode::OK);
    assert_eq!(report.body["checked"], 1);
    assert_eq!(report.body["discrepancies"], json!([]));
    let audited = app
        .count("SELECT count(*) FROM audit_log WHERE action IN ('invoice.create', 'invoice.finalize', 'invoice.mark_paid', 'credit.grant', 'credit.draw')")
        .await;
    assert_eq!(audited, 5);
}

/// Runs the provisioning consumer over what the outbox holds of billing's
/// events (fanned out and released by the real relay, delivered by the
/// real delivery path), until none is left.
async fn deliver_billing_events(app: &TestApp) {
    use keel_outbox::{Consumer, DeliveryJob, relay, worker};
    use std::sync::Arc;
    let db = &app.state.db;
    let signers = keel_provisioning::signing::SignerRing::load(db, &app.kms)
        .await
        .unwrap();
    let consumer: Arc<dyn Consumer> =
        Arc::new(keel_provisioning::consumer::ProvisioningConsumer::new(
            db.clone(),
            keel_provisioning::consumer::WorkerCredentials {
                signers: Arc::new(signers),
                node_ca_pem: app.keys.node_ca.cert_pem().to_owned(),
                identity: app.keys.hot_service_identity("worker", &[]).unwrap(),
            },
        ));
    loop {
        relay::drain(db, std::slice::from_ref(&consumer))
            .await
            .unwrap();
        let queued: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT d.event_id FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
              WHERE d.consumer = 'provisioning' AND d.status = 'queued'
                AND o.event_type LIKE 'billing.%' ORDER BY d.seq",
        )
        .fetch_all(&mut app.database.admin().await)
        .await
        .unwrap();
        if queued.is_empty() {
            return;
        }
        for event_id in queued {
            let job = DeliveryJob {
                consumer: "provisioning".into(),
                event_id: event_id.into(),
                more: Vec::new(),
            };
            worker::run_delivery(db, consumer.as_ref(), &job)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_prepaid_tenant_out_of_credit_loses_launches_then_its_running_allocations() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    app.add_host(64, 262_144).await;
    let account_path = format!("/v1/admin/tenants/{}/billing-account", acme.tenant_id);
    let set = app
        .request(
            axum::http::Method::PUT,
            &account_path,
            Some(&operator),
            Some(json!({"mode": "prepaid"})),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(set.body["standing"], "active");
    app.request(
        axum::http::Method::PUT,
        &account_path,
        Some(&operator),
        Some(json!({"mode": "postpaid"})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let launches = format!("/v1/projects/{}/allocations", acme.project_id);
    let launched = app
        .post(
            &launches,
            Some(&acme.token),
            json!({"name": "web", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(launched.status, StatusCode::ACCEPTED, "{:?}", launched.body);
    let allocation = launched.body["id"].as_str().unwrap().to_owned();
    // Set-up: the workload runs (no agent in this test).
    sqlx::query("UPDATE allocations SET state = 'running' WHERE id = $1::uuid")
        .bind(&allocation)
        .execute(&mut app.database.admin().await)
        .await
        .unwrap();

    // No credit: warned, then (an hour on) launches stop, then (a day on)
    // what runs stops. The worker's check, at chosen times.
    let config = keel_billing::BillingConfig::default();
    let tenant = keel_core::ids::TenantId(acme.tenant_id.parse().unwrap());
    let now = time::OffsetDateTime::now_utc();
    for hours in [0, 2, 27] {
        let change = keel_billing::standing::evaluate(
            &app.state.db,
            &config,
            tenant,
            now + time::Duration::hours(hours),
        )
        .await
        .unwrap();
        assert_eq!(change, keel_billing::standing::Change::Stepped, "{hours} h");
    }
    deliver_billing_events(&app).await;

    app.post(
        &launches,
        Some(&acme.token),
        json!({"name": "more", "flavor": "cpu.small"}),
    )
    .await
    .assert_error(StatusCode::PAYMENT_REQUIRED, "credit_exhausted");
    let stopped = app
        .get(&format!("{launches}/{allocation}"), Some(&acme.token))
        .await;
    assert_eq!(stopped.body["state"], "stopping");
    // Set-up: its host reported it stopped. Starting it is held; a start
    // the state forbids is refused as such.
    sqlx::query("UPDATE allocations SET state = 'stopped' WHERE id = $1::uuid")
        .bind(&allocation)
        .execute(&mut app.database.admin().await)
        .await
        .unwrap();
    app.post(
        &format!("{launches}/{allocation}/start"),
        Some(&acme.token),
        json!({}),
    )
    .await
    .assert_error(StatusCode::PAYMENT_REQUIRED, "credit_exhausted");
    let account = app.get("/v1/billing/account", Some(&acme.token)).await;
    assert_eq!(account.body["standing"], "suspended");
    assert_eq!(account.body["currency_digits"], 2, "USD has cents");
    assert_eq!(account.body["mode"], "prepaid");

    // Credit bought back: launches resume.
    let granted = app
        .post(
            &format!("/v1/admin/tenants/{}/credit", acme.tenant_id),
            Some(&operator),
            json!({"amount": 5000, "currency": "USD"}),
        )
        .await;
    assert_eq!(granted.status, StatusCode::CREATED);
    let change = keel_billing::standing::evaluate(
        &app.state.db,
        &config,
        tenant,
        now + time::Duration::hours(28),
    )
    .await
    .unwrap();
    assert_eq!(change, keel_billing::standing::Change::Stepped);
    deliver_billing_events(&app).await;
    let again = app
        .post(
            &launches,
            Some(&acme.token),
            json!({"name": "again", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    let audited = app
        .count("SELECT count(*) FROM audit_log WHERE action IN ('tenant.launches_hold', 'tenant.suspend_settle', 'tenant.launches_resume')")
        .await;
    assert_eq!(audited, 3);
}
