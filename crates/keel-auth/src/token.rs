//! Access tokens: JWTs signed with HS256 under a key id (`kid`), short-lived
//! (15 minutes by default). A token names the user (`sub`) and the tenant
//! the session acts in (`tid`); the role is NOT in the token but read from
//! the membership on every request, so a removed member loses access at
//! once.
//!
//! Keys: the first configured key signs; every configured key verifies, so
//! a new key can be introduced and the old one retired after the token
//! lifetime without logging anyone out.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keel_core::ids::{
    ApiTokenId, OperatorId, OperatorSessionId, ServiceAccountId, ServiceAccountKeyId, SessionId,
    TenantId, UserId,
};
use uuid::Uuid;

use crate::context::Caller;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::AuthError;

const ISSUER: &str = "keel";
const AUDIENCE: &str = "keel-api";
/// Operator tokens have their own audience: a tenant token is never an
/// operator token, nor the other way round.
const OPERATOR_AUDIENCE: &str = "keel-admin";
/// Minimum length of a signing secret, in bytes (256 bits of key).
pub const MIN_SECRET_LEN: usize = 32;

/// Token settings, part of the api's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Signing secrets, newest first. The first signs new tokens; all
    /// verify. Each must be at least 32 bytes.
    pub signing_keys: Vec<SecretString>,
    /// Lifetime of an access token, in seconds.
    #[serde(default = "default_ttl")]
    pub access_token_ttl_secs: u32,
    /// Lifetime of a refresh token, in seconds: a session unused for this
    /// long ends.
    #[serde(default = "default_refresh_ttl")]
    pub refresh_token_ttl_secs: u32,
    /// Absolute lifetime of a session, in seconds, however often it is
    /// refreshed.
    #[serde(default = "default_session_max_age")]
    pub session_max_age_secs: u32,
}

fn default_ttl() -> u32 {
    900
}

fn default_refresh_ttl() -> u32 {
    14 * 86_400
}

fn default_session_max_age() -> u32 {
    30 * 86_400
}

impl TokenConfig {
    /// The defaults with these signing keys (tests and tools).
    pub fn with_keys(keys: &[&str]) -> Self {
        Self {
            signing_keys: keys
                .iter()
                .map(|key| SecretString::from((*key).to_owned()))
                .collect(),
            access_token_ttl_secs: default_ttl(),
            refresh_token_ttl_secs: default_refresh_ttl(),
            session_max_age_secs: default_session_max_age(),
        }
    }
}

/// What an access token stands for (claim `knd`; absent means a session).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TokenKind {
    #[default]
    Session,
    ApiToken,
    ServiceAccount,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The user, or the service account.
    sub: Uuid,
    tid: TenantId,
    /// The session, API token or service-account key the token came from;
    /// checked on every request.
    sid: Uuid,
    #[serde(default)]
    knd: TokenKind,
    iat: i64,
    exp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OperatorClaims {
    iss: String,
    aud: String,
    sub: OperatorId,
    sid: OperatorSessionId,
    iat: i64,
    exp: i64,
}

/// The verified content of an operator's access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedOperatorToken {
    pub operator_id: OperatorId,
    pub session_id: OperatorSessionId,
}

/// The verified content of an access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    pub tenant_id: TenantId,
    pub caller: Caller,
}

pub struct IssuedToken {
    pub token: String,
    pub expires_in: u32,
}

pub struct TokenKeys {
    signing_kid: String,
    signing_key: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    ttl_secs: u32,
    refresh_ttl: time::Duration,
    session_max_age: time::Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("signing_kid", &self.signing_kid)
            .field("verifying_kids", &self.verifying.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a token configuration is unusable (reported at start-up).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenConfigError {
    #[error("auth.signing_keys is empty: at least one signing key is required")]
    NoKeys,
    #[error("auth.signing_keys[{0}] is shorter than {MIN_SECRET_LEN} bytes")]
    TooShort(usize),
    #[error("auth.access_token_ttl_secs must be between 60 and 86400")]
    Ttl,
    #[error(
        "auth.refresh_token_ttl_secs must be longer than the access token lifetime and at most auth.session_max_age_secs"
    )]
    RefreshTtl,
}

/// The key id of a secret: the first 16 hex digits of its SHA-256. Public,
/// stable, and reveals nothing about the key.
fn key_id(secret: &[u8]) -> String {
    hex_prefix(&Sha256::digest(secret))
}

