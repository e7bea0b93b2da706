//! Non-interactive credentials: service accounts and their keys, personal
//! API tokens, and the exchange of either for a short-lived access token
//! (`POST /v1/auth/token`).
//!
//! Keys and tokens read `ksa_{tenant}_{key}_{secret}` and
//! `kpt_{tenant}_{token}_{secret}`; only the secret's SHA-256 is stored and
//! the whole value is shown once. Access tokens minted from them name the
//! key or token, and every request checks it is still live, so revoking a
//! key, disabling or deleting an account, or removing the user from the
//! tenant ends access at once. What they may do is `authz::decide`'s
//! `Subject::ServiceAccount` / `Subject::ApiToken`: the role's work, never
//! tenant administration.

use keel_core::ResourceName;
use keel_core::ids::{ApiTokenId, ServiceAccountId, ServiceAccountKeyId, TenantId, UserId};
use keel_core::page::{Page, Paginated};
use keel_db::{Audit, Db, NewEvent, RequestMeta, Scope, WriteTx};
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::authz::{ProjectHandle, TenantHandle};
use crate::context::Caller;
use crate::model::{display_name_errors, field};
use crate::{AuthError, Role, TokenKeys, secret};

const SERVICE_ACCOUNT_PREFIX: &str = "ksa";
const API_TOKEN_PREFIX: &str = "kpt";
const DEFAULT_LIFETIME_DAYS: u32 = 90;
const MAX_LIFETIME_DAYS: u32 = 365;

fn lifetime(days: Option<u32>) -> Result<Duration, AuthError> {
    let days = days.unwrap_or(DEFAULT_LIFETIME_DAYS);
    if !(1..=MAX_LIFETIME_DAYS).contains(&days) {
        return Err(AuthError::Validation(vec![field(
            "expires_in_days",
            "invalid",
            "must be between 1 and 365",
        )]));
    }
    Ok(Duration::days(i64::from(days)))
}

fn name_errors(name: &str) -> Vec<FieldError> {
    display_name_errors("name", name).into_iter().collect()
}

fn account_name(
    tenant: TenantId,
    project: keel_core::ids::ProjectId,
    id: ServiceAccountId,
) -> ResourceName {
    ResourceName::new(None, Some(tenant), Some(project), "service_account", id)
}

fn key_name(project: &ProjectHandle, id: ServiceAccountKeyId) -> String {
    ResourceName::new(
        None,
        Some(project.tenant_id),
        Some(project.project_id),
        "service_account_key",
        id,
    )
    .to_string()
}

/// `POST /v1/projects/{project_id}/service-accounts`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountRequest {
    /// 1–100 characters, unique in the project.
    pub name: String,
    /// `admin`, `member` or `viewer` on this project.
    pub role: Role,
}

/// `PATCH /v1/projects/{project_id}/service-accounts/{service_account_id}`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountUpdate {
    /// A disabled account's keys and tokens stop working at once.
    pub disabled: bool,
}

/// A project's service account.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ServiceAccountView {
    pub id: ServiceAccountId,
    pub project_id: keel_core::ids::ProjectId,
    pub name: String,
    pub role: Role,
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub disabled: bool,
    pub version: i64,
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    id: ServiceAccountId,
    tenant_id: TenantId,
    project_id: keel_core::ids::ProjectId,
    name: String,
    role: String,
    created_at: OffsetDateTime,
    disabled: bool,
    version: i64,
}

impl AccountRow {
    fn into_view(self) -> Result<ServiceAccountView, AuthError> {
        Ok(ServiceAccountView {
            resource_name: account_name(self.tenant_id, self.project_id, self.id).to_string(),
            id: self.id,
            project_id: self.project_id,
            name: self.name,
            role: Role::parse(&self.role).ok_or(AuthError::CorruptRole)?,
            created_at: self.created_at,
            disabled: self.disabled,
            version: self.version,
        })
    }
}

const ACCOUNT_COLUMNS: &str = "id, tenant_id, project_id, name, role, created_at, disabled_at IS NOT NULL AS disabled, version";

/// `POST …/keys` and `POST /v1/auth/api-tokens` lifetimes.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// Days until the key expires: 1–365, default 90.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// A service-account key (its secret is never shown again).
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ServiceAccountKeyView {
    pub id: ServiceAccountKeyId,
    pub service_account_id: ServiceAccountId,
    /// Canonical resource name, as in audit rows.
    #[sqlx(skip)]
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    pub revoked: bool,
}

/// A new key and its secret, shown only in this response.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct ServiceAccountKeyCreated {
    pub key: ServiceAccountKeyView,
    /// Exchange it at `POST /v1/auth/token`.
    pub secret: String,
}

impl std::fmt::Debug for ServiceAccountKeyCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKeyCreated")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

