//! Members, invitations, roles, the last-owner rule and project grants.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode};
use common::TestApp;
use serde_json::json;

const PASSWORD: &str = "a long enough password";

#[tokio::test]
async fn an_invited_user_accepts_and_acts_in_the_inviting_tenant() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let bob = app.tenant("bobs-own").await;
    let invited = app
        .post(
            "/v1/invitations",
            Some(&owner.token),
            json!({"email": bob.email.to_uppercase(), "role": "member"}),
        )
        .await;
    assert_eq!(invited.status, StatusCode::CREATED, "{:?}", invited.body);
    let token = invited.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kit_"));
    assert!(
        invited.body["invitation"]["resource_name"]
            .as_str()
            .unwrap()
            .starts_with(&format!("krn:keel::{}::invitation/", owner.tenant_id))
    );
    // Only the digest is stored.
    assert_eq!(
        app.count("SELECT count(*) FROM invitations WHERE position(convert_to(secret_sha256::text, 'UTF8') in ''::bytea) = 0")
            .await,
        1
    );
    let listed = app.get("/v1/invitations", Some(&owner.token)).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(&token));

    let accepted = app
        .post(
            "/v1/invitations/accept",
            Some(&bob.token),
            json!({"token": token}),
        )
        .await;
    assert_eq!(accepted.status, StatusCode::OK, "{:?}", accepted.body);
    assert_eq!(accepted.body["role"], "member");
    // A token works once.
    app.post(
        "/v1/invitations/accept",
        Some(&bob.token),
        json!({"token": token}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");

    let login = app
        .login(&bob.email, PASSWORD, Some(&owner.tenant_id))
        .await;
    assert_eq!(login.status, StatusCode::OK);
    let bob_in_acme = login.body["access_token"].as_str().unwrap();
    let projects = app.get("/v1/projects", Some(bob_in_acme)).await;
    assert_eq!(projects.body["items"][0]["id"], owner.project_id.as_str());
    // A member cannot administer.
    app.post("/v1/projects", Some(bob_in_acme), json!({"name": "nope"}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let members = app.get("/v1/members", Some(&owner.token)).await;
    assert_eq!(members.body["items"].as_array().unwrap().len(), 2);
    assert!(
        app.get("/v1/invitations", Some(&owner.token)).await.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action IN ('invitation.create', 'invitation.accept', 'member.add')")
            .await,
        3
    );
}

#[tokio::test]
async fn invitations_are_refused_when_they_should_be_and_change_nothing() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let bob = app.tenant("bob").await;
    let carol = app.tenant("carol").await;
    app.post(
        "/v1/invitations",
        Some(&owner.token),
        json!({"email": "not-an-email", "role": "member"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.post(
        "/v1/invitations",
        Some(&owner.token),
        json!({"email": "x@example.com", "role": "emperor"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    app.post(
        "/v1/invitations",
        Some(&owner.token),
        json!({"email": owner.email, "role": "member"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "already_member");
    let invited = app
        .post(
            "/v1/invitations",
            Some(&owner.token),
            json!({"email": bob.email, "role": "viewer"}),
        )
        .await;
    let token = invited.body["token"].as_str().unwrap().to_owned();
    app.post(
        "/v1/invitations",
        Some(&owner.token),
        json!({"email": bob.email, "role": "admin"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "invitation_pending");

    // Someone else holding the token cannot use it.
    app.post(
        "/v1/invitations/accept",
        Some(&carol.token),
        json!({"token": token}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "invitation_email_mismatch");
    // A forged secret is unknown.
    let forged = format!("{}A", &token[..token.len() - 1]);
    let forged = if forged == token {
        format!("{}B", &token[..token.len() - 1])
    } else {
        forged
    };
    app.post(
        "/v1/invitations/accept",
        Some(&bob.token),
        json!({"token": forged}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    // Expired.
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE invitations SET expires_at = now() - interval '1 second'")
        .execute(&mut admin)
        .await
        .unwrap();
    app.post(
        "/v1/invitations/accept",
        Some(&bob.token),
        json!({"token": token}),
    )
    .await
    .assert_error(StatusCode::GONE, "invitation_expired");
    // An expired invitation does not block a new one; a revoked one stops working.
    let again = app
        .post(
            "/v1/invitations",
            Some(&owner.token),
            json!({"email": bob.email, "role": "viewer"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.body);
    let id = again.body["invitation"]["id"].as_str().unwrap();
    let revoked = app
        .request(
            Method::DELETE,
            &format!("/v1/invitations/{id}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    app.post(
        "/v1/invitations/accept",
        Some(&bob.token),
        json!({"token": again.body["token"]}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        app.count("SELECT count(*) FROM memberships").await,
        3,
        "three tenants, one owner each, nobody joined"
    );
}

#[tokio::test]
async fn only_owners_touch_the_owner_role() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let admin = app.member(&owner, "admin").await;
    let member = app.member(&owner, "member").await;
    app.post(
        "/v1/invitations",
        Some(&admin.token),
        json!({"email": "new@example.com", "role": "owner"}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.post(
        "/v1/invitations",
        Some(&member.token),
        json!({"email": "new@example.com", "role": "viewer"}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.request(
        Method::PATCH,
        &format!("/v1/members/{}", owner.user_id),
        Some(&admin.token),
        Some(json!({"role": "viewer"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.request(
        Method::PATCH,
        &format!("/v1/members/{}", member.user_id),
        Some(&admin.token),
        Some(json!({"role": "owner"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.request(
        Method::DELETE,
        &format!("/v1/members/{}", owner.user_id),
        Some(&admin.token),
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Admins manage everyone else.
    let changed = app
        .request(
            Method::PATCH,
            &format!("/v1/members/{}", member.user_id),
            Some(&admin.token),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    assert_eq!(changed.body["role"], "viewer");
    assert_eq!(changed.headers["etag"], "\"2\"");
    // The change applies to the member's next request.
    app.get("/v1/audit", Some(&member.token))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // A stale If-Match is refused.
    let request = axum::http::Request::builder()
        .method(Method::PATCH)
        .uri(format!("/v1/members/{}", member.user_id))
        .header("authorization", format!("Bearer {}", owner.token))
        .header("content-type", "application/json")
        .header("if-match", "\"1\"");
    app.send(
        request
            .body(axum::body::Body::from(r#"{"role":"member"}"#))
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
}

#[tokio::test]
async fn the_last_owner_can_be_neither_demoted_nor_removed_nor_leave() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let uri = format!("/v1/members/{}", owner.user_id);
    app.request(
        Method::PATCH,
        &uri,
        Some(&owner.token),
        Some(json!({"role": "admin"})),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "last_owner");
    app.request(Method::DELETE, &uri, Some(&owner.token), None)
        .await
        .assert_error(StatusCode::CONFLICT, "last_owner");
    // With a second owner, the first may leave.
    let second = app.member(&owner, "owner").await;
    let left = app
        .request(Method::DELETE, &uri, Some(&owner.token), None)
        .await;
    assert_eq!(left.status, StatusCode::NO_CONTENT, "{:?}", left.body);
    app.get("/v1/projects", Some(&owner.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.request(
        Method::DELETE,
        &format!("/v1/members/{}", second.user_id),
        Some(&second.token),
        None,
    )
    .await
    .assert_error(StatusCode::CONFLICT, "last_owner");
}

#[tokio::test]
async fn two_owners_demoting_each_other_at_once_leave_one_owner() {
    let app = TestApp::spawn().await;
    let first = app.tenant("acme").await;
    let second = app.member(&first, "owner").await;
    for _ in 0..3 {
        let (first_uri, second_uri) = (
            format!("/v1/members/{}", first.user_id),
            format!("/v1/members/{}", second.user_id),
        );
        let (a, b) = tokio::join!(
            app.request(
                Method::PATCH,
                &second_uri,
                Some(&first.token),
                Some(json!({"role": "admin"}))
            ),
            app.request(
                Method::PATCH,
                &first_uri,
                Some(&second.token),
                Some(json!({"role": "admin"}))
            ),
        );
        let owners = app
            .count("SELECT count(*) FROM memberships WHERE role = 'owner'")
            .await;
        // Each registration made an owner of its own tenant; one of acme's
        // two remains.
        assert_eq!(owners, 2, "{:?} {:?}", a.body, b.body);
        let statuses = [a.status, b.status];
        assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
        assert!(!statuses.iter().all(|s| *s == StatusCode::OK));
        // Restore two owners for the next round, as the survivor.
        let (survivor, demoted) = if a.status == StatusCode::OK {
            (&first, &second)
        } else {
            (&second, &first)
        };
        let restored = app
            .request(
                Method::PATCH,
                &format!("/v1/members/{}", demoted.user_id),
                Some(&survivor.token),
                Some(json!({"role": "owner"})),
            )
            .await;
        assert_eq!(restored.status, StatusCode::OK, "{:?}", restored.body);
    }
}

#[tokio::test]
async fn a_removed_member_loses_access_at_once() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let member = app.member(&owner, "member").await;
    assert_eq!(
        app.get("/v1/projects", Some(&member.token)).await.status,
        StatusCode::OK
    );
    let removed = app
        .request(
            Method::DELETE,
            &format!("/v1/members/{}", member.user_id),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    app.get("/v1/projects", Some(&member.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": member.refresh_token}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
}

#[tokio::test]
async fn a_project_grant_raises_a_viewer_on_that_project_only() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let viewer = app.member(&owner, "viewer").await;
    let other = app
        .post("/v1/projects", Some(&owner.token), json!({"name": "other"}))
        .await;
    let other_project = other.body["id"].as_str().unwrap();
    let create = |project: String, token: String| {
        let app = &app;
        async move {
            app.post(
                &format!("/v1/projects/{project}/allocations"),
                Some(&token),
                json!({"name": "job", "flavor": "cpu.small"}),
            )
            .await
        }
    };
    create(owner.project_id.clone(), viewer.token.clone())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let grant_uri = format!(
        "/v1/projects/{}/grants/{}",
        owner.project_id, viewer.user_id
    );
    app.request(
        Method::PUT,
        &grant_uri,
        Some(&owner.token),
        Some(json!({"role": "owner"})),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let granted = app
        .request(
            Method::PUT,
            &grant_uri,
            Some(&owner.token),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    assert_eq!(
        granted.body["resource_name"],
        format!(
            "krn:keel::{}:{}:grant/{}",
            owner.tenant_id, owner.project_id, viewer.user_id
        )
    );
    assert_eq!(
        create(owner.project_id.clone(), viewer.token.clone())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    create(other_project.to_owned(), viewer.token.clone())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // The grantee cannot manage grants; a grant for a non-member is 404.
    app.request(
        Method::PUT,
        &grant_uri,
        Some(&viewer.token),
        Some(json!({"role": "admin"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.request(
        Method::PUT,
        &format!(
            "/v1/projects/{}/grants/{}",
            owner.project_id,
            uuid::Uuid::now_v7()
        ),
        Some(&owner.token),
        Some(json!({"role": "member"})),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    let listed = app
        .get(
            &format!("/v1/projects/{}/grants", owner.project_id),
            Some(&owner.token),
        )
        .await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let removed = app
        .request(Method::DELETE, &grant_uri, Some(&owner.token), None)
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    create(owner.project_id.clone(), viewer.token.clone())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn a_member_removed_and_invited_back_does_not_get_old_sessions_back() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let member = app.member(&owner, "member").await;
    app.request(
        Method::DELETE,
        &format!("/v1/members/{}", member.user_id),
        Some(&owner.token),
        None,
    )
    .await;
    // Invited and accepted again (from their own tenant's session).
    let invited = app
        .post(
            "/v1/invitations",
            Some(&owner.token),
            json!({"email": member.email, "role": "member"}),
        )
        .await;
    let home = app.login(&member.email, PASSWORD, None).await;
    let home_token = home.body["access_token"].as_str().unwrap();
    let accepted = app
        .post(
            "/v1/invitations/accept",
            Some(home_token),
            json!({"token": invited.body["token"]}),
        )
        .await;
    assert_eq!(accepted.status, StatusCode::OK, "{:?}", accepted.body);
    // The sessions from before the removal stay dead.
    app.get("/v1/projects", Some(&member.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": member.refresh_token}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
}
