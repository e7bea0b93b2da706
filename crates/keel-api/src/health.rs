//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, Json};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health_live))
        .routes(routes!(health_ready))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthView {
    /// `ok`
    status: &'static str,
}

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/healthz", operation_id = "health_live", tag = "health",
    responses((status = 200, description = "Alive", body = HealthView)))]
async fn health_live() -> Json<HealthView> {
    Json(HealthView { status: "ok" })
}

/// Readiness: the database answers and every migration is applied.
#[utoipa::path(get, path = "/readyz", operation_id = "health_ready", tag = "health",
    responses(
        (status = 200, description = "Ready", body = HealthView),
        (status = 503, description = "`unavailable`: database down or migrations missing", body = ErrorBody),
    ))]
async fn health_ready(State(db): State<Db>) -> Result<Json<HealthView>, ApiError> {
    match db.migrations_applied().await {
        Ok(true) => Ok(Json(HealthView { status: "ok" })),
        Ok(false) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "database migrations are not all applied",
        )),
        Err(error) => Err(ApiError::unavailable(error)),
    }
}
