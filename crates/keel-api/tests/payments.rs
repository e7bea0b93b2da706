//! Payments over HTTP, against an HTTP fake of Stripe (wiremock) serving
//! Stripe's JSON, and webhook events signed with async-stripe's own test
//! header: the real client and the real verification run. Checkouts buy
//! credit or pay invoices; each event takes effect once; bad, stale,
//! replayed, unknown and mismatched events move no money.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{TestApp, TestResponse};
use keel_auth::authz::PlatformRole;
use keel_payments::Payments;
use keel_payments::config::{PaymentsConfig, ProviderKind, StripeConfig};
use serde_json::{Value, json};
use stripe_webhook::Webhook;
use wiremock::matchers::{header, header_regex, method, path};
use wiremock::{Mock, MockServer, Request as SeenRequest, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_keel_test_0123456789";

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/stripe/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Answers `POST /v1/checkout/sessions` like Stripe: a new open session for
/// the amount, currency and customer asked (read from the form body).
struct Sessions {
    created: AtomicUsize,
}

impl wiremock::Respond for Sessions {
    fn respond(&self, request: &SeenRequest) -> ResponseTemplate {
        let n = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
        let field = |name: &str| {
            form.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .unwrap()
        };
        let mut session = fixture("checkout_session");
        let id = format!("cs_test_keel{n}");
        let amount: i64 = field("line_items[0][price_data][unit_amount]")
            .parse()
            .unwrap();
        session["id"] = json!(id);
        session["url"] = json!(format!("https://checkout.stripe.com/c/pay/{id}"));
        session["amount_total"] = json!(amount);
        session["amount_subtotal"] = json!(amount);
        session["currency"] = json!(field("line_items[0][price_data][currency]"));
        session["customer"] = json!(field("customer"));
        session["client_reference_id"] = json!(field("client_reference_id"));
        session["expires_at"] = json!(time::OffsetDateTime::now_utc().unix_timestamp() + 86_400);
        ResponseTemplate::new(200).set_body_json(session)
    }
}

/// Answers `POST /v1/customers` like Stripe: one customer per tenant
/// (named by the idempotency key, which is the tenant's).
struct Customers;

impl wiremock::Respond for Customers {
    fn respond(&self, request: &SeenRequest) -> ResponseTemplate {
        let key = request.headers["idempotency-key"].to_str().unwrap();
        let tenant = key.trim_start_matches("keel-customer-");
        let mut customer = fixture("customer");
        customer["id"] = json!(customer_of(tenant));
        customer["metadata"]["keel_tenant_id"] = json!(tenant);
        ResponseTemplate::new(200).set_body_json(customer)
    }
}

/// The Stripe customer the fake makes for a tenant.
fn customer_of(tenant_id: &str) -> String {
    format!("cus_{}", tenant_id.replace('-', ""))
}

struct Stripe {
    server: MockServer,
}

impl Stripe {
    /// The fake, and `app` switched to Stripe pointing at it.
    async fn start(app: &mut TestApp) -> Self {
        let server = MockServer::start().await;
        let version = keel_payments::stripe::api_version();
        Mock::given(method("POST"))
            .and(path("/v1/customers"))
            .and(header("stripe-version", version))
            .and(header_regex(
                "idempotency-key",
                "^keel-customer-[0-9a-f-]{36}$",
            ))
            .respond_with(Customers)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/checkout/sessions"))
            .and(header("stripe-version", version))
            .and(header_regex(
                "idempotency-key",
                "^keel-checkout-[0-9a-f-]{36}$",
            ))
            .respond_with(Sessions {
                created: AtomicUsize::new(0),
            })
            .mount(&server)
            .await;
        let config = PaymentsConfig {
            provider: ProviderKind::Stripe,
            stripe: StripeConfig {
                secret_key: Some("sk_test_keel".to_owned().into()),
                webhook_secret: Some(WEBHOOK_SECRET.to_owned().into()),
                api_base: Some(format!("{}/", server.uri())),
                ..StripeConfig::default()
            },
            ..PaymentsConfig::default()
        };
        app.state.payments = Payments::from_config(&config).unwrap();
        Self { server }
    }

    async fn calls(&self, to: &str) -> Vec<SeenRequest> {
        self.server
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|request| request.url.path() == to)
            .collect()
    }
}