fn hex_prefix(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl TokenKeys {
    pub fn new(config: &TokenConfig) -> Result<Self, TokenConfigError> {
        if !(60..=86_400).contains(&config.access_token_ttl_secs) {
            return Err(TokenConfigError::Ttl);
        }
        if config.refresh_token_ttl_secs <= config.access_token_ttl_secs
            || config.refresh_token_ttl_secs > config.session_max_age_secs
        {
            return Err(TokenConfigError::RefreshTtl);
        }
        let mut verifying = HashMap::new();
        let mut signing = None;
        for (index, secret) in config.signing_keys.iter().enumerate() {
            let bytes = secret.expose_secret().as_bytes();
            if bytes.len() < MIN_SECRET_LEN {
                return Err(TokenConfigError::TooShort(index));
            }
            let kid = key_id(bytes);
            if signing.is_none() {
                signing = Some((kid.clone(), EncodingKey::from_secret(bytes)));
            }
            verifying.insert(kid, DecodingKey::from_secret(bytes));
        }
        let (signing_kid, signing_key) = signing.ok_or(TokenConfigError::NoKeys)?;
        Ok(Self {
            signing_kid,
            signing_key,
            verifying,
            ttl_secs: config.access_token_ttl_secs,
            refresh_ttl: time::Duration::seconds(i64::from(config.refresh_token_ttl_secs)),
            session_max_age: time::Duration::seconds(i64::from(config.session_max_age_secs)),
        })
    }

    /// How long a refresh token stays valid.
    pub fn refresh_ttl(&self) -> time::Duration {
        self.refresh_ttl
    }

    /// How long a session may last in all.
    pub fn session_max_age(&self) -> time::Duration {
        self.session_max_age
    }

    /// The id of the key that signs new tokens.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// An access token for `caller` acting in `tenant_id`.
    pub fn issue_for(&self, tenant_id: TenantId, caller: Caller) -> Result<IssuedToken, AuthError> {
        let (knd, sub, sid) = match caller {
            Caller::User {
                user_id,
                session_id,
            } => (TokenKind::Session, user_id.as_uuid(), session_id.as_uuid()),
            Caller::ApiToken { user_id, token_id } => {
                (TokenKind::ApiToken, user_id.as_uuid(), token_id.as_uuid())
            }
            Caller::ServiceAccount {
                service_account_id,
                key_id,
                ..
            } => (
                TokenKind::ServiceAccount,
                service_account_id.as_uuid(),
                key_id.as_uuid(),
            ),
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let token = self.sign(&Claims {
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            sub,
            tid: tenant_id,
            sid,
            knd,
            iat: now,
            exp: now + i64::from(self.ttl_secs),
        })?;
        Ok(IssuedToken {
            token,
            expires_in: self.ttl_secs,
        })
    }

    /// An access token for a user's session.
    pub fn issue(
        &self,
        user_id: UserId,
        tenant_id: TenantId,
        session_id: SessionId,
    ) -> Result<IssuedToken, AuthError> {
        self.issue_for(
            tenant_id,
            Caller::User {
                user_id,
                session_id,
            },
        )
    }

    fn sign(&self, claims: &impl Serialize) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing_key).map_err(AuthError::Signing)
    }

    /// An access token for an operator's session (audience `keel-admin`).
    pub fn issue_operator(
        &self,
        operator_id: OperatorId,
        session_id: OperatorSessionId,
    ) -> Result<IssuedToken, AuthError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let token = self.sign(&OperatorClaims {
            iss: ISSUER.to_owned(),
            aud: OPERATOR_AUDIENCE.to_owned(),
            sub: operator_id,
            sid: session_id,
            iat: now,
            exp: now + i64::from(self.ttl_secs),
        })?;
        Ok(IssuedToken {
            token,
            expires_in: self.ttl_secs,
        })
    }

    pub fn verify(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        let claims: Claims = self.decode(token, AUDIENCE)?;
        let caller = match claims.knd {
            TokenKind::Session => Caller::User {
                user_id: UserId::from(claims.sub),
                session_id: SessionId::from(claims.sid),
            },
            TokenKind::ApiToken => Caller::ApiToken {
                user_id: UserId::from(claims.sub),
                token_id: ApiTokenId::from(claims.sid),
            },
            TokenKind::ServiceAccount => Caller::ServiceAccount {
                service_account_id: ServiceAccountId::from(claims.sub),
                key_id: ServiceAccountKeyId::from(claims.sid),
            },
        };
        Ok(VerifiedToken {
            tenant_id: claims.tid,
            caller,
        })
    }

    pub fn verify_operator(&self, token: &str) -> Result<VerifiedOperatorToken, AuthError> {
        let claims: OperatorClaims = self.decode(token, OPERATOR_AUDIENCE)?;
        Ok(VerifiedOperatorToken {
            operator_id: claims.sub,
            session_id: claims.sid,
        })
    }

    fn decode<C: DeserializeOwned>(&self, token: &str, audience: &str) -> Result<C, AuthError> {
        let invalid = AuthError::Unauthenticated("the access token is invalid");
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Unauthenticated("the access token is invalid"))?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or(AuthError::Unauthenticated("the access token is invalid"))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        match jsonwebtoken::decode::<C>(token, key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(error)
                if matches!(
                    error.kind(),
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature
                ) =>
            {
                Err(AuthError::Unauthenticated("the access token has expired"))
            }
            Err(_) => Err(invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> TokenKeys {
        TokenKeys::new(&TokenConfig::with_keys(secrets)).unwrap()
    }

    const A: &str = "an-example-signing-secret-of-32-bytes-or-more";
    const B: &str = "another-example-signing-secret-of-32-bytes!!";

    #[test]
    fn an_issued_token_verifies_to_its_user_and_tenant() {
        let keys = keys(&[A]);
        let (user, tenant, session) = (UserId::new(), TenantId::new(), SessionId::new());
        let issued = keys.issue(user, tenant, session).unwrap();
        assert_eq!(issued.expires_in, 900);
        assert_eq!(
            keys.verify(&issued.token).unwrap(),
            VerifiedToken {
                tenant_id: tenant,
                caller: Caller::User {
                    user_id: user,
                    session_id: session,
                },
            }
        );
    }

    #[test]
    fn a_token_signed_with_a_retired_key_still_verifies_during_rotation() {
        let old = keys(&[A])
            .issue(UserId::new(), TenantId::new(), SessionId::new())
            .unwrap();
        assert!(keys(&[B, A]).verify(&old.token).is_ok());
        assert!(keys(&[B]).verify(&old.token).is_err());
    }

    #[test]
    fn tampered_and_foreign_tokens_are_rejected() {
        let keys = keys(&[A]);
        let token = keys
            .issue(UserId::new(), TenantId::new(), SessionId::new())
            .unwrap()
            .token;
        let mut tampered = token.clone().into_bytes();
        let middle = tampered.len() / 2;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        assert!(keys.verify(&String::from_utf8(tampered).unwrap()).is_err());
        assert!(keys.verify("not.a.token").is_err());
        assert!(keys.verify("").is_err());
    }

    #[test]
    fn operator_and_tenant_tokens_are_never_taken_for_each_other() {
        let keys = keys(&[A]);
        let operator = keys
            .issue_operator(OperatorId::new(), OperatorSessionId::new())
            .unwrap();
        let user = keys
            .issue(UserId::new(), TenantId::new(), SessionId::new())
            .unwrap();
        assert!(keys.verify_operator(&operator.token).is_ok());
        assert!(keys.verify(&operator.token).is_err());
        assert!(keys.verify_operator(&user.token).is_err());
    }

    #[test]
    fn an_expired_token_is_rejected() {
        let keys = keys(&[A]);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: Uuid::now_v7(),
            tid: TenantId::new(),
            sid: Uuid::now_v7(),
            knd: TokenKind::Session,
            iat: now - 7200,
            exp: now - 3600,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(keys.signing_kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &keys.signing_key).unwrap();
        assert!(matches!(
            keys.verify(&token),
            Err(AuthError::Unauthenticated("the access token has expired"))
        ));
    }

    #[test]
    fn short_or_missing_keys_are_refused_at_start_up() {
        let config = |keys: Vec<&str>| TokenConfig::with_keys(&keys);
        assert_eq!(
            TokenKeys::new(&config(vec![])).unwrap_err(),
            TokenConfigError::NoKeys
        );
        assert_eq!(
            TokenKeys::new(&config(vec![A, "short"])).unwrap_err(),
            TokenConfigError::TooShort(1)
        );
        let mut short_refresh = config(vec![A]);
        short_refresh.refresh_token_ttl_secs = 60;
        assert_eq!(
            TokenKeys::new(&short_refresh).unwrap_err(),
            TokenConfigError::RefreshTtl
        );
    }
}
