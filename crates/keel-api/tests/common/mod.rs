//! `TestApp`: the whole api router on a fresh database, driven in-process
//! with `tower::ServiceExt::oneshot`. A newcomer writes an HTTP test with
//! `let app = TestApp::spawn().await;` and the helpers below.
#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use keel_api::AppState;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use keel_auth::limits::{Limits, RateLimitConfig};
use keel_auth::{TokenConfig, TokenKeys};
use keel_testing::TestDb;
use serde_json::{Value, json};
use tower::ServiceExt;

pub const SIGNING_KEY: &str = "test-signing-key-that-is-long-enough-0123456789";

pub struct TestApp {
    pub database: TestDb,
    pub state: AppState,
    pub config: keel_api::Config,
    pub kms: Arc<keel_kms::AnyKms>,
    pub keys: Arc<keel_api::keys::ControlPlaneKeys>,
}

/// A configuration pointing at the test database (for helpers that take one).
pub fn test_config(database: &TestDb) -> keel_api::Config {
    keel_api::Config {
        server: Default::default(),
        log: Default::default(),
        tracing: Default::default(),
        database: database.config(),
        database_migrate_on_start: false,
        auth: TokenConfig::with_keys(&[SIGNING_KEY]),
        pki: Default::default(),
        kms: keel_kms::KmsConfig::Local {
            master_key_file: std::env::temp_dir().join(format!(
                "keel-test-kms-{}.json",
                uuid::Uuid::new_v4().simple()
            )),
        },
        agent: Default::default(),
        idempotency: Default::default(),
        rate_limit: relaxed_limits(),
        lifecycle: Default::default(),
        metrics: Default::default(),
        terminal: Default::default(),
        console: Default::default(),
        billing: Default::default(),
        payments: Default::default(),
    }
}

/// Limits no ordinary test reaches (they would otherwise share 127.0.0.1's
/// budget); rate-limit tests pass their own.
pub fn relaxed_limits() -> RateLimitConfig {
    RateLimitConfig {
        principal_per_minute: 100_000,
        principal_burst: 10_000,
        ip_per_minute: 100_000,
        ip_burst: 10_000,
        auth_per_minute: 100_000,
        auth_burst: 10_000,
        login_free_failures: 1_000,
        ..RateLimitConfig::default()
    }
}

impl Drop for TestApp {
    /// The test's master-key file goes with it.
    fn drop(&mut self) {
        if let keel_kms::KmsConfig::Local { master_key_file } = &self.config.kms {
            let _ = std::fs::remove_file(master_key_file);
        }
    }
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
}

