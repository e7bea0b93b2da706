//! Operators and the admin api (`/v1/admin/…`).
//!
//! Operators are platform principals, never members of a tenant: their own
//! table, their own login, tokens with their own audience (`keel-admin`),
//! and platform roles (`operator`, `read_only_operator`) decided by the same
//! `authz::decide` as tenant roles. Their requests run in system
//! transactions (they see every tenant) and every one of them, reads
//! included, is audited in the platform chain with the operator as actor.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use keel_core::ids::{OperatorId, OperatorSessionId, TenantId};
use keel_core::page::{Page, PageParams, Paginated};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, RequestMeta, WriteTx};
use keel_http::{ApiError, ErrorBody, FieldError, Json, Query, RequestId, TraceParent};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit_chain::{self, ChainVerification};
use crate::authz::{Action, PlatformRole, decide};
use crate::context::{anonymous_meta, bearer};
use crate::http::page_error;
use crate::limits::{ClientIp, Limits};
use crate::model::{email_is_plausible, field, password_errors};
use crate::{AuthError, TokenKeys, password};

/// A verified operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperatorPrincipal {
    pub operator_id: OperatorId,
    pub session_id: OperatorSessionId,
}

/// Extracted by every admin handler: an operator token, or 401.
pub struct OperatorCtx {
    pub principal: OperatorPrincipal,
    pub meta: RequestMeta,
    db: Db,
}

impl OperatorCtx {
    /// A system transaction (every tenant visible), audited as the operator.
    pub async fn begin(&self) -> Result<WriteTx, keel_db::DbError> {
        self.db.begin_system(self.meta.clone()).await
    }
}

impl<S> FromRequestParts<S> for OperatorCtx
where
    S: Send + Sync,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<TokenKeys>::from_ref(state);
        let verified = keys.verify_operator(bearer(parts)?)?;
        let principal = OperatorPrincipal {
            operator_id: verified.operator_id,
            session_id: verified.session_id,
        };
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default();
        Ok(OperatorCtx {
            meta: RequestMeta {
                request_id,
                actor: Actor::Operator {
                    operator_id: principal.operator_id,
                },
                traceparent: parts
                    .extensions
                    .get::<TraceParent>()
                    .map(|trace| trace.0.clone()),
            },
            principal,
            db: Db::from_ref(state),
        })
    }
}

/// Proof that the operator may do `action`.
#[derive(Clone, Copy, Debug)]
pub struct PlatformHandle {
    pub operator_id: OperatorId,
    pub role: PlatformRole,
}

/// Authorises a platform action: the operator must exist, be enabled and
/// have a live session; the decision is `authz::decide`'s.
pub async fn authorize_platform(
    conn: &mut sqlx::PgConnection,
    principal: &OperatorPrincipal,
    action: Action,
) -> Result<PlatformHandle, AuthError> {
    let role: Option<String> = sqlx::query_scalar(
        "SELECT o.role FROM operators o
         WHERE o.id = $1 AND o.disabled_at IS NULL
           AND EXISTS (SELECT FROM operator_sessions s
                       WHERE s.id = $2 AND s.operator_id = o.id
                         AND s.revoked_at IS NULL AND s.expires_at > now())",
    )
    .bind(principal.operator_id)
    .bind(principal.session_id)
    .fetch_optional(conn)
    .await?;
    let role = role
        .as_deref()
        .and_then(PlatformRole::parse)
        .ok_or(AuthError::Unauthenticated(
            "the operator session has ended or the operator is disabled",
        ))?;
    if !decide(role, action) {
        return Err(AuthError::Forbidden(
            "your platform role does not allow this",
        ));
    }
    Ok(PlatformHandle {
        operator_id: principal.operator_id,
        role,
    })
}

fn platform_name(what: &str) -> ResourceName {
    ResourceName::new(None, None, None, "platform", what)
}

fn operator_name(id: OperatorId) -> ResourceName {
    ResourceName::new(None, None, None, "operator", id)
}

/// `POST /v1/admin/operators` (and `api operator create`).
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperatorRequest {
    pub email: String,
    /// 10 to 128 characters.
    pub password: String,
    pub role: PlatformRole,
}

impl std::fmt::Debug for OperatorRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorRequest")
            .field("email", &self.email)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl OperatorRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !email_is_plausible(self.email.trim()) {
            errors.push(field("email", "invalid", "must be an email address"));
        }
        errors.extend(password_errors("password", &self.password));
        errors
    }
}

/// An operator as the admin api shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OperatorView {
    pub id: OperatorId,
    /// `krn:keel::::operator/{id}`.
    pub resource_name: String,
    pub email: String,
    pub role: PlatformRole,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub disabled: bool,
}

#[derive(sqlx::FromRow)]
struct OperatorRow {
    id: OperatorId,
    email: String,
    role: String,
    created_at: OffsetDateTime,
    disabled: bool,
}

impl TryFrom<OperatorRow> for OperatorView {
    type Error = AuthError;

