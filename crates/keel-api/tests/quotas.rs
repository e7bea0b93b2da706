//! Quotas: tenants read their limits and usage; operators set tenant,
//! project and default limits; a launch over any limit is refused and
//! changes nothing — also when many launches race for the last slot.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode, header};
use common::TestApp;
use keel_auth::authz::PlatformRole;
use serde_json::json;

/// A request with an `If-Match` header.
async fn with_if_match(
    app: &TestApp,
    method: Method,
    uri: &str,
    token: &str,
    if_match: &str,
    body: Option<serde_json::Value>,
) -> common::TestResponse {
    let builder = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::IF_MATCH, if_match);
    let request = match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body.to_string())),
        None => builder.body(axum::body::Body::empty()),
    };
    app.send(request.unwrap()).await
}

/// Sends a change with a stale `If-Match` and checks it is refused with
/// `412` and writes no audit row and no event.
async fn assert_stale(
    app: &TestApp,
    method: Method,
    uri: &str,
    token: &str,
    if_match: &str,
    body: Option<serde_json::Value>,
) {
    let changes = || async {
        (
            app.count("SELECT count(*) FROM audit_log WHERE action LIKE 'quota.%'")
                .await,
            app.count("SELECT count(*) FROM outbox WHERE event_type LIKE 'quota.%'")
                .await,
        )
    };
    let before = changes().await;
    with_if_match(app, method, uri, token, if_match, body)
        .await
        .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert_eq!(changes().await, before, "a refused change wrote nothing");
}

fn allocations(project: &str) -> String {
    format!("/v1/projects/{project}/allocations")
}

#[tokio::test]
async fn a_tenant_reads_its_quota_and_a_launch_over_it_changes_nothing() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let tenant = app.tenant("acme").await;
    app.add_host(16, 65536).await;

    let quota = app.get("/v1/quota", Some(&tenant.token)).await;
    assert_eq!(quota.status, StatusCode::OK, "{:?}", quota.body);
    assert_eq!(quota.body["source"], "default");
    assert_eq!(quota.body["limits"]["allocations"], 50);
    assert_eq!(quota.body["usage"]["allocations"], 0);

    // Three vCPUs for this tenant: one cpu.medium (2) and one cpu.small (1).
    let set = app
        .request(
            Method::PUT,
            &format!("/v1/admin/tenants/{}/quota", tenant.tenant_id),
            Some(&operator),
            Some(json!({"allocations": 10, "vcpus": 3, "memory_mib": 65536, "gpus": 0})),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    for (name, flavor) in [("web-1", "cpu.medium"), ("web-2", "cpu.small")] {
        let created = app
            .post(
                &allocations(&tenant.project_id),
                Some(&tenant.token),
                json!({"name": name, "flavor": flavor}),
            )
            .await;
        assert_eq!(created.body["state"], "scheduled", "{:?}", created.body);
    }
    let before = app.count("SELECT count(*) FROM allocations").await;
    let events = app.count("SELECT count(*) FROM outbox").await;
    let refused = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-3", "flavor": "cpu.small"}),
        )
        .await;
    refused.assert_error(StatusCode::CONFLICT, "quota_exceeded");
    assert_eq!(
        refused.body["message"],
        "the tenant quota for vcpus is 3: 3 in use, 1 more requested"
    );
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, before);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, events);

    let quota = app.get("/v1/quota", Some(&tenant.token)).await;
    assert_eq!(quota.body["source"], "tenant");
    assert_eq!(
        quota.body["usage"],
        json!({"allocations": 2, "vcpus": 3, "memory_mib": 5120, "gpus": 0})
    );

    // A project limit narrows it further; removing it lifts that again.
    let project_quota = format!(
        "/v1/admin/tenants/{}/projects/{}/quota",
        tenant.tenant_id, tenant.project_id
    );
    let set = app
        .request(
            Method::PUT,
            &project_quota,
            Some(&operator),
            Some(json!({"allocations": 2, "vcpus": 100, "memory_mib": 65536, "gpus": 0})),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let read = app
        .get(
            &format!("/v1/projects/{}/quota", tenant.project_id),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(read.body["limits"]["allocations"], 2);
    assert_eq!(read.body["usage"]["allocations"], 2);
    app.request(
        Method::PUT,
        &format!("/v1/admin/tenants/{}/quota", tenant.tenant_id),
        Some(&operator),
        Some(json!({"allocations": 10, "vcpus": 10, "memory_mib": 65536, "gpus": 0})),
    )
    .await;
    let refused = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-3", "flavor": "cpu.small"}),
        )
        .await;
    refused.assert_error(StatusCode::CONFLICT, "quota_exceeded");
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .starts_with("the project quota for allocations is 2"),
        "{:?}",
        refused.body
    );
    let removed = app
        .request(Method::DELETE, &project_quota, Some(&operator), None)
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-3", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(created.body["state"], "scheduled", "{:?}", created.body);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'quota.update'")
            .await,
        3
    );
}