const KEY_COLUMNS: &str =
    "id, service_account_id, created_at, expires_at, revoked_at IS NOT NULL AS revoked";

/// Creates a service account in the project. Its role cannot exceed the
/// creator's own on the project.
pub async fn account_create(
    mut tx: WriteTx,
    project: &ProjectHandle,
    creator: Option<UserId>,
    request: ServiceAccountRequest,
) -> Result<ServiceAccountView, AuthError> {
    let mut errors = name_errors(&request.name);
    if request.role == Role::Owner {
        errors.push(field(
            "role",
            "invalid",
            "a service account is admin, member or viewer of its project",
        ));
    }
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    if request.role.max(project.role) != project.role {
        return Err(AuthError::Forbidden(
            "you cannot grant a role above your own",
        ));
    }
    let id = ServiceAccountId::new();
    let inserted: Result<AccountRow, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO service_accounts (id, tenant_id, project_id, name, role, created_by)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ACCOUNT_COLUMNS}"
    )))
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(request.name.trim())
    .bind(request.role.as_str())
    .bind(creator)
    .fetch_one(tx.conn())
    .await;
    let account = match inserted {
        Err(error) if keel_db::is_unique_violation(&error, "service_accounts_name_key") => {
            return Err(AuthError::NameTaken("service account"));
        }
        other => other?.into_view()?,
    };
    let name = account_name(project.tenant_id, project.project_id, id);
    tx.emit(NewEvent::new(
        "service_account.created",
        "service_account",
        id.as_uuid(),
        account.version,
        Some(project.tenant_id),
        name.clone(),
        serde_json::json!({ "service_account_id": id, "role": account.role }),
    ));
    tx.commit(
        Audit::new("service_account.create", Some(project.tenant_id), name)
            .with_details(serde_json::json!({ "name": account.name, "role": account.role })),
    )
    .await?;
    Ok(account)
}

/// The project's service accounts.
pub async fn account_list(
    conn: &mut sqlx::PgConnection,
    project: &ProjectHandle,
    page: Page,
) -> Result<Paginated<ServiceAccountView>, AuthError> {
    let rows: Vec<AccountRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM service_accounts
         WHERE tenant_id = $1 AND project_id = $2 AND ($3::uuid IS NULL OR id > $3)
         ORDER BY id LIMIT $4"
    )))
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    let views = rows
        .into_iter()
        .map(AccountRow::into_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Paginated::from_rows(views, page, |account| {
        account.id.as_uuid()
    }))
}

/// Disables or re-enables a service account.
pub async fn account_update(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
    request: ServiceAccountUpdate,
    expected_version: Option<i64>,
) -> Result<ServiceAccountView, AuthError> {
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM service_accounts WHERE id = $1 AND tenant_id = $2 AND project_id = $3 FOR UPDATE",
    )
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .fetch_optional(tx.conn())
    .await?;
    let current = current.ok_or(AuthError::NotFound("service account"))?;
    if expected_version.is_some_and(|version| version != current) {
        return Err(AuthError::PreconditionFailed);
    }
    let account: AccountRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE service_accounts
         SET disabled_at = CASE WHEN $2 THEN COALESCE(disabled_at, now()) ELSE NULL END,
             version = version + 1
         WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}"
    )))
    .bind(id)
    .bind(request.disabled)
    .fetch_one(tx.conn())
    .await?;
    let account = account.into_view()?;
    tx.commit(Audit::new(
        if request.disabled {
            "service_account.disable"
        } else {
            "service_account.enable"
        },
        Some(project.tenant_id),
        account_name(project.tenant_id, project.project_id, id),
    ))
    .await?;
    Ok(account)
}

/// Deletes a service account and its keys.
pub async fn account_delete(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
) -> Result<(), AuthError> {
    let deleted = sqlx::query(
        "DELETE FROM service_accounts WHERE id = $1 AND tenant_id = $2 AND project_id = $3",
    )
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if deleted == 0 {
        return Err(AuthError::NotFound("service account"));
    }
    tx.commit(Audit::new(
        "service_account.delete",
        Some(project.tenant_id),
        account_name(project.tenant_id, project.project_id, id),
    ))
    .await?;
    Ok(())
}

async fn account_exists(
    tx: &mut WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
) -> Result<(), AuthError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM service_accounts WHERE id = $1 AND tenant_id = $2 AND project_id = $3)",
    )
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .fetch_one(tx.conn())
    .await?;
    if exists {
        Ok(())
    } else {
        Err(AuthError::NotFound("service account"))
    }
}