/// Posts `event` to the webhook, signed now (or at `signed_at`) with
/// `secret`.
async fn deliver_signed(
    app: &TestApp,
    event: &Value,
    secret: &str,
    signed_at: Option<i64>,
) -> TestResponse {
    let payload = event.to_string();
    let signature = Webhook::generate_test_header(&payload, secret, signed_at);
    post_webhook(app, payload, Some(signature)).await
}

async fn deliver(app: &TestApp, event: &Value) -> TestResponse {
    deliver_signed(app, event, WEBHOOK_SECRET, None).await
}

async fn post_webhook(app: &TestApp, payload: String, signature: Option<String>) -> TestResponse {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/v1/payments/stripe/webhook")
        .header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    app.send(request.body(Body::from(payload)).unwrap()).await
}

static EVENTS: AtomicUsize = AtomicUsize::new(0);

fn event(event_type: &str, object: Value) -> Value {
    let mut event = fixture("event");
    event["id"] = json!(format!(
        "evt_keel{}_{}",
        EVENTS.fetch_add(1, Ordering::SeqCst),
        uuid::Uuid::new_v4().simple()
    ));
    event["type"] = json!(event_type);
    event["data"]["object"] = object;
    event
}

/// The session as Stripe reports it once paid (`checkout` as
/// [`checkout`] returns it).
fn paid_session(checkout: &Value, payment_intent: &str) -> Value {
    let url = checkout["url"].as_str().unwrap();
    let mut session = fixture("checkout_session");
    session["id"] = json!(url.rsplit('/').next().unwrap());
    session["amount_total"] = checkout["amount"].clone();
    session["amount_subtotal"] = checkout["amount"].clone();
    session["currency"] = json!(checkout["currency"].as_str().unwrap().to_lowercase());
    session["customer"] = checkout["test_customer"].clone();
    session["payment_intent"] = json!(payment_intent);
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    session["url"] = Value::Null;
    session
}

fn refund(id: &str, payment_intent: &str, amount: i64, currency: &str, status: &str) -> Value {
    let mut refund = fixture("refund");
    refund["id"] = json!(id);
    refund["payment_intent"] = json!(payment_intent);
    refund["amount"] = json!(amount);
    refund["currency"] = json!(currency);
    refund["status"] = json!(status);
    refund
}

/// The operators' reconciliation finds nothing wrong.
async fn assert_reconciles(app: &TestApp, operator: &str) {
    let reconciled = app.get("/v1/admin/billing/reconcile", Some(operator)).await;
    assert_eq!(reconciled.status, StatusCode::OK, "{:?}", reconciled.body);
    assert_eq!(
        reconciled.body["discrepancies"],
        json!([]),
        "{:?}",
        reconciled.body
    );
}

async fn balance(app: &TestApp, token: &str) -> i64 {
    let credit = app.get("/v1/billing/credit", Some(token)).await;
    assert_eq!(credit.status, StatusCode::OK, "{:?}", credit.body);
    credit.body["balance"].as_i64().unwrap()
}

fn outcome(response: &TestResponse) -> &str {
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body["outcome"].as_str().unwrap()
}

async fn buy_credit(app: &TestApp, tenant: &common::Tenant, amount: i64) -> Value {
    let started = checkout(
        app,
        tenant,
        json!({"purpose": "credit", "amount": amount, "currency": "USD"}),
    )
    .await;
    assert_eq!(started.status, StatusCode::CREATED, "{:?}", started.body);
    started.body
}

/// Starts a checkout; its body also names the tenant's Stripe customer
/// (`test_customer`, for [`paid_session`]).
async fn checkout(app: &TestApp, tenant: &common::Tenant, body: Value) -> TestResponse {
    let mut started = app
        .post("/v1/billing/checkouts", Some(&tenant.token), body)
        .await;
    started.body["test_customer"] = json!(customer_of(&tenant.tenant_id));
    started
}

