//! Rate limits and login throttling.
//!
//! - Every request counts against its client IP; an authenticated one also
//!   against its principal. The token endpoints (register, login, refresh,
//!   token exchange, the operators' login) and those that check a password
//!   again (password change, account deletion) have a much stricter
//!   per-IP limit. Over a limit: `429 rate_limited`
//!   with `Retry-After`. Limits are GCRA buckets (`governor`) per key.
//! - Failed logins slow down the IP they come from (after a few free
//!   failures each further attempt must wait twice as long as the last,
//!   up to a cap: `429` until then) and the account they target (its logins
//!   are answered after a growing delay, up to a few seconds). The account
//!   is slowed, never refused, so an attacker cannot lock its owner out;
//!   failures are forgotten after a quiet window.
//!
//! State is per api process: with N api instances the effective limits are
//! up to N times the configured ones (see doc/decisions.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRef, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_http::ApiError;
use serde::{Deserialize, Serialize};

use crate::TokenKeys;
use crate::context::authenticate;

/// The `[rate_limit]` configuration section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Sustained requests per minute of one principal, and its burst.
    pub principal_per_minute: u32,
    pub principal_burst: u32,
    /// Sustained requests per minute of one client IP, and its burst.
    pub ip_per_minute: u32,
    pub ip_burst: u32,
    /// Register, login and refresh: per client IP.
    pub auth_per_minute: u32,
    pub auth_burst: u32,
    /// Take the client IP from the last `X-Forwarded-For` entry, the one
    /// the proxy in front appended (only behind exactly one such proxy).
    pub trust_forwarded_for: bool,
    /// Failed logins an IP or account may have before slowing down.
    pub login_free_failures: u32,
    /// The longest an IP must wait between failed logins, in seconds.
    pub login_ip_max_backoff_secs: u32,
    /// The longest delay added to an account's logins, in milliseconds.
    pub login_account_max_delay_ms: u32,
    /// Failures older than this are forgotten, in seconds.
    pub login_failure_window_secs: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            principal_per_minute: 1200,
            principal_burst: 200,
            ip_per_minute: 2400,
            ip_burst: 400,
            auth_per_minute: 30,
            auth_burst: 10,
            trust_forwarded_for: false,
            login_free_failures: 5,
            login_ip_max_backoff_secs: 900,
            login_account_max_delay_ms: 4000,
            login_failure_window_secs: 900,
        }
    }
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(per_minute).allow_burst(burst)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FailureKey {
    Ip(IpAddr),
    Account(String),
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The client address of a request, as the rate-limit layer saw it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientIp(pub Option<IpAddr>);

/// A refusal: come back after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl IntoResponse for RetryAfter {
    fn into_response(self) -> Response {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        let secs = secs.max(1);
        let value = HeaderValue::from_str(&secs.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("1"));
        (
            [(header::RETRY_AFTER, value)],
            ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; retry in {secs} s"),
            ),
        )
            .into_response()
    }
}

pub struct Limits {
    config: RateLimitConfig,
    principal: DefaultKeyedRateLimiter<String>,
    ip: DefaultKeyedRateLimiter<IpAddr>,
    auth: DefaultKeyedRateLimiter<IpAddr>,
    failures: Mutex<HashMap<FailureKey, Failures>>,
    checks: AtomicU64,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How often (in checks) stale keys are dropped.
const PRUNE_EVERY: u64 = 4096;
/// The most failed-login entries kept; beyond it new ones are not
/// recorded until old ones expire (memory stays bounded under a flood of
/// distinct addresses or accounts).
const MAX_FAILURE_ENTRIES: usize = 100_000;

impl Limits {
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            principal: RateLimiter::keyed(quota(
                config.principal_per_minute,
                config.principal_burst,
            )),
            ip: RateLimiter::keyed(quota(config.ip_per_minute, config.ip_burst)),
            auth: RateLimiter::keyed(quota(config.auth_per_minute, config.auth_burst)),
            failures: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            config,
        }
    }

    fn check<K: Clone + std::hash::Hash + Eq>(
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
    ) -> Result<(), RetryAfter> {
        limiter.check_key(key).map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.login_failure_window_secs))
    }

    fn prune(&self) {
        self.principal.retain_recent();
        self.ip.retain_recent();
        self.auth.retain_recent();
        let window = self.window();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|_, entry| entry.last.elapsed() < window);
    }

    fn failures_of(&self, key: &FailureKey) -> Option<Failures> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get(key)
            .copied()
            .filter(|entry| entry.last.elapsed() < self.window())
    }

    /// Failures beyond the free ones, if any.
    fn excess(&self, entry: Option<Failures>) -> Option<(u32, Instant)> {
        let entry = entry?;
        let excess = entry.count.checked_sub(self.config.login_free_failures)?;
        (excess > 0).then_some((excess, entry.last))
    }

    /// Before checking a password: refuses an IP that must still wait after
    /// its last failure, and returns how long to delay this account's
    /// answer.
    pub fn login_gate(&self, ip: Option<IpAddr>, email: &str) -> Result<Duration, RetryAfter> {
        if !self.config.enabled {
            return Ok(Duration::ZERO);
        }
        if let Some(ip) = ip
            && let Some((excess, last)) = self.excess(self.failures_of(&FailureKey::Ip(ip)))
        {
            let backoff = Duration::from_secs(1_u64 << (excess - 1).min(20)).min(
                Duration::from_secs(u64::from(self.config.login_ip_max_backoff_secs)),
            );
            let waited = last.elapsed();
            if waited < backoff {
                return Err(RetryAfter(backoff - waited));
            }
        }
        let account = FailureKey::Account(email.trim().to_lowercase());
        Ok(match self.excess(self.failures_of(&account)) {
            Some((excess, _)) => (Duration::from_millis(250) * (1_u32 << (excess - 1).min(10)))
                .min(Duration::from_millis(u64::from(
                    self.config.login_account_max_delay_ms,
                ))),
            None => Duration::ZERO,
        })
    }

    /// Records a failed login from `ip` for `email`.
    pub fn login_failed(&self, ip: Option<IpAddr>, email: &str) {
        let window = self.window();
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let keys = ip
            .map(FailureKey::Ip)
            .into_iter()
            .chain([FailureKey::Account(email.trim().to_lowercase())]);
        if failures.len() >= MAX_FAILURE_ENTRIES {
            failures.retain(|_, entry| entry.last.elapsed() < window);
        }
        for key in keys {
            if failures.len() >= MAX_FAILURE_ENTRIES && !failures.contains_key(&key) {
                continue;
            }
            let entry = failures.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            if entry.last.elapsed() >= window {
                entry.count = 0;
            }
            entry.count = entry.count.saturating_add(1);
            entry.last = now;
        }
    }

    /// A successful login clears the account's failures (not the IP's: an
    /// attacker must not reset their IP by logging into their own account).
    pub fn login_succeeded(&self, email: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&FailureKey::Account(email.trim().to_lowercase()));
    }
}

