//! The console the api serves at `/`: its files, `index.html` for any page
//! of the single-page app, its security headers, and API paths that stay
//! JSON.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode, header};
use common::TestApp;

struct ConsoleDir(std::path::PathBuf);

impl Drop for ConsoleDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An app serving a small built console.
async fn app_with_console() -> (TestApp, ConsoleDir) {
    let dir = std::env::temp_dir().join(format!("keel-console-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), "<!doctype html><title>Keel</title>").unwrap();
    std::fs::write(dir.join("assets/app-1a2b3c.js"), "console.log(1)").unwrap();
    let mut app = TestApp::spawn().await;
    app.state.console = Some(keel_api::console::Console::new(&dir));
    (app, ConsoleDir(dir))
}

#[tokio::test]
async fn the_console_is_served_at_the_root_and_for_every_page() {
    let (app, _dir) = app_with_console().await;
    for page in ["/", "/login", "/projects/0190/allocations/0191"] {
        let response = app.request(Method::GET, page, None, None).await;
        assert_eq!(response.status, StatusCode::OK, "{page}");
        assert_eq!(
            response.body.as_str(),
            Some("<!doctype html><title>Keel</title>"),
            "{page}"
        );
        let headers = &response.headers;
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
    }
    let script = app
        .request(Method::GET, "/assets/app-1a2b3c.js", None, None)
        .await;
    assert_eq!(script.status, StatusCode::OK);
    assert!(
        script.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(
        script.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
}

#[tokio::test]
async fn a_missing_asset_is_not_found_and_api_paths_stay_json() {
    let (app, _dir) = app_with_console().await;
    let missing = app
        .request(Method::GET, "/assets/gone-000000.js", None, None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.headers[header::CACHE_CONTROL], "no-cache");

    for path in ["/v1/no-such-thing", "/v1"] {
        let response = app.request(Method::GET, path, None, None).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(response.body["code"], "route_not_found", "{path}");
    }
    let health = app.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
}

#[tokio::test]
async fn without_a_console_every_unknown_path_is_a_json_not_found() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/", None, None).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert_eq!(response.body["code"], "route_not_found");
}
