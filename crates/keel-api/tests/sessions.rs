//! Sessions: refresh-token rotation and reuse detection, logout, password
//! change, signing-key rotation without logging anyone out, and deleting
//! one's account.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::{SIGNING_KEY, TestApp};
use serde_json::json;

const PASSWORD: &str = "a long enough password";

fn field<'a>(body: &'a serde_json::Value, name: &str) -> &'a str {
    body[name].as_str().unwrap()
}

#[tokio::test]
async fn a_refresh_rotates_both_tokens_and_the_new_access_token_works() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let refreshed = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": alice.refresh_token}),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.body);
    let access = field(&refreshed.body, "access_token");
    assert_ne!(field(&refreshed.body, "refresh_token"), alice.refresh_token);
    assert_eq!(refreshed.body["tenant_id"], alice.tenant_id.as_str());
    assert!(refreshed.body["refresh_expires_in"].as_i64().unwrap() > 86_400);
    assert_eq!(
        app.get("/v1/projects", Some(access)).await.status,
        StatusCode::OK
    );
    // The refresh is audited in the tenant.
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'session.refresh'")
            .await,
        1
    );
}

#[tokio::test]
async fn reusing_a_refresh_token_revokes_the_whole_session() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let first = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": alice.refresh_token}),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let newest_refresh = field(&first.body, "refresh_token").to_owned();
    let newest_access = field(&first.body, "access_token").to_owned();

    // A thief replays the old token: refused, and the family is revoked.
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": alice.refresh_token}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "refresh_token_reused");
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": newest_refresh}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    for token in [&alice.token, &newest_access] {
        app.get("/v1/projects", Some(token))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM sessions WHERE revoked_reason = 'refresh_token_reused'")
            .await,
        1
    );
    // Logging in again starts a fresh session.
    let again = app.login(&alice.email, PASSWORD, None).await;
    assert_eq!(again.status, StatusCode::OK);
    let access = field(&again.body, "access_token");
    assert_eq!(
        app.get("/v1/projects", Some(access)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn of_two_concurrent_refreshes_with_one_token_exactly_one_succeeds() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let body = json!({"refresh_token": alice.refresh_token});
    let (a, b) = tokio::join!(
        app.post("/v1/auth/refresh", None, body.clone()),
        app.post("/v1/auth/refresh", None, body.clone()),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::UNAUTHORIZED]);
    // The loser saw reuse, so the session is gone for both.
    assert_eq!(
        app.count("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn malformed_unknown_and_forged_refresh_tokens_are_refused_alike() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let mut forged = alice.refresh_token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for token in [
        "",
        "krt_nope",
        alice.token.as_str(),
        forged.as_str(),
        &alice.refresh_token.replacen("krt", "kit", 1),
    ] {
        app.post("/v1/auth/refresh", None, json!({"refresh_token": token}))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    }
    // None of that touched the real session.
    let ok = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": alice.refresh_token}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn logout_ends_the_session_at_once() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let out = app
        .post("/v1/auth/logout", Some(&alice.token), json!({}))
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT, "{:?}", out.body);
    app.get("/v1/projects", Some(&alice.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": alice.refresh_token}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'session.revoke' AND details->>'reason' = 'logout'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_password_change_ends_every_other_session_but_this_one() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let other = app.login(&alice.email, PASSWORD, None).await;
    let other_access = field(&other.body, "access_token").to_owned();
    let other_refresh = field(&other.body, "refresh_token").to_owned();

    // A wrong current password changes nothing.
    app.post(
        "/v1/auth/password",
        Some(&alice.token),
        json!({"current_password": "not the password", "new_password": "a brand new password"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    app.post(
        "/v1/auth/password",
        Some(&alice.token),
        json!({"current_password": PASSWORD, "new_password": "short"}),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(
        app.get("/v1/projects", Some(&other_access)).await.status,
        StatusCode::OK
    );

    let changed = app
        .post(
            "/v1/auth/password",
            Some(&alice.token),
            json!({"current_password": PASSWORD, "new_password": "a brand new password"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{:?}", changed.body);
    assert_eq!(
        app.get("/v1/projects", Some(&alice.token)).await.status,
        StatusCode::OK
    );
    app.get("/v1/projects", Some(&other_access))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": other_refresh}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    app.login(&alice.email, PASSWORD, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_eq!(
        app.login(&alice.email, "a brand new password", None)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_signing_key_rotation_logs_nobody_out() {
    const NEW_KEY: &str = "the-next-signing-key-that-is-also-long-enough-42";
    let mut app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;

    // Step 1: the new key signs, the old one still verifies.
    app.rekey(&[NEW_KEY, SIGNING_KEY]);
    assert_eq!(
        app.get("/v1/projects", Some(&alice.token)).await.status,
        StatusCode::OK
    );
    let refreshed = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": alice.refresh_token}),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK);
    let access = field(&refreshed.body, "access_token").to_owned();
    let header = jsonwebtoken::decode_header(&access).unwrap();
    assert_eq!(header.kid.as_deref(), Some(app.state.tokens.signing_kid()));

    // Step 2, after the access-token lifetime: the old key is retired. Old
    // access tokens stop verifying; the session lives on through refresh.
    app.rekey(&[NEW_KEY]);
    app.get("/v1/projects", Some(&alice.token))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(
        app.get("/v1/projects", Some(&access)).await.status,
        StatusCode::OK
    );
    let again = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": field(&refreshed.body, "refresh_token")}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn a_refresh_after_the_membership_ended_is_refused() {
    let app = TestApp::spawn().await;
    let alice = app.tenant("acme").await;
    let mut admin = app.database.admin().await;
    sqlx::query("DELETE FROM memberships WHERE user_id = $1::uuid")
        .bind(&alice.user_id)
        .execute(&mut admin)
        .await
        .unwrap();
    app.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": alice.refresh_token}),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    assert_eq!(
        app.count("SELECT count(*) FROM sessions WHERE revoked_reason = 'membership_ended'")
            .await,
        1
    );
}

#[tokio::test]
async fn deleting_an_account_ends_its_tokens_everywhere_and_leaves_no_tenant_without_owner() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let home = app.tenant("mara-home").await;
    let mara = app.join(&owner, home.clone(), "member").await;
    let pat = app
        .post(
            "/v1/auth/api-tokens",
            Some(&mara.token),
            json!({"name": "laptop"}),
        )
        .await;
    let pat = app
        .post(
            "/v1/auth/token",
            None,
            json!({"secret": pat.body["secret"]}),
        )
        .await;
    let pat = field(&pat.body, "access_token").to_owned();
    let delete = |token: String, password: &'static str| {
        let app = &app;
        async move {
            app.post(
                "/v1/auth/delete-account",
                Some(&token),
                json!({"current_password": password}),
            )
            .await
        }
    };

    // A wrong password, an API token, or being a tenant's only owner (her
    // home tenant's) deletes nothing.
    delete(mara.token.clone(), "not the password")
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    delete(pat.clone(), PASSWORD)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    delete(mara.token.clone(), PASSWORD)
        .await
        .assert_error(StatusCode::CONFLICT, "last_owner");
    assert_eq!(
        app.get("/v1/projects", Some(&mara.token)).await.status,
        StatusCode::OK
    );

    // With a second owner at home, she can go.
    let co_owner = app.join(&home, owner.clone(), "owner").await;
    let deleted = delete(mara.token.clone(), PASSWORD).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);

    // Every token she held, in every tenant, ends at once.
    for token in [&mara.token, &home.token, &pat] {
        app.get("/v1/projects", Some(token))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    for refresh in [&mara.refresh_token, &home.refresh_token] {
        app.post("/v1/auth/refresh", None, json!({"refresh_token": refresh}))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    }
    app.login(&mara.email, PASSWORD, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");

    // Both tenants keep an owner, no longer list her, and audit her going.
    for token in [&owner.token, &co_owner.token] {
        let members = app.get("/v1/members", Some(token)).await;
        assert_eq!(members.status, StatusCode::OK, "{:?}", members.body);
        assert!(!members.body.to_string().contains(&mara.user_id));
    }
    // Each row names her as its own tenant knows her.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_log WHERE action = 'user.delete'
             AND actor_detail->>'tenant_id' = tenant_id::text"
        )
        .await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'member.removed'")
            .await,
        2
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM users WHERE id = $1::uuid)
              + (SELECT count(*) FROM memberships WHERE user_id = $1::uuid)
              + (SELECT count(*) FROM sessions WHERE user_id = $1::uuid)",
    )
    .bind(&mara.user_id)
    .fetch_one(&mut app.database.admin().await)
    .await
    .unwrap();
    assert_eq!(left, 0);

    // The email is free again.
    let again = app
        .post(
            "/v1/auth/register",
            None,
            json!({"email": mara.email, "password": PASSWORD, "tenant_name": "again"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.body);
}

#[tokio::test]
async fn two_co_owners_deleting_their_accounts_at_once_leave_one_owner() {
    let app = TestApp::spawn().await;
    let ann = app.tenant("ann").await;
    let bob = app.tenant("bob").await;
    // Each owns the other's tenant too: either could leave alone.
    app.join(&ann, bob.clone(), "owner").await;
    app.join(&bob, ann.clone(), "owner").await;
    let delete = |token: String| {
        let app = &app;
        async move {
            app.post(
                "/v1/auth/delete-account",
                Some(&token),
                json!({"current_password": PASSWORD}),
            )
            .await
        }
    };
    let (first, second) = tokio::join!(delete(ann.token.clone()), delete(bob.token.clone()));
    let mut statuses = [first.status, second.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::NO_CONTENT, StatusCode::CONFLICT],
        "{:?} {:?}",
        first.body,
        second.body
    );
    // Both tenants still have exactly one owner: whoever stayed.
    assert_eq!(
        app.count("SELECT count(*) FROM memberships WHERE role = 'owner'")
            .await,
        2
    );
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn the_session_names_the_user_its_tenant_and_every_tenant_they_belong_to() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("Acme").await;
    // A user of their own tenant who also joins Acme as a viewer.
    let viewer = app.member(&owner, "viewer").await;
    let session = app.get("/v1/auth/session", Some(&viewer.token)).await;
    assert_eq!(session.status, StatusCode::OK, "{:?}", session.body);
    assert_eq!(field(&session.body, "email"), viewer.email);
    assert_eq!(field(&session.body, "tenant_id"), owner.tenant_id);
    assert_eq!(field(&session.body, "tenant_name"), "Acme");
    assert_eq!(field(&session.body, "role"), "viewer");
    let tenants = session.body["tenants"].as_array().unwrap();
    let names: Vec<(&str, &str)> = tenants
        .iter()
        .map(|t| (field(t, "name"), field(t, "role")))
        .collect();
    assert_eq!(names, [("viewer-home", "owner"), ("Acme", "viewer")]);

    // The owner sees only their own tenant: nobody else's name leaks.
    let own = app.get("/v1/auth/session", Some(&owner.token)).await;
    assert_eq!(own.body["tenants"].as_array().unwrap().len(), 1);

    // Not for a service account's or an API token's caller.
    let minted = app
        .post(
            "/v1/auth/api-tokens",
            Some(&owner.token),
            json!({"name": "ci", "expires_in_days": 1}),
        )
        .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{:?}", minted.body);
    let exchanged = app
        .post(
            "/v1/auth/token",
            None,
            json!({"secret": minted.body["secret"]}),
        )
        .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    let by_token = app
        .get(
            "/v1/auth/session",
            Some(field(&exchanged.body, "access_token")),
        )
        .await;
    assert_eq!(
        by_token.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        by_token.body
    );
}

#[tokio::test]
async fn switching_tenants_starts_a_session_there_that_ends_no_later_than_this_one() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("Acme").await;
    let member = app.member(&owner, "member").await;
    let home =
        app.get("/v1/auth/session", Some(&member.token)).await.body["tenants"][0]["tenant_id"]
            .as_str()
            .unwrap()
            .to_owned();
    assert_ne!(home, owner.tenant_id);

    // Not with another session's refresh token.
    let other_session = app.login(&member.email, PASSWORD, None).await;
    let wrong = app
        .post(
            "/v1/auth/switch",
            Some(&member.token),
            json!({"tenant_id": home, "refresh_token": other_session.body["refresh_token"]}),
        )
        .await;
    wrong.assert_error(StatusCode::UNAUTHORIZED, "invalid_refresh_token");

    let switched = app
        .post(
            "/v1/auth/switch",
            Some(&member.token),
            json!({"tenant_id": home, "refresh_token": member.refresh_token}),
        )
        .await;
    assert_eq!(switched.status, StatusCode::OK, "{:?}", switched.body);
    assert_eq!(field(&switched.body, "tenant_id"), home);
    let token = field(&switched.body, "access_token");
    let there = app.get("/v1/auth/session", Some(token)).await;
    assert_eq!(field(&there.body, "tenant_id"), home);
    assert_eq!(field(&there.body, "role"), "owner");
    // Its projects are the home tenant's, not Acme's.
    let projects = app.get("/v1/projects", Some(token)).await;
    assert_eq!(projects.status, StatusCode::OK);
    assert!(
        projects.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| field(p, "tenant_id") == home)
    );
    // The new session's refresh token works, and the session it belongs
    // to ends when the one it was switched from would.
    let refreshed = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": switched.body["refresh_token"]}),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.body);
    // The refresh token it was switched with is used up: presented again,
    // it is reuse, and the old session is revoked.
    let again = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": member.refresh_token}),
        )
        .await;
    again.assert_error(StatusCode::UNAUTHORIZED, "refresh_token_reused");
    let mut admin = app.database.admin().await;
    let (from, to): (time::OffsetDateTime, time::OffsetDateTime) = sqlx::query_as(
        "SELECT (SELECT expires_at FROM sessions WHERE tenant_id = $1 AND user_id = $3
                 ORDER BY created_at LIMIT 1),
                (SELECT expires_at FROM sessions WHERE tenant_id = $2 AND user_id = $3 ORDER BY created_at DESC LIMIT 1)",
    )
    .bind(uuid::Uuid::parse_str(&owner.tenant_id).unwrap())
    .bind(uuid::Uuid::parse_str(&home).unwrap())
    .bind(uuid::Uuid::parse_str(&member.user_id).unwrap())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(from, to);
    // Audited in the tenant switched to, without naming the one left.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'session.create' AND tenant_id = $1
           AND details ->> 'via' = 'switch' AND NOT details::text LIKE '%' || $2 || '%'",
    )
    .bind(uuid::Uuid::parse_str(&home).unwrap())
    .bind(&owner.tenant_id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(audited, 1);
}

#[tokio::test]
async fn switching_into_a_tenant_one_does_not_belong_to_changes_nothing() {
    let app = TestApp::spawn().await;
    let acme = app.tenant("Acme").await;
    let other = app.tenant("Other").await;
    let sessions = app.count("SELECT count(*) FROM sessions").await;
    let refused = app
        .post(
            "/v1/auth/switch",
            Some(&acme.token),
            json!({"tenant_id": other.tenant_id, "refresh_token": acme.refresh_token}),
        )
        .await;
    refused.assert_error(StatusCode::NOT_FOUND, "not_found");
    // An access token alone moves nothing.
    let tokenless = app
        .post(
            "/v1/auth/switch",
            Some(&acme.token),
            json!({"tenant_id": acme.tenant_id}),
        )
        .await;
    assert_eq!(tokenless.status, StatusCode::UNPROCESSABLE_ENTITY);
    let malformed = app
        .post(
            "/v1/auth/switch",
            Some(&acme.token),
            json!({"tenant_id": "not-a-uuid", "refresh_token": acme.refresh_token}),
        )
        .await;
    assert_eq!(malformed.status, StatusCode::UNPROCESSABLE_ENTITY);
    let anonymous = app
        .post(
            "/v1/auth/switch",
            None,
            json!({"tenant_id": acme.tenant_id, "refresh_token": acme.refresh_token}),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, sessions);
    // The refused switches used nothing up: the refresh token still works.
    let refreshed = app
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": acme.refresh_token}),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.body);
    // A logged-out session cannot switch.
    let logout = app
        .post("/v1/auth/logout", Some(&acme.token), json!({}))
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    let after = app
        .post(
            "/v1/auth/switch",
            Some(&acme.token),
            json!({"tenant_id": acme.tenant_id, "refresh_token": refreshed.body["refresh_token"]}),
        )
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
}