/// A registered user with a token for their own tenant.
#[derive(Clone)]
pub struct Tenant {
    pub email: String,
    pub user_id: String,
    pub token: String,
    pub refresh_token: String,
    pub tenant_id: String,
    pub project_id: String,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with_limits(relaxed_limits()).await
    }

    pub async fn spawn_with_limits(limits: RateLimitConfig) -> Self {
        let database = keel_testing::test_db().await;
        let tokens = TokenKeys::new(&TokenConfig::with_keys(&[SIGNING_KEY])).expect("token keys");
        let config = test_config(&database);
        let kms = keel_api::keys::kms(&config, true).expect("local KMS");
        let keys = keel_api::keys::ControlPlaneKeys::load_or_create(&database.db, &kms)
            .await
            .expect("control-plane keys");
        let terminals = keel_api::terminals(&config, &database.db, &kms, &keys)
            .await
            .expect("terminal keys");
        let state = AppState {
            db: database.db.clone(),
            tokens: Arc::new(tokens),
            node_channel: Arc::new(keel_api::node_channel(&keys, &config).expect("node channel")),
            limits: Arc::new(Limits::new(limits)),
            deadlines: config.lifecycle,
            metrics: keel_http::metrics::HttpMetrics::default(),
            terminals,
            console: None,
            billing: Arc::new(config.billing.clone()),
            payments: keel_payments::Payments::from_config(&config.payments).expect("payments"),
        };
        Self {
            database,
            state,
            config,
            kms: Arc::new(kms),
            keys: Arc::new(keys),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> TestResponse {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        }
        .expect("request");
        self.send(request).await
    }

    /// Sends a request as if from 127.0.0.1 (unless it names its own peer).
    pub async fn send(&self, mut request: Request<Body>) -> TestResponse {
        if request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .is_none()
        {
            request
                .extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
        }
        let response = keel_api::app(self.state.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        TestResponse {
            status,
            headers,
            body,
        }
    }

    /// Replaces the access-token keys (as a restart with new
    /// `auth.signing_keys` would).
    pub fn rekey(&mut self, keys: &[&str]) {
        self.state.tokens =
            Arc::new(TokenKeys::new(&TokenConfig::with_keys(keys)).expect("token keys"));
    }

    /// Logs in as `email` (optionally into `tenant_id`).
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        tenant_id: Option<&str>,
    ) -> TestResponse {
        let mut body = json!({"email": email, "password": password});
        if let Some(tenant_id) = tenant_id {
            body["tenant_id"] = json!(tenant_id);
        }
        self.post("/v1/auth/login", None, body).await
    }

    pub async fn get(&self, uri: &str, token: Option<&str>) -> TestResponse {
        self.request(Method::GET, uri, token, None).await
    }

    pub async fn post(&self, uri: &str, token: Option<&str>, body: Value) -> TestResponse {
        self.request(Method::POST, uri, token, Some(body)).await
    }

    /// Registers a new tenant and logs in.
    pub async fn tenant(&self, name: &str) -> Tenant {
        let email = format!("{name}-{}@example.com", uuid::Uuid::new_v4().simple());
        let registered = self
            .post(
                "/v1/auth/register",
                None,
                json!({"email": email, "password": "a long enough password", "tenant_name": name}),
            )
            .await;
        assert_eq!(
            registered.status,
            StatusCode::CREATED,
            "{:?}",
            registered.body
        );
        let login = self
            .post(
                "/v1/auth/login",
                None,
                json!({"email": email, "password": "a long enough password"}),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
        Tenant {
            email,
            user_id: registered.body["user_id"]
                .as_str()
                .expect("user")
                .to_owned(),
            refresh_token: login.body["refresh_token"]
                .as_str()
                .expect("refresh token")
                .to_owned(),
            token: login.body["access_token"]
                .as_str()
                .expect("token")
                .to_owned(),
            tenant_id: registered.body["tenant_id"]
                .as_str()
                .expect("tenant")
                .to_owned(),
            project_id: registered.body["project_id"]
                .as_str()
                .expect("project")
                .to_owned(),
        }
    }

    /// A new user who joins `owner`'s tenant with `role` through an
    /// invitation, logged in to that tenant.
    pub async fn member(&self, owner: &Tenant, role: &str) -> Tenant {
        let own = self.tenant(&format!("{role}-home")).await;
        self.join(owner, own, role).await
    }

    /// `own` (signed in anywhere) is invited into `owner`'s tenant with
    /// `role`, accepts, and signs in there.
    pub async fn join(&self, owner: &Tenant, own: Tenant, role: &str) -> Tenant {
        let invited = self
            .post(
                "/v1/invitations",
                Some(&owner.token),
                json!({"email": own.email, "role": role}),
            )
            .await;
        assert_eq!(invited.status, StatusCode::CREATED, "{:?}", invited.body);
        let accepted = self
            .post(
                "/v1/invitations/accept",
                Some(&own.token),
                json!({"token": invited.body["token"]}),
            )
            .await;
        assert_eq!(accepted.status, StatusCode::OK, "{:?}", accepted.body);
        let login = self
            .login(&own.email, "a long enough password", Some(&owner.tenant_id))
            .await;
        assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
        Tenant {
            token: login.body["access_token"]
                .as_str()
                .expect("token")
                .to_owned(),
            refresh_token: login.body["refresh_token"]
                .as_str()
                .expect("refresh token")
                .to_owned(),
            tenant_id: owner.tenant_id.clone(),
            project_id: owner.project_id.clone(),
            ..own
        }
    }

    /// Creates an operator (as `api operator create` does) and logs in;
    /// returns the operator's email and access token.
    pub async fn operator(&self, role: keel_auth::authz::PlatformRole) -> (String, String) {
        let email = format!("op-{}@example.com", uuid::Uuid::new_v4().simple());
        let meta = keel_db::RequestMeta::system("test", "test");
        let tx = self.state.db.begin_system(meta).await.expect("system tx");
        keel_auth::admin::operator_create(
            tx,
            keel_auth::admin::OperatorRequest {
                email: email.clone(),
                password: "an operator password".to_owned(),
                role,
            },
            None,
        )
        .await
        .expect("create operator");
        let login = self
            .post(
                "/v1/admin/auth/login",
                None,
                json!({"email": email, "password": "an operator password"}),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
        let token = login.body["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        (email, token)
    }

    /// Adds a ready host with this capacity, as enrolment would.
    pub async fn add_host(&self, vcpus: i32, memory_mib: i64) -> uuid::Uuid {
        let id = uuid::Uuid::now_v7();
        let mut admin = self.database.admin().await;
        sqlx::query(
            "INSERT INTO hosts (id, name, region, state, agent_url, vcpus, memory_mib, disk_gib, cert_serial, cert_not_after)
             VALUES ($1, 'test-host', 'local-1', 'ready', 'https://127.0.0.1:1', $2, $3, 1000, '00', now() + interval '1 day')",
        )
        .bind(id)
        .bind(vcpus)
        .bind(memory_mib)
        .execute(&mut admin)
        .await
        .expect("insert host");
        id
    }

    /// Two hours of January 2026 usage of `cpu.small` at 150 an hour, a
    /// past price set up directly: a January invoice of 300. Once per app
    /// (the price would overlap itself).
    pub async fn january_usage(&self, tenant: &Tenant) {
        let mut admin = self.database.admin().await;
        sqlx::query(
            "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
             VALUES ($1, 'cpu.small', 'local-1', 'USD', 'hour', 150, '2026-01-01T00:00:00Z')",
        )
        .bind(uuid::Uuid::now_v7())
        .execute(&mut admin)
        .await
        .expect("rate card");
        sqlx::query(
            "INSERT INTO usage_records (id, tenant_id, project_id, allocation_id, meter, flavor, region,
                                        period_start, started_at, ended_at, quantity, source_event_id)
             VALUES ($1, $2::uuid, $3::uuid, $1, 'allocation.run', 'cpu.small', 'local-1', '2026-01-01',
                     '2026-01-05T10:00:00Z', '2026-01-05T12:00:00Z', 7200000000, $1)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(&tenant.tenant_id)
        .bind(&tenant.project_id)
        .execute(&mut admin)
        .await
        .expect("usage record");
    }

    /// Counts rows of a table as the superuser (sees every tenant).
    pub async fn count(&self, sql: &'static str) -> i64 {
        let mut admin = self.database.admin().await;
        sqlx::query_scalar(sql)
            .fetch_one(&mut admin)
            .await
            .expect("count")
    }
}

impl TestResponse {
    /// Asserts the error envelope: status, code, and a request id.
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.body["code"], code, "{:?}", self.body);
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{:?}",
            self.body
        );
        let request_id = self.body["request_id"]
            .as_str()
            .expect("request_id in the envelope");
        assert_eq!(
            self.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            Some(request_id),
            "the envelope's request id is the echoed header"
        );
    }
}
