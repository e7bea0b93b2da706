//! Inventory at production depth: operators manage regions, flavors and
//! the schedulability of hosts; tenants see regions and availability; the
//! scheduler honours GPU models, local disk, cordons and drains.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode, header};
use common::TestApp;
use keel_auth::authz::PlatformRole;
use keel_db::RequestMeta;
use serde_json::{Value, json};

fn allocations(project: &str) -> String {
    format!("/v1/projects/{project}/allocations")
}

/// `available` for a flavor in `local-1`.
async fn available(app: &TestApp, token: &str, flavor: &str) -> i64 {
    let response = app
        .get("/v1/availability?region=local-1", Some(token))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line["flavor"] == flavor)
        .map(|line| line["available"].as_i64().unwrap())
        .unwrap_or_else(|| panic!("no line for {flavor}: {:?}", response.body))
}

async fn host_state(app: &TestApp, host: uuid::Uuid) -> (String, Option<String>) {
    let mut admin = app.database.admin().await;
    sqlx::query_as("SELECT state, state_before_offline FROM hosts WHERE id = $1")
        .bind(host)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn operators_create_and_retire_flavors_and_bad_ones_change_nothing() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;
    let flavors_before = app.count("SELECT count(*) FROM flavors").await;

    let h100 = json!({"name": "gpu.h100.8", "vcpus": 96, "memory_mib": 1_048_576,
                      "gpu_model": "nvidia-h100", "gpu_count": 8, "disk_gib": 2000});
    for (bad, field) in [
        (
            json!({"name": "Bad Name", "vcpus": 1, "memory_mib": 1, "disk_gib": 0}),
            "name",
        ),
        (
            json!({"name": "x", "vcpus": 0, "memory_mib": 1, "disk_gib": 0}),
            "vcpus",
        ),
        (
            json!({"name": "x", "vcpus": 1, "memory_mib": 1, "disk_gib": -1}),
            "disk_gib",
        ),
        (
            json!({"name": "x", "vcpus": 1, "memory_mib": 1, "disk_gib": 0, "gpu_count": 2}),
            "gpu_model",
        ),
        (
            json!({"name": "x", "vcpus": 1, "memory_mib": 1, "disk_gib": 0, "gpu_model": "a"}),
            "gpu_model",
        ),
    ] {
        let response = app.post("/v1/admin/flavors", Some(&operator), bad).await;
        response.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(
            response.body["fields"][0]["field"], field,
            "{:?}",
            response.body
        );
    }
    app.post("/v1/admin/flavors", Some(&reader), h100.clone())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        app.count("SELECT count(*) FROM flavors").await,
        flavors_before
    );

    let created = app
        .post("/v1/admin/flavors", Some(&operator), h100.clone())
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(
        created.body["resource_name"],
        "krn:keel::::flavor/gpu.h100.8"
    );
    assert_eq!(created.headers[header::ETAG], "\"1\"");
    app.post("/v1/admin/flavors", Some(&operator), h100)
        .await
        .assert_error(StatusCode::CONFLICT, "flavor_exists");
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'flavor.created'")
            .await,
        1
    );

    // Retiring: a stale If-Match changes nothing; then it is gone from the
    // tenants' catalogue (but not from the operators'), and a second retire
    // returns it as it is.
    let tenant = app.tenant("acme").await;
    let retire = "/v1/admin/flavors/cpu.medium/retire";
    let stale = axum::http::Request::builder()
        .method(Method::POST)
        .uri(retire)
        .header(header::AUTHORIZATION, format!("Bearer {operator}"))
        .header(header::IF_MATCH, "\"7\"")
        .body(axum::body::Body::empty())
        .unwrap();
    app.send(stale)
        .await
        .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let retired = app.post(retire, Some(&operator), json!({})).await;
    assert_eq!(retired.status, StatusCode::OK, "{:?}", retired.body);
    assert!(retired.body["retired_at"].is_string());
    let again = app.post(retire, Some(&operator), json!({})).await;
    assert_eq!(again.body["retired_at"], retired.body["retired_at"]);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'flavor.retire'")
            .await,
        1
    );
    let names: Vec<Value> = app.get("/v1/flavors", Some(&tenant.token)).await.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|flavor| flavor["name"].clone())
        .collect();
    assert!(!names.contains(&json!("cpu.medium")), "{names:?}");
    assert!(names.contains(&json!("gpu.h100.8")), "{names:?}");
    let all = app.get("/v1/admin/flavors", Some(&reader)).await;
    assert_eq!(all.status, StatusCode::OK);
    assert!(
        all.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|flavor| flavor["name"] == "cpu.medium" && flavor["retired_at"].is_string())
    );
    app.add_host(8, 16384).await;
    app.post(
        &allocations(&tenant.project_id),
        Some(&tenant.token),
        json!({"name": "web", "flavor": "cpu.medium"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_flavor");
    app.post(
        "/v1/admin/flavors/no.such/retire",
        Some(&operator),
        json!({}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn regions_are_created_by_operators_and_listed_for_tenants() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            "/v1/admin/regions",
            Some(&operator),
            json!({"name": "eu-west-2"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    app.post(
        "/v1/admin/regions",
        Some(&operator),
        json!({"name": "eu-west-2"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "region_exists");
    app.post(
        "/v1/admin/regions",
        Some(&operator),
        json!({"name": "EU West"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let regions = app.get("/v1/regions", Some(&tenant.token)).await;
    assert_eq!(regions.status, StatusCode::OK);
    let names: Vec<&str> = regions.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|region| region["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eu-west-2", "local-1"]);

    // A region without hosts runs nothing: launching there is refused and
    // records nothing; an unknown one is refused as such.
    let before = app.count("SELECT count(*) FROM allocations").await;
    app.post(
        &allocations(&tenant.project_id),
        Some(&tenant.token),
        json!({"name": "web", "flavor": "cpu.small", "region": "eu-west-2"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "flavor_unavailable");
    app.post(
        &allocations(&tenant.project_id),
        Some(&tenant.token),
        json!({"name": "web", "flavor": "cpu.small", "region": "mars-1"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_region");
    app.get("/v1/availability?region=mars-1", Some(&tenant.token))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_region");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, before);
}

#[tokio::test]
async fn availability_counts_what_fits_and_the_scheduler_matches_gpu_models_and_disk() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let token = tenant.token.as_str();
    // No host yet: nothing is available, and a launch is refused outright.
    assert_eq!(available(&app, token, "cpu.small").await, 0);

    app.add_host(4, 8192).await;
    // cpu.small is 1 vCPU, 1 GiB, 10 GiB disk; cpu.medium 2, 4 GiB, 40 GiB.
    assert_eq!(available(&app, token, "cpu.small").await, 4);
    assert_eq!(available(&app, token, "cpu.medium").await, 2);
    assert_eq!(available(&app, token, "cpu.large").await, 0);
    assert_eq!(available(&app, token, "gpu.a100.1").await, 0);

    // A GPU flavor where no host has that GPU: refused, nothing recorded.
    let before = app.count("SELECT count(*) FROM allocations").await;
    app.post(
        &allocations(&tenant.project_id),
        Some(token),
        json!({"name": "trainer", "flavor": "gpu.a100.1"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "flavor_unavailable");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, before);

    // A host with another GPU model does not count either.
    let mut admin = app.database.admin().await;
    let gpu_host = app.add_host(32, 262_144).await;
    sqlx::query("UPDATE hosts SET gpu_model = 'nvidia-t4', gpu_count = 4 WHERE id = $1")
        .bind(gpu_host)
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(available(&app, token, "gpu.a100.1").await, 0);
    sqlx::query("UPDATE hosts SET gpu_model = 'nvidia-a100', gpu_count = 2 WHERE id = $1")
        .bind(gpu_host)
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(available(&app, token, "gpu.a100.1").await, 2);
    let placed = app
        .post(
            &allocations(&tenant.project_id),
            Some(token),
            json!({"name": "trainer", "flavor": "gpu.a100.1"}),
        )
        .await;
    assert_eq!(placed.status, StatusCode::ACCEPTED, "{:?}", placed.body);
    assert_eq!(placed.body["state"], "scheduled");
    let reserved: (i32, i64) =
        sqlx::query_as("SELECT reserved_gpus, reserved_disk_gib FROM hosts WHERE id = $1")
            .bind(gpu_host)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(reserved, (1, 500));
    assert_eq!(available(&app, token, "gpu.a100.1").await, 1);

    // Disk is capacity like the rest: a host without room on disk takes
    // nothing more.
    sqlx::query("UPDATE hosts SET disk_gib = reserved_disk_gib + 5")
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(available(&app, token, "cpu.small").await, 0);
    let full = app
        .post(
            &allocations(&tenant.project_id),
            Some(token),
            json!({"name": "web", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(full.status, StatusCode::ACCEPTED);
    assert_eq!(full.body["state"], "failed");
    assert_eq!(full.body["failure_reason"], "insufficient_capacity");
}

#[tokio::test]
async fn cordoned_and_draining_hosts_take_nothing_new_and_a_drain_finishes_when_empty() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let tenant = app.tenant("acme").await;
    let host = app.add_host(4, 8192).await;
    let path = |verb: &str| format!("/v1/admin/hosts/{host}/{verb}");

    let cordoned = app.post(&path("cordon"), Some(&operator), json!({})).await;
    assert_eq!(cordoned.status, StatusCode::OK, "{:?}", cordoned.body);
    assert_eq!(cordoned.body["state"], "cordoned");
    assert_eq!(available(&app, &tenant.token, "cpu.small").await, 0);
    let refused = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-1", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(refused.body["failure_reason"], "insufficient_capacity");
    // Asking again changes nothing (no second audit row).
    app.post(&path("cordon"), Some(&operator), json!({})).await;
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'host.cordon'")
            .await,
        1
    );

    let ready = app
        .post(&path("uncordon"), Some(&operator), json!({}))
        .await;
    assert_eq!(ready.body["state"], "ready");
    let placed = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-2", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(placed.body["state"], "scheduled", "{:?}", placed.body);

    // Draining with an allocation on it: it stays draining until nothing
    // holds capacity there, then it is cordoned and says so.
    let draining = app.post(&path("drain"), Some(&operator), json!({})).await;
    assert_eq!(draining.body["state"], "draining");
    let finish = || async {
        keel_inventory::hosts::finish_drains(&app.state.db, RequestMeta::system("test", "t"))
            .await
            .unwrap()
    };
    assert_eq!(finish().await, 0);
    let mut admin = app.database.admin().await;
    sqlx::query(
        "UPDATE allocations SET state = 'terminated', reserved = false WHERE state <> 'failed'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    assert_eq!(finish().await, 1);
    assert_eq!(host_state(&app, host).await.0, "cordoned");
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'host.drained'")
            .await,
        1
    );

    // On an offline host, an action decides the state it comes back in.
    sqlx::query("UPDATE hosts SET state = 'offline', state_before_offline = 'cordoned'")
        .execute(&mut admin)
        .await
        .unwrap();
    let offline = app
        .post(&path("uncordon"), Some(&operator), json!({}))
        .await;
    assert_eq!(offline.body["state"], "offline");
    assert_eq!(
        host_state(&app, host).await,
        ("offline".to_owned(), Some("ready".to_owned()))
    );

    // A stale version, a read-only operator, an unknown host: nothing.
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;
    app.post(&path("cordon"), Some(&reader), json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let stale = axum::http::Request::builder()
        .method(Method::POST)
        .uri(path("cordon"))
        .header(header::AUTHORIZATION, format!("Bearer {operator}"))
        .header(header::IF_MATCH, "\"1\"")
        .body(axum::body::Body::empty())
        .unwrap();
    app.send(stale)
        .await
        .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    app.post(
        &format!("/v1/admin/hosts/{}/cordon", uuid::Uuid::new_v4()),
        Some(&operator),
        json!({}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        host_state(&app, host).await,
        ("offline".to_owned(), Some("ready".to_owned()))
    );
}