#[tokio::test]
async fn operators_alone_set_quotas_and_nonsense_is_refused() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;
    let tenant = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    let path = format!("/v1/admin/tenants/{}/quota", tenant.tenant_id);
    let limits = json!({"allocations": 1, "vcpus": 1, "memory_mib": 1024, "gpus": 0});

    app.request(Method::PUT, &path, Some(&reader), Some(limits.clone()))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.request(
        Method::PUT,
        &path,
        Some(&operator),
        Some(json!({"allocations": -1, "vcpus": 1, "memory_mib": 1024, "gpus": 0})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.request(
        Method::PUT,
        &path,
        Some(&operator),
        Some(json!({"allocations": 1, "vcpus": 1, "memory_mib": 1024})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    app.request(
        Method::PUT,
        &format!("/v1/admin/tenants/{}/quota", uuid::Uuid::new_v4()),
        Some(&operator),
        Some(limits.clone()),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    // A project of another tenant is not this tenant's.
    app.request(
        Method::PUT,
        &format!(
            "/v1/admin/tenants/{}/projects/{}/quota",
            tenant.tenant_id, other.project_id
        ),
        Some(&operator),
        Some(limits.clone()),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.count("SELECT count(*) FROM quotas").await, 0);

    // The defaults apply to every tenant without its own.
    let defaults = app
        .request(
            Method::PUT,
            "/v1/admin/quota-defaults",
            Some(&operator),
            Some(json!({"allocations": 5, "vcpus": 7, "memory_mib": 9, "gpus": 1})),
        )
        .await;
    assert_eq!(defaults.status, StatusCode::OK, "{:?}", defaults.body);
    let read = app.get("/v1/admin/quota-defaults", Some(&reader)).await;
    assert_eq!(read.body["vcpus"], 7);
    let quota = app.get("/v1/quota", Some(&other.token)).await;
    assert_eq!(quota.body["limits"]["vcpus"], 7);
    let admin_view = app
        .get(
            &format!("/v1/admin/tenants/{}/quota", other.tenant_id),
            Some(&reader),
        )
        .await;
    assert_eq!(admin_view.body["source"], "default");
}

#[tokio::test]
async fn a_quota_change_based_on_a_stale_etag_changes_nothing() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let tenant = app.tenant("acme").await;
    let limits = json!({"allocations": 4, "vcpus": 4, "memory_mib": 4096, "gpus": 0});
    // The defaults carry their version; a change based on another is
    // refused, one based on it goes through and moves it on.
    let defaults = app.get("/v1/admin/quota-defaults", Some(&operator)).await;
    assert_eq!(defaults.headers[header::ETAG], "\"1\"");
    assert_stale(
        &app,
        Method::PUT,
        "/v1/admin/quota-defaults",
        &operator,
        "\"7\"",
        Some(limits.clone()),
    )
    .await;
    assert_eq!(
        app.get("/v1/admin/quota-defaults", Some(&operator))
            .await
            .body["vcpus"],
        128
    );
    let changed = with_if_match(
        &app,
        Method::PUT,
        "/v1/admin/quota-defaults",
        &operator,
        "\"1\"",
        Some(limits.clone()),
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    assert_eq!(changed.headers[header::ETAG], "\"2\"");

    // A tenant on the defaults has no limits of its own, so no version to
    // match: an If-Match is refused, a plain PUT creates them.
    let path = format!("/v1/admin/tenants/{}/quota", tenant.tenant_id);
    let read = app.get(&path, Some(&operator)).await;
    assert_eq!(read.body["source"], "default");
    assert!(read.headers.get(header::ETAG).is_none());
    assert_stale(
        &app,
        Method::PUT,
        &path,
        &operator,
        "\"1\"",
        Some(limits.clone()),
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM quotas").await, 0);
    let set = app
        .request(Method::PUT, &path, Some(&operator), Some(limits.clone()))
        .await;
    assert_eq!(set.headers[header::ETAG], "\"1\"");
    let read = app.get(&path, Some(&operator)).await;
    assert_eq!(read.body["source"], "tenant");
    assert_eq!(read.headers[header::ETAG], "\"1\"");
    let again = with_if_match(
        &app,
        Method::PUT,
        &path,
        &operator,
        "\"1\"",
        Some(json!({"allocations": 5, "vcpus": 4, "memory_mib": 4096, "gpus": 0})),
    )
    .await;
    assert_eq!(again.headers[header::ETAG], "\"2\"");
    assert_stale(
        &app,
        Method::PUT,
        &path,
        &operator,
        "\"1\"",
        Some(limits.clone()),
    )
    .await;
    assert_eq!(
        app.get(&path, Some(&operator)).await.body["limits"]["allocations"],
        5
    );

    // A project's limits: removing them on a stale version keeps them.
    let project_path = format!(
        "/v1/admin/tenants/{}/projects/{}/quota",
        tenant.tenant_id, tenant.project_id
    );
    let set = app
        .request(
            Method::PUT,
            &project_path,
            Some(&operator),
            Some(limits.clone()),
        )
        .await;
    assert_eq!(set.headers[header::ETAG], "\"1\"");
    assert_stale(
        &app,
        Method::DELETE,
        &project_path,
        &operator,
        "\"2\"",
        None,
    )
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM quotas WHERE project_id IS NOT NULL")
            .await,
        1
    );
    let removed = with_if_match(
        &app,
        Method::DELETE,
        &project_path,
        &operator,
        "\"1\"",
        None,
    )
    .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.count("SELECT count(*) FROM quotas WHERE project_id IS NOT NULL")
            .await,
        0
    );

    // A malformed If-Match is a bad header, not a mismatch.
    with_if_match(&app, Method::PUT, &path, &operator, "seven", Some(limits))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_header");
}

#[tokio::test]
async fn concurrent_launches_never_exceed_the_quota() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let tenant = app.tenant("acme").await;
    app.add_host(64, 262_144).await;
    app.request(
        Method::PUT,
        &format!("/v1/admin/tenants/{}/quota", tenant.tenant_id),
        Some(&operator),
        Some(json!({"allocations": 5, "vcpus": 64, "memory_mib": 262_144, "gpus": 0})),
    )
    .await;
    let launches = (0..20).map(|n| {
        let app = &app;
        let tenant = &tenant;
        async move {
            app.post(
                &allocations(&tenant.project_id),
                Some(&tenant.token),
                json!({"name": format!("web-{n}"), "flavor": "cpu.small"}),
            )
            .await
        }
    });
    let responses = futures::future::join_all(launches).await;
    let placed = responses
        .iter()
        .filter(|response| response.status == StatusCode::ACCEPTED)
        .count();
    let refused = responses
        .iter()
        .filter(|response| {
            response.status == StatusCode::CONFLICT && response.body["code"] == "quota_exceeded"
        })
        .count();
    assert_eq!((placed, refused), (5, 15));
    assert_eq!(
        app.count("SELECT count(*) FROM allocations WHERE reserved")
            .await,
        5
    );
}