#[tokio::test]
async fn a_checkout_buys_credit_once_however_often_stripe_tells() {
    let mut app = TestApp::spawn().await;
    let stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;

    let checkout = buy_credit(&app, &acme, 5_000).await;
    assert_eq!(checkout["provider"], "stripe");
    assert_eq!(checkout["status"], "open");
    assert!(
        checkout["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );
    // A second checkout reuses the tenant's customer.
    let small = buy_credit(&app, &acme, 700).await;
    let customers = stripe.calls("/v1/customers").await;
    assert_eq!(customers.len(), 1);
    assert_eq!(
        customers[0].headers["idempotency-key"],
        format!("keel-customer-{}", acme.tenant_id).as_str()
    );
    let sessions = stripe.calls("/v1/checkout/sessions").await;
    assert_eq!(sessions.len(), 2);
    let checkout_id = checkout["id"].as_str().unwrap();
    assert_eq!(
        sessions[0].headers["idempotency-key"],
        format!("keel-checkout-{checkout_id}").as_str()
    );
    assert_eq!(balance(&app, &acme.token).await, 0, "nothing paid yet");
    // With an Idempotency-Key, a retry gets the same checkout, and Stripe
    // the same idempotency key.
    let keyed = || async {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/billing/checkouts")
            .header("authorization", format!("Bearer {}", acme.token))
            .header("content-type", "application/json")
            .header("idempotency-key", "buy-credit-1")
            .body(Body::from(
                json!({"purpose": "credit", "amount": 900, "currency": "USD"}).to_string(),
            ))
            .unwrap();
        app.send(request).await
    };
    let (first, retry) = (keyed().await, keyed().await);
    assert!(first.status.is_success(), "{:?}", first.body);
    assert!(retry.status.is_success(), "{:?}", retry.body);
    assert_eq!(first.body["id"], retry.body["id"]);
    // The key with another amount is another request.
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/billing/checkouts")
        .header("authorization", format!("Bearer {}", acme.token))
        .header("content-type", "application/json")
        .header("idempotency-key", "buy-credit-1")
        .body(Body::from(
            json!({"purpose": "credit", "amount": 901, "currency": "USD"}).to_string(),
        ))
        .unwrap();
    app.send(request)
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(stripe.calls("/v1/checkout/sessions").await.len(), 3);

    let paid = event(
        "checkout.session.completed",
        paid_session(&checkout, "pi_keel1"),
    );
    assert_eq!(outcome(&deliver(&app, &paid).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, 5_000);
    // Stripe delivers again; a later event of the same session: no more.
    assert_eq!(outcome(&deliver(&app, &paid).await), "duplicate");
    let again = event(
        "checkout.session.async_payment_succeeded",
        paid_session(&checkout, "pi_keel1"),
    );
    assert_eq!(outcome(&deliver(&app, &again).await), "ignored");
    assert_eq!(balance(&app, &acme.token).await, 5_000);

    // Two deliveries of one event at the same time: one applies it.
    let small_paid = event(
        "checkout.session.completed",
        paid_session(&small, "pi_keel2"),
    );
    let (first, second) = tokio::join!(deliver(&app, &small_paid), deliver(&app, &small_paid));
    let mut outcomes = [outcome(&first), outcome(&second)];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["applied", "duplicate"]);
    assert_eq!(balance(&app, &acme.token).await, 5_700);

    let credit = app.get("/v1/billing/credit", Some(&acme.token)).await;
    let entries = credit.body["entries"]["items"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "purchase");
    assert_eq!(entries[0]["reference"], "stripe:pi_keel1");
    let read = app
        .get(
            &format!("/v1/billing/checkouts/{checkout_id}"),
            Some(&acme.token),
        )
        .await;
    assert_eq!(read.body["status"], "paid", "{:?}", read.body);
    let other = app.tenant("other").await;
    app.get(
        &format!("/v1/billing/checkouts/{checkout_id}"),
        Some(&other.token),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'stripe.event'")
            .await,
        3,
        "the duplicate is not a second event"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'credit.purchase'")
            .await,
        2
    );
}

#[tokio::test]
async fn bad_stale_forged_and_unknown_events_move_no_money() {
    let mut app = TestApp::spawn().await;
    let _stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;
    let checkout = buy_credit(&app, &acme, 5_000).await;
    let paid = event(
        "checkout.session.completed",
        paid_session(&checkout, "pi_keel1"),
    );

    // Another secret, signed six minutes ago or in six minutes, no header,
    // a body changed after signing.
    deliver_signed(&app, &paid, "whsec_someone_else", None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_signature");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for signed_at in [now - 360, now + 360] {
        deliver_signed(&app, &paid, WEBHOOK_SECRET, Some(signed_at))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_signature");
    }
    post_webhook(&app, paid.to_string(), None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_signature");
    let signature = Webhook::generate_test_header(&paid.to_string(), WEBHOOK_SECRET, None);
    let mut forged = paid.clone();
    forged["data"]["object"]["amount_total"] = json!(500_000);
    post_webhook(&app, forged.to_string(), Some(signature))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_signature");
    // Signed, but not an event.
    let garbage = json!({"hello": "world"});
    deliver(&app, &garbage)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    assert_eq!(app.count("SELECT count(*) FROM stripe_events").await, 0);

    // A session Keel never started; an event type Keel does not act on.
    let mut unknown = paid_session(&checkout, "pi_keel9");
    unknown["id"] = json!("cs_test_not_ours");
    assert_eq!(
        outcome(&deliver(&app, &event("checkout.session.completed", unknown)).await),
        "ignored"
    );
    let customer = fixture("customer");
    assert_eq!(
        outcome(&deliver(&app, &event("customer.created", customer)).await),
        "ignored"
    );
    // One Keel does not act on and cannot read (another API version): fine.
    assert_eq!(
        outcome(&deliver(&app, &event("customer.updated", json!({"id": 7}))).await),
        "ignored"
    );

    // Paid by another customer, or less, or in another currency: refused,
    // audited, nothing credited; the checkout is refused for good.
    type Spoil = fn(&mut Value);
    let spoilers: [Spoil; 3] = [
        |session| session["customer"] = json!("cus_someone_else"),
        |session| session["amount_total"] = json!(50),
        |session| session["currency"] = json!("eur"),
    ];
    for (n, spoil) in spoilers.into_iter().enumerate() {
        let checkout = buy_credit(&app, &acme, 5_000).await;
        let mut session = paid_session(&checkout, &format!("pi_spoilt{n}"));
        spoil(&mut session);
        let response = deliver(&app, &event("checkout.session.completed", session)).await;
        assert_eq!(outcome(&response), "refused", "{:?}", response.body);
        let read = app
            .get(
                &format!("/v1/billing/checkouts/{}", checkout["id"].as_str().unwrap()),
                Some(&acme.token),
            )
            .await;
        assert_eq!(read.body["status"], "refused");
        // The right report afterwards changes nothing: an operator decides.
        let right = paid_session(&checkout, &format!("pi_spoilt{n}"));
        let after = deliver(&app, &event("checkout.session.completed", right)).await;
        assert_eq!(outcome(&after), "ignored");
    }
    assert_eq!(balance(&app, &acme.token).await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM stripe_events WHERE outcome = 'refused'")
            .await,
        3
    );
    assert_eq!(app.count("SELECT count(*) FROM credit_entries").await, 0);

    // One payment reported for two tenants' checkouts: the ledger credits
    // it once; the second is refused, recorded and answered 200.
    let other = app.tenant("other").await;
    let theirs = buy_credit(&app, &other, 5_000).await;
    let mine = buy_credit(&app, &acme, 5_000).await;
    let first = event("checkout.session.completed", paid_session(&mine, "pi_same"));
    assert_eq!(outcome(&deliver(&app, &first).await), "applied");
    let second = event(
        "checkout.session.completed",
        paid_session(&theirs, "pi_same"),
    );
    let refused = deliver(&app, &second).await;
    assert_eq!(outcome(&refused), "refused", "{:?}", refused.body);
    assert_eq!(balance(&app, &acme.token).await, 5_000);
    assert_eq!(balance(&app, &other.token).await, 0);
    let read = app
        .get(
            &format!("/v1/billing/checkouts/{}", theirs["id"].as_str().unwrap()),
            Some(&other.token),
        )
        .await;
    assert_eq!(read.body["status"], "refused", "{:?}", read.body);
    assert_eq!(outcome(&deliver(&app, &second).await), "duplicate");
}

#[tokio::test]
async fn refunds_count_once_wait_for_their_payment_and_never_exceed_it() {
    let mut app = TestApp::spawn().await;
    let _stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;
    let checkout = buy_credit(&app, &acme, 5_000).await;

    // The refund arrives before the payment: it waits.
    let early = event(
        "refund.created",
        refund("re_keel1", "pi_keel1", 1_000, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &early).await), "deferred");
    assert_eq!(balance(&app, &acme.token).await, 0);
    let paid = event(
        "checkout.session.completed",
        paid_session(&checkout, "pi_keel1"),
    );
    assert_eq!(outcome(&deliver(&app, &paid).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, 4_000);
    assert_eq!(
        app.count("SELECT count(*) FROM stripe_events WHERE outcome = 'deferred'")
            .await,
        0
    );

    // The same refund again (updated); more than is left; another currency.
    let updated = event(
        "refund.updated",
        refund("re_keel1", "pi_keel1", 1_000, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &updated).await), "ignored");
    let too_much = event(
        "refund.created",
        refund("re_keel2", "pi_keel1", 4_001, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &too_much).await), "refused");
    let euros = event(
        "refund.created",
        refund("re_keel3", "pi_keel1", 10, "eur", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &euros).await), "refused");
    let pending = event(
        "refund.created",
        refund("re_keel4", "pi_keel1", 10, "usd", "pending"),
    );
    assert_eq!(outcome(&deliver(&app, &pending).await), "ignored");
    assert_eq!(balance(&app, &acme.token).await, 4_000);
    // The rest, exactly.
    let rest = event(
        "refund.created",
        refund("re_keel5", "pi_keel1", 4_000, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &rest).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, 0);

    // The first refund fails after all: its money comes back, once.
    let failed = event(
        "refund.failed",
        refund("re_keel1", "pi_keel1", 1_000, "usd", "failed"),
    );
    assert_eq!(outcome(&deliver(&app, &failed).await), "applied");
    let failed_again = event(
        "refund.updated",
        refund("re_keel1", "pi_keel1", 1_000, "usd", "failed"),
    );
    assert_eq!(outcome(&deliver(&app, &failed_again).await), "ignored");
    assert_eq!(balance(&app, &acme.token).await, 1_000);

    // Stripe reports a refund failed before it reports it succeeded: it
    // never counts.
    let failed_first = event(
        "refund.updated",
        refund("re_keel7", "pi_keel1", 500, "usd", "failed"),
    );
    assert_eq!(outcome(&deliver(&app, &failed_first).await), "ignored");
    let late_success = event(
        "refund.created",
        refund("re_keel7", "pi_keel1", 500, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &late_success).await), "ignored");
    assert_eq!(balance(&app, &acme.token).await, 1_000);

    // A chargeback is an operator's decision: refused, audited, no money.
    let mut dispute = fixture("dispute");
    dispute["payment_intent"] = json!("pi_keel1");
    let disputed = deliver(&app, &event("charge.dispute.created", dispute)).await;
    assert_eq!(outcome(&disputed), "refused", "{:?}", disputed.body);
    assert_eq!(balance(&app, &acme.token).await, 1_000);

    // A refund that fails while still waiting for its payment never counts.
    let second = buy_credit(&app, &acme, 2_000).await;
    let waiting = event(
        "refund.created",
        refund("re_keel6", "pi_keel2", 2_000, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &waiting).await), "deferred");
    let gone = event(
        "refund.updated",
        refund("re_keel6", "pi_keel2", 2_000, "usd", "failed"),
    );
    assert_eq!(outcome(&deliver(&app, &gone).await), "applied");
    let paid = event(
        "checkout.session.completed",
        paid_session(&second, "pi_keel2"),
    );
    assert_eq!(outcome(&deliver(&app, &paid).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, 3_000);
}

