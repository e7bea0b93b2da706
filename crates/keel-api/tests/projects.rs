//! Projects: create, read, rename with optimistic concurrency, delete.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{TestApp, TestResponse};
use serde_json::json;

async fn patch(
    app: &TestApp,
    uri: &str,
    token: &str,
    if_match: Option<&str>,
    name: &str,
) -> TestResponse {
    let mut request = Request::builder()
        .method("PATCH")
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(etag) = if_match {
        request = request.header(header::IF_MATCH, etag);
    }
    app.send(
        request
            .body(Body::from(json!({"name": name}).to_string()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_project_is_created_read_renamed_and_deleted_with_etags() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            "/v1/projects",
            Some(&tenant.token),
            json!({"name": "research"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.headers[header::ETAG], "\"1\"");
    let uri = format!("/v1/projects/{}", created.body["id"].as_str().unwrap());

    let read = app.get(&uri, Some(&tenant.token)).await;
    assert_eq!(read.body["name"], "research");
    let renamed = patch(&app, &uri, &tenant.token, Some("\"1\""), "science").await;
    assert_eq!(renamed.status, StatusCode::OK, "{:?}", renamed.body);
    assert_eq!(renamed.headers[header::ETAG], "\"2\"");
    assert_eq!(renamed.body["name"], "science");

    let deleted = app
        .request(axum::http::Method::DELETE, &uri, Some(&tenant.token), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    app.get(&uri, Some(&tenant.token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    for action in ["project.create", "project.update", "project.delete"] {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(&mut app.database.admin().await)
            .await
            .unwrap();
        assert!(count >= 1, "{action}");
    }
}

#[tokio::test]
async fn a_stale_if_match_is_a_412_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let uri = format!("/v1/projects/{}", tenant.project_id);
    assert_eq!(
        patch(&app, &uri, &tenant.token, Some("\"1\""), "first")
            .await
            .status,
        StatusCode::OK
    );
    patch(&app, &uri, &tenant.token, Some("\"1\""), "second")
        .await
        .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert_eq!(
        app.get(&uri, Some(&tenant.token)).await.body["name"],
        "first"
    );
    patch(&app, &uri, &tenant.token, Some("not-an-etag"), "third")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_header");
}

#[tokio::test]
async fn concurrent_updates_from_the_same_version_lose_nothing() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let uri = format!("/v1/projects/{}", tenant.project_id);
    let mut handles = Vec::new();
    for index in 0..6 {
        let state = app.state.clone();
        let (uri, token) = (uri.clone(), tenant.token.clone());
        handles.push(tokio::spawn(async move {
            let request = Request::builder()
                .method("PATCH")
                .uri(uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::IF_MATCH, "\"1\"")
                .body(Body::from(
                    json!({"name": format!("name-{index}")}).to_string(),
                ))
                .unwrap();
            tower::ServiceExt::oneshot(keel_api::app(state), request)
                .await
                .unwrap()
                .status()
        }));
    }
    let mut statuses = Vec::new();
    for handle in handles {
        statuses.push(handle.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count(),
        5
    );
    assert_eq!(
        app.get(&uri, Some(&tenant.token)).await.headers[header::ETAG],
        "\"2\""
    );
}

#[tokio::test]
async fn names_are_unique_per_tenant_and_validated() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    app.post(
        "/v1/projects",
        Some(&tenant.token),
        json!({"name": "DEFAULT"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "project_name_taken");
    app.post("/v1/projects", Some(&tenant.token), json!({"name": "  "}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.post(
        "/v1/projects",
        Some(&tenant.token),
        json!({"name": "a\u{0007}b"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // Another tenant may use the same name.
    let other = app.tenant("globex").await;
    let created = app
        .post(
            "/v1/projects",
            Some(&other.token),
            json!({"name": "research"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let again = app
        .post(
            "/v1/projects",
            Some(&tenant.token),
            json!({"name": "research"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_project_with_live_allocations_cannot_be_deleted() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    app.post(
        &format!("/v1/projects/{}/allocations", tenant.project_id),
        Some(&tenant.token),
        json!({"name": "busy", "flavor": "cpu.small"}),
    )
    .await;
    let uri = format!("/v1/projects/{}", tenant.project_id);
    app.request(axum::http::Method::DELETE, &uri, Some(&tenant.token), None)
        .await
        .assert_error(StatusCode::CONFLICT, "project_not_empty");
}

#[tokio::test]
async fn members_may_not_create_or_rename_projects_and_viewers_may_not_either() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    for role in ["member", "viewer"] {
        let outsider = app.tenant(&format!("{role}-home")).await;
        let mut admin = app.database.admin().await;
        sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) SELECT $1::uuid, user_id, $2 FROM memberships WHERE tenant_id = $3::uuid")
            .bind(&owner.tenant_id)
            .bind(role)
            .bind(&outsider.tenant_id)
            .execute(&mut admin)
            .await
            .unwrap();
        let login = app
            .post(
                "/v1/auth/login",
                None,
                json!({"email": outsider.email, "password": "a long enough password", "tenant_id": owner.tenant_id}),
            )
            .await;
        let token = login.body["access_token"].as_str().unwrap().to_owned();
        app.post("/v1/projects", Some(&token), json!({"name": "nope"}))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        let uri = format!("/v1/projects/{}", owner.project_id);
        assert_eq!(
            app.get(&uri, Some(&token)).await.status,
            StatusCode::OK,
            "{role} may read"
        );
        patch(&app, &uri, &token, None, "renamed")
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
}

#[tokio::test]
async fn names_that_hide_characters_are_refused_and_create_nothing() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    for name in ["report\u{202E}fdp.exe", "a\u{200B}b", "tab\tbed"] {
        app.post("/v1/projects", Some(&tenant.token), json!({"name": name}))
            .await
            .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM projects").await,
        1,
        "only the default project"
    );
}
