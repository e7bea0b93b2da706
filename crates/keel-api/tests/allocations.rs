//! Allocations over HTTP: create with placement, list, get, terminate,
//! bad input, and isolation between tenants.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::TestApp;
use serde_json::json;

fn allocations(project: &str) -> String {
    format!("/v1/projects/{project}/allocations")
}

#[tokio::test]
async fn flavors_are_listed_for_a_signed_in_user() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    let flavors = app.get("/v1/flavors", Some(&tenant.token)).await;
    assert_eq!(flavors.status, StatusCode::OK);
    let names: Vec<&str> = flavors.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"cpu.small"), "{names:?}");
    assert_eq!(
        flavors.body["items"][0]["resource_name"],
        format!("krn:keel::::flavor/{}", names[0])
    );
    app.get("/v1/flavors", None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn an_allocation_is_placed_on_a_host_with_room_and_reserves_it() {
    let app = TestApp::spawn().await;
    let host = app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web-1", "flavor": "cpu.medium"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{:?}", created.body);
    assert_eq!(created.body["state"], "scheduled");
    assert_eq!(created.body["command"], json!(["sleep", "infinity"]));
    assert!(
        created.body.get("host_id").is_none(),
        "tenants never see hosts"
    );

    let mut admin = app.database.admin().await;
    let (reserved_vcpus, reserved_memory): (i32, i64) =
        sqlx::query_as("SELECT reserved_vcpus, reserved_memory_mib FROM hosts WHERE id = $1")
            .bind(host)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!((reserved_vcpus, reserved_memory), (2, 4096));

    let id = created.body["id"].as_str().unwrap();
    let fetched = app
        .get(
            &format!("{}/{id}", allocations(&tenant.project_id)),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body["name"], "web-1");
    let listed = app
        .get(&allocations(&tenant.project_id), Some(&tenant.token))
        .await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);

    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'allocation.create'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type IN ('allocation.requested', 'allocation.scheduled')").await,
        2
    );
}

#[tokio::test]
async fn without_room_the_allocation_fails_with_insufficient_capacity() {
    let app = TestApp::spawn().await;
    app.add_host(1, 1024).await;
    let tenant = app.tenant("acme").await;
    let first = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "a", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(first.body["state"], "scheduled");
    let second = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "b", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.body["state"], "failed");
    assert_eq!(second.body["failure_reason"], "insufficient_capacity");
    // No host here could ever run it: refused outright, nothing recorded.
    let gpu = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "g", "flavor": "gpu.a100.1"}),
        )
        .await;
    gpu.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "flavor_unavailable");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, 2);
}

#[tokio::test]
async fn terminating_an_allocation_moves_it_to_terminating_and_then_on_a_second_call_changes_nothing()
 {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "a", "flavor": "cpu.small"}),
        )
        .await;
    let terminate = format!(
        "{}/{}/terminate",
        allocations(&tenant.project_id),
        created.body["id"].as_str().unwrap()
    );
    let first = app.post(&terminate, Some(&tenant.token), json!({})).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    assert_eq!(first.body["state"], "terminating");
    let again = app.post(&terminate, Some(&tenant.token), json!({})).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body["version"], first.body["version"]);
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'allocation.terminating'")
            .await,
        1
    );
}

#[tokio::test]
async fn terminating_with_a_stale_if_match_is_a_412_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "a", "flavor": "cpu.small"}),
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let etag = created.headers[header::ETAG].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", created.body["version"]));
    let uri = format!("{}/{id}", allocations(&tenant.project_id));
    assert_eq!(
        app.get(&uri, Some(&tenant.token)).await.headers[header::ETAG],
        etag.as_str()
    );
    let terminate = |if_match: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(format!("{uri}/terminate"))
            .header(header::AUTHORIZATION, format!("Bearer {}", tenant.token))
            .header(header::IF_MATCH, if_match)
            .body(Body::empty())
            .unwrap()
    };

    app.send(terminate("\"1\""))
        .await
        .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let unchanged = app.get(&uri, Some(&tenant.token)).await;
    assert_eq!(unchanged.body["state"], "scheduled");
    assert_eq!(unchanged.headers[header::ETAG], etag.as_str());

    let terminated = app.send(terminate(&etag)).await;
    assert_eq!(
        terminated.status,
        StatusCode::ACCEPTED,
        "{:?}",
        terminated.body
    );
    assert_eq!(terminated.body["state"], "terminating");
    assert_eq!(
        terminated.headers[header::ETAG],
        format!("\"{}\"", terminated.body["version"]).as_str()
    );
    assert_ne!(terminated.headers[header::ETAG], etag.as_str());
}