    fn try_from(row: OperatorRow) -> Result<Self, Self::Error> {
        Ok(OperatorView {
            id: row.id,
            resource_name: operator_name(row.id).to_string(),
            email: row.email,
            role: PlatformRole::parse(&row.role).ok_or(AuthError::CorruptRole)?,
            created_at: row.created_at,
            disabled: row.disabled,
        })
    }
}

const OPERATOR_COLUMNS: &str = "id, email, role, created_at, disabled_at IS NOT NULL AS disabled";

/// Creates an operator. `created_by` is `None` only for the command line.
pub async fn operator_create(
    mut tx: WriteTx,
    request: OperatorRequest,
    created_by: Option<OperatorId>,
) -> Result<OperatorView, AuthError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let hash = password::hash(request.password).await?;
    let id = OperatorId::new();
    let inserted: Result<OperatorRow, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO operators (id, email, password_hash, role, created_by) VALUES ($1, $2, $3, $4, $5)
         RETURNING {OPERATOR_COLUMNS}"
    )))
    .bind(id)
    .bind(request.email.trim())
    .bind(&hash)
    .bind(request.role.as_str())
    .bind(created_by)
    .fetch_one(tx.conn())
    .await;
    let operator = match inserted {
        Err(error) if keel_db::is_unique_violation(&error, "operators_email_key") => {
            return Err(AuthError::EmailTaken);
        }
        other => OperatorView::try_from(other?)?,
    };
    tx.commit(
        Audit::new("operator.create", None, operator_name(id))
            .with_details(serde_json::json!({ "email": operator.email, "role": request.role })),
    )
    .await?;
    Ok(operator)
}

/// `POST /v1/admin/auth/login`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperatorLoginRequest {
    pub email: String,
    pub password: String,
}

impl std::fmt::Debug for OperatorLoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorLoginRequest")
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

/// An operator's access token.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct OperatorTokenResponse {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    pub expires_in: u32,
    pub operator_id: OperatorId,
    pub role: PlatformRole,
}

impl std::fmt::Debug for OperatorTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorTokenResponse")
            .field("operator_id", &self.operator_id)
            .finish_non_exhaustive()
    }
}

/// Checks an operator's password and starts a session as long as one
/// access token (operators log in again rather than refresh).
pub async fn operator_login(
    db: &Db,
    keys: &TokenKeys,
    meta: RequestMeta,
    request: OperatorLoginRequest,
) -> Result<OperatorTokenResponse, AuthError> {
    let mut tx = db.begin_system(meta).await?;
    let found: Option<(OperatorId, String, String)> = sqlx::query_as(
        "SELECT id, password_hash, role FROM operators
         WHERE lower(email) = lower($1) AND disabled_at IS NULL",
    )
    .bind(request.email.trim())
    .fetch_optional(tx.conn())
    .await?;
    let (id, stored, role) = match found {
        Some((id, hash, role)) => (Some(id), Some(hash), Some(role)),
        None => (None, None, None),
    };
    let ok = password::verify(request.password, stored).await?;
    let (Some(operator_id), Some(role), true) =
        (id, role.as_deref().and_then(PlatformRole::parse), ok)
    else {
        return Err(AuthError::InvalidCredentials);
    };
    tx.set_actor(Actor::Operator { operator_id });
    let session_id = OperatorSessionId::new();
    let issued = keys.issue_operator(operator_id, session_id)?;
    sqlx::query("INSERT INTO operator_sessions (id, operator_id, expires_at) VALUES ($1, $2, $3)")
        .bind(session_id)
        .bind(operator_id)
        .bind(OffsetDateTime::now_utc() + time::Duration::seconds(i64::from(issued.expires_in)))
        .execute(tx.conn())
        .await?;
    tx.commit(Audit::new(
        "operator.login",
        None,
        ResourceName::new(None, None, None, "operator_session", session_id),
    ))
    .await?;
    Ok(OperatorTokenResponse {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
        operator_id,
        role,
    })
}

/// A tenant as operators see it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TenantSummary {
    pub id: TenantId,
    /// `krn:keel::{tenant}::tenant/{tenant}`.
    #[sqlx(skip)]
    pub resource_name: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub members: i64,
    pub projects: i64,
}

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<Limits>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(admin_login))
        .routes(routes!(admin_logout))
        .routes(routes!(admin_operator_list, admin_operator_create))
        .routes(routes!(admin_tenant_list))
        .routes(routes!(admin_audit_verify))
}

