//! The web console, served from the directory its build wrote (`ui/dist`,
//! `[console] dir`): a file that exists is served as it is; any other path
//! outside the API is a page of the single-page app and gets its
//! `index.html`, so a reload or a shared link opens the right page. API
//! paths never reach the console: an unknown one stays a JSON
//! `route_not_found`.

use std::path::Path;

use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

/// The console's pages (any path, falling back to `index.html`) and its
/// built assets (no fallback: a missing script is a 404, not a page).
#[derive(Clone, Debug)]
pub struct Console {
    pages: ServeDir<ServeFile>,
    assets: ServeDir,
}

/// The console's scripts come from its own origin only; it talks to the
/// API (and the terminal WebSocket) on that origin; styles may be inline
/// (the terminal emulator sets them); nothing may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

impl Console {
    pub fn new(dir: &Path) -> Self {
        Self {
            pages: ServeDir::new(dir).fallback(ServeFile::new(dir.join("index.html"))),
            assets: ServeDir::new(dir),
        }
    }

    /// Answers a request the API's routes did not match.
    pub async fn serve(self, request: Request) -> Response {
        let path = request.uri().path();
        if path == "/v1" || path.starts_with("/v1/") {
            return keel_http::route_not_found().await.into_response();
        }
        // Built assets carry a content hash in their names: cache them for
        // good. Everything else (index.html) is revalidated each time.
        let immutable = path.starts_with("/assets/");
        let served = if immutable {
            self.assets.oneshot(request).await
        } else {
            self.pages.oneshot(request).await
        };
        let mut response = match served {
            Ok(response) => response.into_response(),
            Err(never) => match never {},
        };
        let cache = if immutable && response.status().is_success() {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        response
    }
}
