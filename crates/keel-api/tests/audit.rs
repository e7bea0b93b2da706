//! The tenant's audit log over HTTP: read-only, filtered, paginated, and
//! only the caller's own tenant.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::json;

#[tokio::test]
async fn owners_read_their_own_audit_log_with_filters_and_pages() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    for name in ["one", "two", "three"] {
        let created = app
            .post("/v1/projects", Some(&tenant.token), json!({"name": name}))
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
    }
    let all = app.get("/v1/audit", Some(&tenant.token)).await;
    assert_eq!(all.status, StatusCode::OK, "{:?}", all.body);
    let actions: Vec<&str> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "project.create",
            "tenant.register",
            "session.create",
            "project.create",
            "project.create",
            "project.create"
        ]
    );

    let filtered = app
        .get(
            "/v1/audit?action=project.create&limit=2",
            Some(&tenant.token),
        )
        .await;
    assert_eq!(filtered.body["items"].as_array().unwrap().len(), 2);
    let cursor = filtered.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(
            &format!("/v1/audit?action=project.create&limit=2&cursor={cursor}"),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 2);
    assert!(rest.body["next_cursor"].is_null());

    let by_resource = app
        .get(
            &format!("/v1/audit?resource=krn:keel::{}::tenant/", tenant.tenant_id),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(by_resource.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn another_tenant_sees_none_of_it() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("acme").await;
    let globex = app.tenant("globex").await;
    let theirs = app.get("/v1/audit", Some(&globex.token)).await;
    let text = theirs.body.to_string();
    assert!(!text.contains(&acme.tenant_id), "{text}");
    assert_eq!(
        theirs.body["items"].as_array().unwrap().len(),
        3,
        "only globex's own registration and login"
    );
}

#[tokio::test]
async fn bad_filters_are_refused() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    app.get("/v1/audit?since=yesterday", Some(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/audit?unknown=1", Some(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/audit?action=", Some(&tenant.token))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.get("/v1/audit", None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}