#[tokio::test]
async fn a_failed_allocation_terminates_at_once_and_then_terminating_it_is_a_409() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant("acme").await;
    // A host that is full: the launch fails for want of capacity.
    let host = app.add_host(1, 1024).await;
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE hosts SET reserved_vcpus = 1 WHERE id = $1")
        .bind(host)
        .execute(&mut admin)
        .await
        .unwrap();
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "a", "flavor": "cpu.small"}),
        )
        .await;
    assert_eq!(created.body["state"], "failed");
    let id = created.body["id"].as_str().unwrap();
    let terminate = format!("{}/{id}/terminate", allocations(&tenant.project_id));
    let terminated = app.post(&terminate, Some(&tenant.token), json!({})).await;
    assert_eq!(terminated.body["state"], "terminated");
    app.post(&terminate, Some(&tenant.token), json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state_transition");
    // Gone from the list, still readable by id.
    let listed = app
        .get(&allocations(&tenant.project_id), Some(&tenant.token))
        .await;
    assert!(listed.body["items"].as_array().unwrap().is_empty());
    let fetched = app
        .get(
            &format!("{}/{id}", allocations(&tenant.project_id)),
            Some(&tenant.token),
        )
        .await;
    assert_eq!(fetched.body["state"], "terminated");
}

