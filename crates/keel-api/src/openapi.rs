//! The OpenAPI document, produced from the handlers' `#[utoipa::path]`
//! annotations. It is committed as `openapi/openapi.json`; a test fails
//! when the committed file differs from what the code produces
//! (`make codegen` rewrites it).

use axum::Router;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel API",
        description = "Multi-tenant cloud provisioning control plane.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(keel_http::ErrorBody, keel_http::FieldError)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        // Operators' tokens (audience `keel-admin`), for `/v1/admin/…`.
        components.add_security_scheme(
            "operator",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every domain's routes, and the document describing them.
pub fn router_and_document() -> (Router<AppState>, Document) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(crate::health::router())
        .merge(keel_auth::http::router())
        .merge(keel_auth::members_http::router())
        .merge(keel_auth::credentials_http::router())
        .merge(keel_auth::audit::router())
        .merge(keel_auth::admin::router())
        .merge(keel_inventory::http::router())
        .merge(keel_inventory::admin_http::router())
        .merge(keel_provisioning::http::router())
        .merge(keel_provisioning::admin_http::router())
        .merge(keel_billing::http::router())
        .merge(keel_billing::admin_http::router())
        .merge(keel_payments::http::router())
        .split_for_parts()
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn document_json() -> String {
    let (_, document) = router_and_document();
    let mut json = document.to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}