/// Makes a new key for a service account; its secret is in the result only.
pub async fn key_create(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
    request: KeyRequest,
) -> Result<ServiceAccountKeyCreated, AuthError> {
    let lifetime = lifetime(request.expires_in_days)?;
    account_exists(&mut tx, project, id).await?;
    let key_id = ServiceAccountKeyId::new();
    let made = secret::generate(
        SERVICE_ACCOUNT_PREFIX,
        &[project.tenant_id.as_uuid(), key_id.as_uuid()],
    );
    let mut key: ServiceAccountKeyView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO service_account_keys (id, tenant_id, service_account_id, secret_sha256, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING {KEY_COLUMNS}"
    )))
    .bind(key_id)
    .bind(project.tenant_id)
    .bind(id)
    .bind(&made.digest)
    .bind(OffsetDateTime::now_utc() + lifetime)
    .fetch_one(tx.conn())
    .await?;
    key.resource_name = key_name(project, key_id);
    tx.commit(
        Audit::new(
            "service_account_key.create",
            Some(project.tenant_id),
            account_name(project.tenant_id, project.project_id, id),
        )
        .with_details(
            serde_json::json!({ "key_id": key_id, "expires_at": key.expires_at.unix_timestamp() }),
        ),
    )
    .await?;
    Ok(ServiceAccountKeyCreated {
        key,
        secret: made.token,
    })
}

/// A service account's keys, newest last.
pub async fn key_list(
    tx: &mut WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
) -> Result<Vec<ServiceAccountKeyView>, AuthError> {
    account_exists(tx, project, id).await?;
    let mut keys: Vec<ServiceAccountKeyView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLUMNS} FROM service_account_keys
         WHERE tenant_id = $1 AND service_account_id = $2 ORDER BY id"
    )))
    .bind(project.tenant_id)
    .bind(id)
    .fetch_all(tx.conn())
    .await?;
    for key in &mut keys {
        key.resource_name = key_name(project, key.id);
    }
    Ok(keys)
}

/// Revokes one key; the account's other keys keep working.
pub async fn key_revoke(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: ServiceAccountId,
    key_id: ServiceAccountKeyId,
) -> Result<(), AuthError> {
    account_exists(&mut tx, project, id).await?;
    let revoked = sqlx::query(
        "UPDATE service_account_keys SET revoked_at = now()
         WHERE id = $1 AND service_account_id = $2 AND tenant_id = $3 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .bind(id)
    .bind(project.tenant_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(AuthError::NotFound("key"));
    }
    tx.commit(
        Audit::new(
            "service_account_key.revoke",
            Some(project.tenant_id),
            account_name(project.tenant_id, project.project_id, id),
        )
        .with_details(serde_json::json!({ "key_id": key_id })),
    )
    .await?;
    Ok(())
}

/// `POST /v1/auth/api-tokens`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenRequest {
    /// What the token is for, 1–100 characters.
    pub name: String,
    /// Days until the token expires: 1–365, default 90.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// A personal API token (its secret is never shown again).
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ApiTokenView {
    pub id: ApiTokenId,
    pub name: String,
    /// Canonical resource name, as in audit rows.
    #[sqlx(skip)]
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
}

/// A new personal API token and its secret, shown only in this response.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct ApiTokenCreated {
    pub token: ApiTokenView,
    /// Exchange it at `POST /v1/auth/token`.
    pub secret: String,
}

impl std::fmt::Debug for ApiTokenCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokenCreated")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

fn api_token_name(tenant: TenantId, id: ApiTokenId) -> ResourceName {
    ResourceName::new(None, Some(tenant), None, "api_token", id)
}

/// Creates a personal API token for the caller in their tenant.
pub async fn api_token_create(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    request: ApiTokenRequest,
) -> Result<ApiTokenCreated, AuthError> {
    let errors = name_errors(&request.name);
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let lifetime = lifetime(request.expires_in_days)?;
    let user_id = tenant.user_id()?;
    let id = ApiTokenId::new();
    let made = secret::generate(
        API_TOKEN_PREFIX,
        &[tenant.tenant_id.as_uuid(), id.as_uuid()],
    );
    let mut token: ApiTokenView = sqlx::query_as(
        "INSERT INTO api_tokens (id, tenant_id, user_id, name, secret_sha256, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, name, created_at, expires_at",
    )
    .bind(id)
    .bind(tenant.tenant_id)
    .bind(user_id)
    .bind(request.name.trim())
    .bind(&made.digest)
    .bind(OffsetDateTime::now_utc() + lifetime)
    .fetch_one(tx.conn())
    .await?;
    token.resource_name = api_token_name(tenant.tenant_id, id).to_string();
    tx.commit(
        Audit::new(
            "api_token.create",
            Some(tenant.tenant_id),
            api_token_name(tenant.tenant_id, id),
        )
        .with_details(serde_json::json!({ "name": token.name })),
    )
    .await?;
    Ok(ApiTokenCreated {
        token,
        secret: made.token,
    })
}