#[tokio::test]
async fn bad_checkouts_are_refused_before_stripe_is_called() {
    let mut app = TestApp::spawn().await;
    let stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;
    let viewer = app.member(&acme, "viewer").await;
    for (body, status, code) in [
        (
            json!({"purpose": "credit", "amount": -5000, "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"purpose": "credit", "amount": 1_000_000_000_000_i64, "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"purpose": "credit", "amount": 5000}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"purpose": "credit", "amount": 5000, "currency": "EUR"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency_mismatch",
        ),
        (
            json!({"purpose": "gift", "amount": 5000, "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"purpose": "invoice", "invoice_id": uuid::Uuid::now_v7(), "amount": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json!({"purpose": "invoice", "invoice_id": uuid::Uuid::now_v7()}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"purpose": "credit", "amount": "5000", "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ] {
        app.post("/v1/billing/checkouts", Some(&acme.token), body.clone())
            .await
            .assert_error(status, code);
    }
    app.post(
        "/v1/billing/checkouts",
        Some(&viewer.token),
        json!({"purpose": "credit", "amount": 5000, "currency": "USD"}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert!(stripe.server.received_requests().await.unwrap().is_empty());
    assert_eq!(app.count("SELECT count(*) FROM checkouts").await, 0);

    // Stripe unreachable: a clear 502, nothing stored.
    let mut config = app.config.payments.clone();
    config.provider = ProviderKind::Stripe;
    config.stripe = StripeConfig {
        secret_key: Some("sk_test_keel".to_owned().into()),
        webhook_secret: Some(WEBHOOK_SECRET.to_owned().into()),
        api_base: Some("http://127.0.0.1:9/".to_owned()),
        ..StripeConfig::default()
    };
    app.state.payments = Payments::from_config(&config).unwrap();
    app.post(
        "/v1/billing/checkouts",
        Some(&acme.token),
        json!({"purpose": "credit", "amount": 5000, "currency": "USD"}),
    )
    .await
    .assert_error(StatusCode::BAD_GATEWAY, "payment_provider_unavailable");
    assert_eq!(app.count("SELECT count(*) FROM checkouts").await, 0);
}

/// A finalized January invoice of 300 for `tenant`.
async fn finalized_invoice(app: &TestApp, tenant: &common::Tenant, operator: &str) -> String {
    app.january_usage(tenant).await;
    let draft = app
        .post(
            &format!("/v1/admin/tenants/{}/invoices", tenant.tenant_id),
            Some(operator),
            json!({"period": "2026-01"}),
        )
        .await;
    let id = draft.body["id"].as_str().unwrap().to_owned();
    let finalized = app
        .post(
            &format!("/v1/admin/invoices/{id}/finalize"),
            Some(operator),
            json!({}),
        )
        .await;
    assert_eq!(finalized.body["state"], "finalized", "{:?}", finalized.body);
    assert_eq!(finalized.body["total"], 300);
    id
}

#[tokio::test]
async fn an_invoice_is_paid_through_checkout_and_still_reconciles() {
    let mut app = TestApp::spawn().await;
    let stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let invoice_id = finalized_invoice(&app, &acme, &operator).await;

    let body = json!({"purpose": "invoice", "invoice_id": invoice_id});
    let started = checkout(&app, &acme, body.clone()).await;
    assert_eq!(started.status, StatusCode::CREATED, "{:?}", started.body);
    assert_eq!(started.body["amount"], 300);
    assert_eq!(started.body["invoice_id"], invoice_id.as_str());
    // Asking again gives the open checkout back.
    let again = app
        .post("/v1/billing/checkouts", Some(&acme.token), body)
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["id"], started.body["id"]);
    assert_eq!(stripe.calls("/v1/checkout/sessions").await.len(), 1);

    let paid = event(
        "checkout.session.completed",
        paid_session(&started.body, "pi_inv1"),
    );
    assert_eq!(outcome(&deliver(&app, &paid).await), "applied");
    let invoice = app
        .get(
            &format!("/v1/billing/invoices/{invoice_id}"),
            Some(&acme.token),
        )
        .await;
    assert_eq!(invoice.body["state"], "paid", "{:?}", invoice.body);
    assert_eq!(invoice.body["payment_method"], "stripe");
    // The payment and its settlement are in the ledger and net to zero.
    assert_eq!(balance(&app, &acme.token).await, 0);
    let credit = app.get("/v1/billing/credit", Some(&acme.token)).await;
    let kinds: Vec<&str> = credit.body["entries"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["payment", "settlement"]);
    assert_reconciles(&app, &operator).await;

    // A paid invoice takes no second checkout; a refund of its payment is
    // money the tenant owes again.
    app.post(
        "/v1/billing/checkouts",
        Some(&acme.token),
        json!({"purpose": "invoice", "invoice_id": invoice_id}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "invoice_state");
    let refunded = event(
        "refund.created",
        refund("re_inv1", "pi_inv1", 300, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &refunded).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, -300);
    assert_reconciles(&app, &operator).await;
}

/// A finalized invoice with a Stripe checkout open, marked paid by an
/// operator with `reference`, then reported paid by Stripe with the
/// payment `pi_late`: the app, the tenant, the operator's token and the
/// webhook's answer.
async fn paid_by_hand_then_by_stripe(
    reference: &str,
) -> (TestApp, Stripe, common::Tenant, String, TestResponse) {
    let mut app = TestApp::spawn().await;
    let stripe = Stripe::start(&mut app).await;
    let acme = app.tenant("acme").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let invoice_id = finalized_invoice(&app, &acme, &operator).await;
    let started = checkout(
        &app,
        &acme,
        json!({"purpose": "invoice", "invoice_id": invoice_id}),
    )
    .await;
    assert_eq!(started.status, StatusCode::CREATED, "{:?}", started.body);
    let marked = app
        .post(
            &format!("/v1/admin/invoices/{invoice_id}/mark-paid"),
            Some(&operator),
            json!({"reference": reference}),
        )
        .await;
    assert_eq!(marked.body["state"], "paid", "{:?}", marked.body);
    let paid = event(
        "checkout.session.completed",
        paid_session(&started.body, "pi_late"),
    );
    let applied = deliver(&app, &paid).await;
    assert_eq!(outcome(&applied), "applied");
    (app, stripe, acme, operator, applied)
}

#[tokio::test]
async fn money_for_an_invoice_paid_otherwise_meanwhile_becomes_credit() {
    // The tenant also paid by bank transfer, and an operator recorded it
    // before Stripe's word came.
    let (app, _stripe, acme, operator, applied) =
        paid_by_hand_then_by_stripe("bank transfer 7").await;
    assert!(
        applied.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("credited"),
        "{:?}",
        applied.body
    );
    assert_eq!(balance(&app, &acme.token).await, 300);
    // And its refund is recorded against that credit.
    let refunded = event(
        "refund.created",
        refund("re_late", "pi_late", 300, "usd", "succeeded"),
    );
    assert_eq!(outcome(&deliver(&app, &refunded).await), "applied");
    assert_eq!(balance(&app, &acme.token).await, 0);
    assert_reconciles(&app, &operator).await;
}

#[tokio::test]
async fn without_stripe_tenants_are_told_how_to_pay_and_operators_record_it() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let started = app
        .post(
            "/v1/billing/checkouts",
            Some(&acme.token),
            json!({"purpose": "credit", "amount": 5000, "currency": "USD"}),
        )
        .await;
    assert_eq!(started.status, StatusCode::OK, "{:?}", started.body);
    assert_eq!(started.body["provider"], "manual");
    assert_eq!(started.body["status"], "out_of_band");
    assert!(started.body["instructions"].as_str().unwrap().len() > 10);
    assert_eq!(app.count("SELECT count(*) FROM checkouts").await, 0);
    let paid = event("checkout.session.completed", json!({}));
    deliver(&app, &paid)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // The manual provider's payment of an invoice: the same ledger entries.
    let invoice_id = finalized_invoice(&app, &acme, &operator).await;
    let marked = app
        .post(
            &format!("/v1/admin/invoices/{invoice_id}/mark-paid"),
            Some(&operator),
            json!({"reference": "bank transfer 42"}),
        )
        .await;
    assert_eq!(marked.body["state"], "paid", "{:?}", marked.body);
    assert_eq!(
        app.count("SELECT count(*) FROM credit_entries WHERE kind IN ('payment', 'settlement')")
            .await,
        2
    );
    assert_reconciles(&app, &operator).await;
}

#[tokio::test]
async fn a_stripe_payment_an_operator_recorded_by_hand_counts_once() {
    // The webhook is late; an operator saw the payment in Stripe's
    // dashboard and recorded it with its id.
    let (app, _stripe, acme, operator, _) = paid_by_hand_then_by_stripe("pi_late").await;
    assert_eq!(balance(&app, &acme.token).await, 0, "not credited again");
    assert_reconciles(&app, &operator).await;
}