/// Operator login.
#[utoipa::path(
    post,
    path = "/v1/admin/auth/login",
    operation_id = "admin_login",
    tag = "admin",
    request_body = OperatorLoginRequest,
    responses(
        (status = 200, description = "Logged in", body = OperatorTokenResponse),
        (status = 401, description = "`invalid_credentials`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    )
)]
async fn admin_login(
    State(db): State<Db>,
    State(keys): State<Arc<TokenKeys>>,
    State(limits): State<Arc<Limits>>,
    client: Option<axum::Extension<ClientIp>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<OperatorLoginRequest>,
) -> Response {
    let ip = client.and_then(|axum::Extension(ClientIp(ip))| ip);
    if request.email.len() > crate::model::MAX_EMAIL_LEN {
        return ApiError::from(AuthError::InvalidCredentials).into_response();
    }
    // Operator accounts are throttled apart from user accounts.
    let account = format!("operator:{}", request.email);
    let delay = match limits.login_gate(ip, &account) {
        Ok(delay) => delay,
        Err(retry) => return retry.into_response(),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match operator_login(&db, &keys, anonymous_meta(&request_id, &trace), request).await {
        Ok(tokens) => {
            limits.login_succeeded(&account);
            Json(tokens).into_response()
        }
        Err(AuthError::InvalidCredentials) => {
            limits.login_failed(ip, &account);
            ApiError::from(AuthError::InvalidCredentials).into_response()
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// End the operator's session.
#[utoipa::path(
    post,
    path = "/v1/admin/auth/logout",
    operation_id = "admin_logout",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_logout(ctx: OperatorCtx) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminSessionEnd).await?;
    sqlx::query(
        "UPDATE operator_sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(ctx.principal.session_id)
    .execute(tx.conn())
    .await
    .map_err(AuthError::from)?;
    tx.commit(Audit::new(
        "operator.logout",
        None,
        ResourceName::new(
            None,
            None,
            None,
            "operator_session",
            ctx.principal.session_id,
        ),
    ))
    .await
    .map_err(AuthError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// List operators.
#[utoipa::path(
    get,
    path = "/v1/admin/operators",
    operation_id = "admin_operator_list",
    tag = "admin",
    params(PageParams),
    security(("operator" = [])),
    responses(
        (status = 200, description = "One page of operators", body = Paginated<OperatorView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_operator_list(
    ctx: OperatorCtx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<OperatorView>>, ApiError> {
    let page: Page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminOperatorList).await?;
    let rows: Vec<OperatorRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {OPERATOR_COLUMNS} FROM operators WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    )))
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(tx.conn())
    .await
    .map_err(AuthError::from)?;
    let rows = rows
        .into_iter()
        .map(OperatorView::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit(Audit::new(
        "admin.operator_list",
        None,
        platform_name("operators"),
    ))
    .await
    .map_err(AuthError::from)?;
    Ok(Json(Paginated::from_rows(rows, page, |operator| {
        operator.id.as_uuid()
    })))
}

/// Create an operator (operators only, not read-only operators).
#[utoipa::path(
    post,
    path = "/v1/admin/operators",
    operation_id = "admin_operator_create",
    tag = "admin",
    request_body = OperatorRequest,
    security(("operator" = [])),
    responses(
        (status = 201, description = "Created", body = OperatorView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 409, description = "`email_taken`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_operator_create(
    ctx: OperatorCtx,
    Json(request): Json<OperatorRequest>,
) -> Result<(StatusCode, Json<OperatorView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let handle = authorize_platform(tx.conn(), &ctx.principal, Action::AdminOperatorCreate).await?;
    let operator = operator_create(tx, request, Some(handle.operator_id)).await?;
    Ok((StatusCode::CREATED, Json(operator)))
}

/// List tenants, with their member and project counts.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants",
    operation_id = "admin_tenant_list",
    tag = "admin",
    params(PageParams),
    security(("operator" = [])),
    responses(
        (status = 200, description = "One page of tenants", body = Paginated<TenantSummary>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_tenant_list(
    ctx: OperatorCtx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<TenantSummary>>, ApiError> {
    let page: Page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminTenantList).await?;
    let mut rows: Vec<TenantSummary> = sqlx::query_as(
        "SELECT t.id, t.name, t.created_at,
                (SELECT count(*) FROM memberships m WHERE m.tenant_id = t.id) AS members,
                (SELECT count(*) FROM projects p WHERE p.tenant_id = t.id AND p.deleted_at IS NULL) AS projects
         FROM tenants t WHERE ($1::uuid IS NULL OR t.id > $1) ORDER BY t.id LIMIT $2",
    )
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(tx.conn())
    .await
    .map_err(AuthError::from)?;
    for tenant in &mut rows {
        tenant.resource_name = ResourceName::tenant(tenant.id).to_string();
    }
    tx.commit(Audit::new(
        "admin.tenant_list",
        None,
        platform_name("tenants"),
    ))
    .await
    .map_err(AuthError::from)?;
    Ok(Json(Paginated::from_rows(rows, page, |tenant| {
        tenant.id.as_uuid()
    })))
}

/// Verify every audit hash chain (every tenant's and the platform's).
#[utoipa::path(
    get,
    path = "/v1/admin/audit/verify",
    operation_id = "admin_audit_verify",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "One result per chain", body = Vec<ChainVerification>),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_audit_verify(ctx: OperatorCtx) -> Result<Json<Vec<ChainVerification>>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminAuditVerify).await?;
    let mut reports = Vec::new();
    for chain in audit_chain::chains(tx.conn())
        .await
        .map_err(AuthError::from)?
    {
        reports.push(
            audit_chain::verify(tx.conn(), chain)
                .await
                .map_err(AuthError::from)?,
        );
    }
    tx.commit(Audit::new(
        "admin.audit_verify",
        None,
        platform_name("audit"),
    ))
    .await
    .map_err(AuthError::from)?;
    Ok(Json(reports))
}
