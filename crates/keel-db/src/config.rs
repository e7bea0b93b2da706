//! Database settings, part of the api's and the worker's configuration.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

/// Connection settings. The URLs may hold passwords, so they are secrets:
/// `Debug` prints `[REDACTED]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The runtime role: a member of `keel_app` and `keel_system`, without
    /// BYPASSRLS of its own.
    pub url: SecretString,
    /// The owner role that applies migrations; defaults to `url`.
    #[serde(default)]
    pub migrate_url: Option<SecretString>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_acquire_timeout_secs")]
    pub acquire_timeout_secs: u64,
}

fn default_max_connections() -> u32 {
    10
}

fn default_acquire_timeout_secs() -> u64 {
    5
}

impl DatabaseConfig {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            migrate_url: None,
            max_connections: default_max_connections(),
            acquire_timeout_secs: default_acquire_timeout_secs(),
        }
    }

    pub fn url_options(&self) -> Result<PgConnectOptions, sqlx::Error> {
        PgConnectOptions::from_str(self.url.expose_secret())
    }

    pub fn migrate_options(&self) -> Result<PgConnectOptions, sqlx::Error> {
        let url = self.migrate_url.as_ref().unwrap_or(&self.url);
        PgConnectOptions::from_str(url.expose_secret())
    }
}
