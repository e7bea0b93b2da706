//! The tenant's audit log, read-only: every change made in the tenant, who
//! made it, and the request it came from. Nothing here can change or delete
//! an entry; the table itself grants `keel_app` only INSERT and SELECT.
//! `GET /v1/audit/verify` checks the tenant's hash chain
//! ([`crate::audit_chain`]).

use std::sync::Arc;

use axum::extract::FromRef;
use keel_core::page::{Page, PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, FieldError, Json, Query};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::audit_chain::{self, ChainVerification};
use crate::authz::{Action, TenantHandle, authorize_tenant};
use crate::http::page_error;
use crate::{AuthError, Ctx, TokenKeys};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(audit_list_handler))
        .routes(routes!(audit_verify_handler))
}

/// Filters of `GET /v1/audit`; all optional, combined with AND.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// Exact actor label, e.g. `user:0190…` or `system:worker`.
    pub actor: Option<String>,
    /// Exact action, e.g. `allocation.create`.
    pub action: Option<String>,
    /// A resource name or a prefix of one (`krn:keel:…`).
    pub resource: Option<String>,
    /// Entries at or after this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    /// Entries before this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<OffsetDateTime>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// One audit entry.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEntryView {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub request_id: String,
    /// `success` or `failure`.
    pub outcome: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl AuditFilter {
    fn validate(&self) -> Result<Page, ApiError> {
        let mut errors = Vec::new();
        for (name, value) in [
            ("actor", &self.actor),
            ("action", &self.action),
            ("resource", &self.resource),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.len() > 300)
            {
                errors.push(FieldError {
                    field: name.to_owned(),
                    code: "invalid".to_owned(),
                    message: "must be 1–300 characters".to_owned(),
                });
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        PageParams {
            limit: self.limit,
            cursor: self.cursor.clone(),
        }
        .validate()
        .map_err(page_error)
    }
}

/// The tenant's entries that match the filter, oldest first.
pub async fn audit_list(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
    filter: &AuditFilter,
    page: Page,
) -> Result<Paginated<AuditEntryView>, AuthError> {
    // A resource prefix is matched literally: LIKE's wildcards are escaped.
    let resource_prefix = filter.resource.as_ref().map(|prefix| {
        format!(
            "{}%",
            prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let rows: Vec<AuditEntryView> = sqlx::query_as(
        "SELECT id, occurred_at, actor, action, resource, request_id, outcome, details FROM audit_log
         WHERE tenant_id = $1
           AND ($2::text IS NULL OR actor = $2)
           AND ($3::text IS NULL OR action = $3)
           AND ($4::text IS NULL OR resource LIKE $4)
           AND ($5::timestamptz IS NULL OR occurred_at >= $5)
           AND ($6::timestamptz IS NULL OR occurred_at < $6)
           AND ($7::uuid IS NULL OR id > $7)
         ORDER BY id LIMIT $8",
    )
    .bind(tenant.tenant_id)
    .bind(&filter.actor)
    .bind(&filter.action)
    .bind(resource_prefix)
    .bind(filter.since)
    .bind(filter.until)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    Ok(Paginated::from_rows(rows, page, |entry| entry.id))
}

/// Read the tenant's audit log (owners and admins).
#[utoipa::path(
    get,
    path = "/v1/audit",
    operation_id = "audit_list",
    tag = "audit",
    params(AuditFilter),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of entries, oldest first", body = Paginated<AuditEntryView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
async fn audit_list_handler(
    ctx: Ctx,
    Query(filter): Query<AuditFilter>,
) -> Result<Json<Paginated<AuditEntryView>>, ApiError> {
    let page = filter.validate()?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::AuditRead).await?;
    Ok(Json(audit_list(tx.conn(), &tenant, &filter, page).await?))
}

/// Verify the tenant's audit hash chain: every sealed entry is recomputed
/// and linked to the one before; the first broken link is reported (an
/// entry altered or removed in the database).
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    operation_id = "audit_verify",
    tag = "audit",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chain's state; `valid` is false if it is broken", body = ChainVerification),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
    )
)]
async fn audit_verify_handler(ctx: Ctx) -> Result<Json<ChainVerification>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::AuditRead).await?;
    Ok(Json(
        audit_chain::verify(tx.conn(), tenant.tenant_id.as_uuid())
            .await
            .map_err(AuthError::from)?,
    ))
}