/// The caller's live personal API tokens in this tenant.
pub async fn api_token_list(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
) -> Result<Vec<ApiTokenView>, AuthError> {
    let mut tokens: Vec<ApiTokenView> = sqlx::query_as(
        "SELECT id, name, created_at, expires_at FROM api_tokens
         WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > now()
         ORDER BY id",
    )
    .bind(tenant.tenant_id)
    .bind(tenant.user_id()?)
    .fetch_all(conn)
    .await?;
    for token in &mut tokens {
        token.resource_name = api_token_name(tenant.tenant_id, token.id).to_string();
    }
    Ok(tokens)
}

/// Revokes one of the caller's tokens.
pub async fn api_token_revoke(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    id: ApiTokenId,
) -> Result<(), AuthError> {
    let revoked = sqlx::query(
        "UPDATE api_tokens SET revoked_at = now()
         WHERE id = $1 AND tenant_id = $2 AND user_id = $3 AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(tenant.tenant_id)
    .bind(tenant.user_id()?)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(AuthError::NotFound("api token"));
    }
    tx.commit(Audit::new(
        "api_token.revoke",
        Some(tenant.tenant_id),
        api_token_name(tenant.tenant_id, id),
    ))
    .await?;
    Ok(())
}

/// `POST /v1/auth/token`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenExchangeRequest {
    /// A service-account key (`ksa_…`) or a personal API token (`kpt_…`).
    pub secret: String,
}

impl std::fmt::Debug for TokenExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenExchangeRequest { .. }")
    }
}

/// A short-lived access token minted from a key or API token.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct ExchangedToken {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    pub expires_in: u32,
    pub tenant_id: TenantId,
}

impl std::fmt::Debug for ExchangedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangedToken")
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

#[derive(sqlx::FromRow)]
struct PresentedCredential {
    subject: uuid::Uuid,
    secret_sha256: Vec<u8>,
    live: bool,
}

/// Exchanges a service-account key or a personal API token for an access
/// token. Unknown, forged, expired, revoked and disabled all look alike.
pub async fn exchange(
    db: &Db,
    keys: &TokenKeys,
    meta: RequestMeta,
    presented: &str,
) -> Result<ExchangedToken, AuthError> {
    let (kind, parsed) = if let Some(parsed) = secret::parse::<2>(SERVICE_ACCOUNT_PREFIX, presented)
    {
        (SERVICE_ACCOUNT_PREFIX, parsed)
    } else if let Some(parsed) = secret::parse::<2>(API_TOKEN_PREFIX, presented) {
        (API_TOKEN_PREFIX, parsed)
    } else {
        return Err(AuthError::KeyInvalid);
    };
    let tenant_id = TenantId::from(parsed.ids[0]);
    let credential = parsed.ids[1];
    let mut tx = db
        .begin_tenant(
            meta,
            Scope::Tenant {
                tenant_id,
                user_id: None,
            },
        )
        .await?;
    let sql = if kind == SERVICE_ACCOUNT_PREFIX {
        "SELECT sa.id AS subject, k.secret_sha256,
                (k.revoked_at IS NULL AND k.expires_at > now() AND sa.disabled_at IS NULL) AS live
         FROM service_account_keys k JOIN service_accounts sa ON sa.id = k.service_account_id
         WHERE k.id = $1 AND k.tenant_id = $2"
    } else {
        "SELECT t.user_id AS subject, t.secret_sha256,
                (t.revoked_at IS NULL AND t.expires_at > now()) AS live
         FROM api_tokens t WHERE t.id = $1 AND t.tenant_id = $2"
    };
    let row: Option<PresentedCredential> = sqlx::query_as(sql)
        .bind(credential)
        .bind(tenant_id)
        .fetch_optional(tx.conn())
        .await?;
    let row = row
        .filter(|row| row.live && parsed.matches(&row.secret_sha256))
        .ok_or(AuthError::KeyInvalid)?;
    let caller = if kind == SERVICE_ACCOUNT_PREFIX {
        Caller::ServiceAccount {
            service_account_id: ServiceAccountId::from(row.subject),
            key_id: ServiceAccountKeyId::from(credential),
        }
    } else {
        Caller::ApiToken {
            user_id: UserId::from(row.subject),
            token_id: ApiTokenId::from(credential),
        }
    };
    let issued = keys.issue_for(tenant_id, caller)?;
    let principal = crate::Principal { tenant_id, caller };
    tx.set_actor(principal.actor());
    tx.commit(
        Audit::new(
            "token.exchange",
            Some(tenant_id),
            ResourceName::new(None, Some(tenant_id), None, "credential", credential),
        )
        .with_details(serde_json::json!({ "kind": kind })),
    )
    .await?;
    Ok(ExchangedToken {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
        tenant_id,
    })
}