#[tokio::test]
async fn bad_input_gets_a_specific_code_and_creates_nothing() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let url = allocations(&tenant.project_id);
    let token = Some(tenant.token.as_str());
    app.post(&url, token, json!({"name": "a", "flavor": "no.such"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_flavor");
    app.post(
        &url,
        token,
        json!({"name": "Bad Name", "flavor": "cpu.small"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.post(&url, token, json!({"flavor": "cpu.small"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    app.post(
        &url,
        token,
        json!({"name": "a", "flavor": "cpu.small", "extra": 1}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    app.post(
        "/v1/projects/not-a-uuid/allocations",
        token,
        json!({"name": "a", "flavor": "cpu.small"}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_path");
    app.get(&format!("{url}/{}", uuid::Uuid::now_v7()), token)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action LIKE 'allocation.%'")
            .await,
        0
    );
}

#[tokio::test]
async fn another_tenant_gets_404_for_every_allocation_endpoint() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let acme = app.tenant("acme").await;
    let globex = app.tenant("globex").await;
    let created = app
        .post(
            &allocations(&acme.project_id),
            Some(&acme.token),
            json!({"name": "a", "flavor": "cpu.small"}),
        )
        .await;
    let id = created.body["id"].as_str().unwrap();
    let intruder = Some(globex.token.as_str());
    let url = allocations(&acme.project_id);
    app.get(&url, intruder)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("{url}/{id}"), intruder)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.post(&format!("{url}/{id}/terminate"), intruder, json!({}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.post(&url, intruder, json!({"name": "b", "flavor": "cpu.small"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    // Their own project does not reach the other's allocation either.
    app.get(
        &format!("{}/{id}", allocations(&globex.project_id)),
        intruder,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.count("SELECT count(*) FROM allocations").await, 1);
}

#[tokio::test]
async fn concurrent_creates_never_over_commit_a_host() {
    let app = TestApp::spawn().await;
    let host = app.add_host(4, 65536).await;
    let tenant = app.tenant("acme").await;
    let url = allocations(&tenant.project_id);
    let mut handles = Vec::new();
    for index in 0..10 {
        let state = app.state.clone();
        let token = tenant.token.clone();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let request = axum::http::Request::builder()
                .method("POST")
                .uri(url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    json!({"name": format!("a{index}"), "flavor": "cpu.small"}).to_string(),
                ))
                .unwrap();
            tower::ServiceExt::oneshot(keel_api::app(state), request)
                .await
                .unwrap()
                .status()
        }));
    }
    for handle in handles {
        assert_eq!(handle.await.unwrap(), StatusCode::ACCEPTED);
    }
    let mut admin = app.database.admin().await;
    let reserved: i32 = sqlx::query_scalar("SELECT reserved_vcpus FROM hosts WHERE id = $1")
        .bind(host)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(reserved, 4);
    assert_eq!(
        app.count("SELECT count(*) FROM allocations WHERE state = 'scheduled'")
            .await,
        4
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM allocations WHERE failure_reason = 'insufficient_capacity'"
        )
        .await,
        6
    );
}

#[tokio::test]
async fn stop_and_start_follow_the_lifecycle_and_illegal_ones_are_409s() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web", "flavor": "cpu.small"}),
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let path = |verb: &str| format!("{}/{id}/{verb}", allocations(&tenant.project_id));

    // Not running yet: neither stops nor starts, and nothing changes.
    app.post(&path("stop"), Some(&tenant.token), json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state_transition");
    app.post(&path("start"), Some(&tenant.token), json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state_transition");

    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE allocations SET state = 'running' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut admin)
        .await
        .unwrap();
    let stopping = app
        .post(&path("stop"), Some(&tenant.token), json!({}))
        .await;
    assert_eq!(stopping.status, StatusCode::ACCEPTED, "{:?}", stopping.body);
    assert_eq!(stopping.body["state"], "stopping");
    // Asking again changes nothing; the worker is told once.
    let again = app
        .post(&path("stop"), Some(&tenant.token), json!({}))
        .await;
    assert_eq!(again.body["version"], stopping.body["version"]);
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'allocation.stopping'")
            .await,
        1
    );

    // Stopped (as the agent's report makes it): it keeps its capacity.
    sqlx::query("UPDATE allocations SET state = 'stopped' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut admin)
        .await
        .unwrap();
    let reserved: i32 = sqlx::query_scalar("SELECT reserved_vcpus FROM hosts")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(reserved, 1);
    let starting = app
        .post(&path("start"), Some(&tenant.token), json!({}))
        .await;
    assert_eq!(starting.status, StatusCode::ACCEPTED, "{:?}", starting.body);
    assert_eq!(starting.body["state"], "starting");
    let event: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE event_type = 'allocation.starting'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    // Events carry what metering needs without reading any table.
    assert_eq!(event["project_id"], tenant.project_id.as_str());
    assert_eq!(event["flavor"], "cpu.small");
    assert_eq!(event["region"], "local-1");
    assert_eq!(event["previous_state"], "stopped");
    assert!(event["at"].is_string(), "{event}");

    // A viewer may look but not stop.
    let viewer = app.member(&tenant, "viewer").await;
    app.post(&path("stop"), Some(&viewer.token), json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    // Terminated: gone from the list, readable by id, nothing more to do.
    let terminated = app
        .post(&path("terminate"), Some(&tenant.token), json!({}))
        .await;
    assert_eq!(terminated.body["state"], "terminating");
    sqlx::query(
        "UPDATE allocations SET state = 'terminated', reserved = false, terminated_at = now() - interval '8 days'
          WHERE id = $1::uuid",
    )
    .bind(&id)
    .execute(&mut admin)
    .await
    .unwrap();
    app.post(&path("start"), Some(&tenant.token), json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state_transition");
    let read = app
        .get(path("").trim_end_matches('/'), Some(&tenant.token))
        .await;
    assert_eq!(read.body["state"], "terminated");
    // After the retention window it is purged: 404 by id too.
    let purged = keel_provisioning::service::purge_terminated(
        &app.state.db,
        keel_db::RequestMeta::system("test", "t"),
    )
    .await
    .unwrap();
    assert_eq!(purged, 1);
    app.get(path("").trim_end_matches('/'), Some(&tenant.token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn a_terminal_needs_a_running_allocation_a_websocket_and_the_right_to_open_it() {
    let app = TestApp::spawn().await;
    app.add_host(4, 8192).await;
    let tenant = app.tenant("acme").await;
    let created = app
        .post(
            &allocations(&tenant.project_id),
            Some(&tenant.token),
            json!({"name": "web", "flavor": "cpu.small"}),
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let terminal = format!("{}/{id}/terminal", allocations(&tenant.project_id));
    let audited = "SELECT count(*) FROM audit_log WHERE action LIKE 'allocation.terminal%'";

    // Not running yet: a 409 that says so.
    app.get(&terminal, Some(&tenant.token))
        .await
        .assert_error(StatusCode::CONFLICT, "allocation_not_running");
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE allocations SET state = 'running' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut admin)
        .await
        .unwrap();
    // Running, but a plain GET is no WebSocket.
    app.get(&terminal, Some(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "websocket_required");
    // No token, another tenant, a viewer: refused before anything else.
    app.get(&terminal, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    let other = app.tenant("globex").await;
    app.get(&terminal, Some(&other.token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let viewer = app.member(&tenant, "viewer").await;
    app.get(&terminal, Some(&viewer.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // A browser's handshake carries its token as a subprotocol: the same
    // checks apply (this test's transport cannot upgrade, hence 400 for the
    // one that passes them).
    let browser = |token: &str| {
        Request::get(&terminal)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header(
                "sec-websocket-protocol",
                format!("keel.terminal.v1, keel.bearer.{token}"),
            )
            .body(Body::empty())
            .unwrap()
    };
    app.send(browser(&tenant.token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "websocket_required");
    app.send(browser(&other.token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.send(browser(&viewer.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.send(browser("not-a-token"))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    // The subprotocol is a credential only in a WebSocket handshake.
    let plain = Request::get(&terminal)
        .header(
            "sec-websocket-protocol",
            format!("keel.bearer.{}", tenant.token),
        )
        .body(Body::empty())
        .unwrap();
    app.send(plain)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    // None of that opened (or audited) a session.
    assert_eq!(app.count(audited).await, 0);
}
