//! Service accounts, their keys, personal API tokens, and what the access
//! tokens minted from them may (and may never) do.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode};
use common::{Tenant, TestApp};
use serde_json::{Value, json};

async fn exchange(app: &TestApp, secret: &str) -> String {
    let response = app
        .post("/v1/auth/token", None, json!({"secret": secret}))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body["access_token"].as_str().unwrap().to_owned()
}

async fn service_account(app: &TestApp, owner: &Tenant, role: &str) -> (String, String) {
    let created = app
        .post(
            &format!("/v1/projects/{}/service-accounts", owner.project_id),
            Some(&owner.token),
            json!({"name": format!("ci-{role}"), "role": role}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let key = app
        .post(
            &format!(
                "/v1/projects/{}/service-accounts/{id}/keys",
                owner.project_id
            ),
            Some(&owner.token),
            json!({"expires_in_days": 30}),
        )
        .await;
    assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
    (id, key.body["secret"].as_str().unwrap().to_owned())
}

fn allocation() -> Value {
    json!({"name": "job", "flavor": "cpu.small"})
}

#[tokio::test]
async fn a_service_account_works_in_its_project_and_nowhere_else() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let (_, secret) = service_account(&app, &owner, "member").await;
    assert!(secret.starts_with("ksa_"));
    let token = exchange(&app, &secret).await;
    let project = format!("/v1/projects/{}", owner.project_id);

    let created = app
        .post(
            &format!("{project}/allocations"),
            Some(&token),
            allocation(),
        )
        .await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{:?}", created.body);
    assert_eq!(
        app.get(&format!("{project}/allocations"), Some(&token))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'allocation.create' AND actor LIKE 'service_account:%'")
            .await,
        1
    );
    // Another project of the same tenant does not exist for it.
    let other = app
        .post("/v1/projects", Some(&owner.token), json!({"name": "other"}))
        .await;
    let other = other.body["id"].as_str().unwrap();
    app.get(&format!("/v1/projects/{other}/allocations"), Some(&token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    // Reading a project asks for the caller's standing in the same
    // statement: its own project reads, the other is not found.
    let own = app.get(&project, Some(&token)).await;
    assert_eq!(own.status, StatusCode::OK, "{:?}", own.body);
    assert_eq!(own.body["id"], owner.project_id.as_str());
    app.get(&format!("/v1/projects/{other}"), Some(&token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    // Never tenant administration, never self-service of a person.
    for (method, uri, body) in [
        (Method::GET, "/v1/projects".to_owned(), None),
        (
            Method::POST,
            "/v1/projects".to_owned(),
            Some(json!({"name": "x"})),
        ),
        (Method::GET, "/v1/members".to_owned(), None),
        (Method::GET, "/v1/audit".to_owned(), None),
        (
            Method::POST,
            "/v1/invitations".to_owned(),
            Some(json!({"email": "a@example.com", "role": "viewer"})),
        ),
        (Method::GET, format!("{project}/service-accounts"), None),
        (Method::GET, "/v1/auth/api-tokens".to_owned(), None),
        (Method::POST, "/v1/auth/logout".to_owned(), None),
    ] {
        let response = app.request(method.clone(), &uri, Some(&token), body).await;
        response.assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
}

#[tokio::test]
async fn a_viewer_service_account_only_reads() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (_, secret) = service_account(&app, &owner, "viewer").await;
    let token = exchange(&app, &secret).await;
    let uri = format!("/v1/projects/{}/allocations", owner.project_id);
    assert_eq!(app.get(&uri, Some(&token)).await.status, StatusCode::OK);
    app.post(&uri, Some(&token), allocation())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn keys_rotate_and_revoking_disabling_or_deleting_ends_access_at_once() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (id, first) = service_account(&app, &owner, "member").await;
    let base = format!("/v1/projects/{}/service-accounts/{id}", owner.project_id);
    let second = app
        .post(&format!("{base}/keys"), Some(&owner.token), json!({}))
        .await;
    let second_secret = second.body["secret"].as_str().unwrap().to_owned();
    let first_token = exchange(&app, &first).await;
    let second_token = exchange(&app, &second_secret).await;
    let uri = format!("/v1/projects/{}/allocations", owner.project_id);

    // The key list never shows secrets.
    let keys = app.get(&format!("{base}/keys"), Some(&owner.token)).await;
    assert_eq!(keys.body.as_array().unwrap().len(), 2);
    assert!(
        keys.body[0]["resource_name"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "krn:keel::{}:{}:service_account_key/",
                owner.tenant_id, owner.project_id
            ))
    );
    assert!(!keys.body.to_string().contains(&first[first.len() - 20..]));

    // Revoke the first key: its tokens stop, the second key's go on.
    let first_key_id = keys.body[0]["id"].as_str().unwrap();
    let revoked = app
        .request(
            Method::DELETE,
            &format!("{base}/keys/{first_key_id}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    app.get(&uri, Some(&first_token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.get(
        &format!("/v1/projects/{}", owner.project_id),
        Some(&first_token),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post("/v1/auth/token", None, json!({"secret": first}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_key");
    assert_eq!(
        app.get(&uri, Some(&second_token)).await.status,
        StatusCode::OK
    );

    // Disable: everything stops; enable: works again.
    let disabled = app
        .request(
            Method::PATCH,
            &base,
            Some(&owner.token),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{:?}", disabled.body);
    assert_eq!(disabled.body["disabled"], true);
    app.get(&uri, Some(&second_token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post("/v1/auth/token", None, json!({"secret": second_secret}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_key");
    app.request(
        Method::PATCH,
        &base,
        Some(&owner.token),
        Some(json!({"disabled": false})),
    )
    .await;
    assert_eq!(
        app.get(&uri, Some(&second_token)).await.status,
        StatusCode::OK
    );

    // Delete: gone for good.
    let deleted = app
        .request(Method::DELETE, &base, Some(&owner.token), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    app.get(&uri, Some(&second_token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn bad_service_account_requests_are_refused() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let member = app.member(&owner, "member").await;
    let uri = format!("/v1/projects/{}/service-accounts", owner.project_id);
    app.post(
        &uri,
        Some(&owner.token),
        json!({"name": "x", "role": "owner"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.post(
        &uri,
        Some(&owner.token),
        json!({"name": " ", "role": "member"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let (id, _) = service_account(&app, &owner, "member").await;
    app.post(
        &uri,
        Some(&owner.token),
        json!({"name": "CI-MEMBER", "role": "viewer"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "name_taken");
    app.post(
        &format!("{uri}/{id}/keys"),
        Some(&owner.token),
        json!({"expires_in_days": 0}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // Members do not manage service accounts.
    app.post(
        &uri,
        Some(&member.token),
        json!({"name": "mine", "role": "viewer"}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    for secret in [
        "",
        "ksa_nope",
        "kpt_1_2_3",
        &owner.token,
        &owner.refresh_token,
    ] {
        app.post("/v1/auth/token", None, json!({"secret": secret}))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_key");
    }
}

#[tokio::test]
async fn a_personal_api_token_acts_as_its_user_without_administering() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let created = app
        .post(
            "/v1/auth/api-tokens",
            Some(&owner.token),
            json!({"name": "laptop", "expires_in_days": 7}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("kpt_"));
    let token = exchange(&app, &secret).await;

    assert_eq!(
        app.get("/v1/projects", Some(&token)).await.status,
        StatusCode::OK
    );
    let project_uri = format!("/v1/projects/{}", owner.project_id);
    assert_eq!(
        app.get(&project_uri, Some(&token)).await.status,
        StatusCode::OK
    );
    let allocation_uri = format!("/v1/projects/{}/allocations", owner.project_id);
    assert_eq!(
        app.post(&allocation_uri, Some(&token), allocation())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // Even an owner's token never administers the tenant or mints tokens.
    for (method, uri, body) in [
        (Method::GET, "/v1/audit", None),
        (Method::GET, "/v1/invitations", None),
        (Method::POST, "/v1/projects", Some(json!({"name": "x"}))),
        (
            Method::POST,
            "/v1/auth/api-tokens",
            Some(json!({"name": "more"})),
        ),
        (
            Method::POST,
            "/v1/auth/password",
            Some(
                json!({"current_password": "a long enough password", "new_password": "another long password"}),
            ),
        ),
    ] {
        app.request(method, uri, Some(&token), body)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    // Listed without its secret; revoked, it stops at once.
    let listed = app.get("/v1/auth/api-tokens", Some(&owner.token)).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(&secret));
    let id = created.body["token"]["id"].as_str().unwrap();
    let revoked = app
        .request(
            Method::DELETE,
            &format!("/v1/auth/api-tokens/{id}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    app.get("/v1/projects", Some(&token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.get(&project_uri, Some(&token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn a_members_tokens_end_with_the_membership() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let member = app.member(&owner, "member").await;
    let created = app
        .post(
            "/v1/auth/api-tokens",
            Some(&member.token),
            json!({"name": "ci"}),
        )
        .await;
    let token = exchange(&app, created.body["secret"].as_str().unwrap()).await;
    assert_eq!(
        app.get("/v1/projects", Some(&token)).await.status,
        StatusCode::OK
    );
    app.request(
        Method::DELETE,
        &format!("/v1/members/{}", member.user_id),
        Some(&owner.token),
        None,
    )
    .await;
    app.get("/v1/projects", Some(&token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/auth/token",
        None,
        json!({"secret": created.body["secret"]}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_key");
}