fn client_ip(request: &Request, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for
        && let Some(ip) = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok())
            // The right-most entry is the one the trusted proxy appended;
            // anything left of it the client wrote.
            .and_then(|value| value.rsplit(',').next())
            .and_then(|first| first.trim().parse().ok())
    {
        return Some(ip);
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

/// The token and password endpoints: stricter per-IP limit.
fn is_auth_endpoint(request: &Request) -> bool {
    request.method() == Method::POST
        && matches!(
            request.uri().path(),
            "/v1/auth/login"
                | "/v1/auth/register"
                | "/v1/auth/refresh"
                | "/v1/auth/switch"
                | "/v1/auth/token"
                | "/v1/auth/password"
                | "/v1/auth/delete-account"
                | "/v1/admin/auth/login"
        )
}

/// The middleware: per-IP, per-principal and token-endpoint limits.
pub async fn layer<S>(State(state): State<S>, mut request: Request, next: Next) -> Response
where
    S: Send + Sync,
    Arc<Limits>: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    let limits = Arc::<Limits>::from_ref(&state);
    let ip = client_ip(&request, limits.config.trust_forwarded_for);
    request.extensions_mut().insert(ClientIp(ip));
    let path = request.uri().path();
    if !limits.config.enabled || path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    if limits.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
        limits.prune();
    }
    let auth_endpoint = is_auth_endpoint(&request);
    let (mut parts, body) = request.into_parts();
    let keys = Arc::<TokenKeys>::from_ref(&state);
    let principal = authenticate(&mut parts, &keys).ok().map(|(p, _)| p.label());
    let verdict = ip
        .map_or(Ok(()), |ip| {
            if auth_endpoint {
                Limits::check(&limits.auth, &ip)?;
            }
            Limits::check(&limits.ip, &ip)
        })
        .and_then(|()| principal.map_or(Ok(()), |user| Limits::check(&limits.principal, &user)));
    match verdict {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(retry) => {
            tracing::info!(?ip, "rate limited");
            retry.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> Limits {
        Limits::new(RateLimitConfig {
            login_free_failures: 2,
            ..RateLimitConfig::default()
        })
    }

    #[test]
    fn an_ip_waits_longer_after_each_failure_beyond_the_free_ones() {
        let limits = strict();
        let ip = Some(IpAddr::from([192, 0, 2, 1]));
        for _ in 0..2 {
            assert!(limits.login_gate(ip, "a@example.com").is_ok());
            limits.login_failed(ip, "a@example.com");
        }
        assert!(limits.login_gate(ip, "b@example.com").is_ok());
        limits.login_failed(ip, "b@example.com");
        let Err(RetryAfter(wait)) = limits.login_gate(ip, "c@example.com") else {
            panic!("the third failure must slow the IP down");
        };
        assert!(wait <= Duration::from_secs(1));
        // Another IP is not affected.
        assert!(
            limits
                .login_gate(Some(IpAddr::from([192, 0, 2, 2])), "c@example.com")
                .is_ok()
        );
    }

    #[test]
    fn an_account_is_slowed_with_a_cap_but_never_refused() {
        let limits = strict();
        for attacker in 0..40_u8 {
            limits.login_failed(
                Some(IpAddr::from([198, 51, 100, attacker])),
                "victim@example.com",
            );
        }
        let delay = limits
            .login_gate(Some(IpAddr::from([203, 0, 113, 7])), "VICTIM@example.com")
            .expect("the account's owner is never refused");
        assert_eq!(delay, Duration::from_millis(4000), "capped");
        limits.login_succeeded("victim@example.com");
        assert_eq!(
            limits
                .login_gate(Some(IpAddr::from([203, 0, 113, 7])), "victim@example.com")
                .unwrap(),
            Duration::ZERO
        );
    }

    #[test]
    fn behind_a_proxy_the_client_is_the_entry_the_proxy_appended() {
        let mut request = Request::builder()
            .header("x-forwarded-for", "203.0.113.66, 198.51.100.7")
            .body(axum::body::Body::empty())
            .unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 443))));
        assert_eq!(
            client_ip(&request, true),
            Some(IpAddr::from([198, 51, 100, 7]))
        );
        // Untrusted, the header is ignored.
        assert_eq!(
            client_ip(&request, false),
            Some(IpAddr::from([10, 0, 0, 1]))
        );
    }

    #[test]
    fn the_retry_after_header_rounds_up_to_whole_seconds() {
        let response = RetryAfter(Duration::from_millis(1200)).into_response();
        assert_eq!(response.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
