//! Every endpoint of the OpenAPI document, called without credentials and
//! as another tenant. The list comes from the document itself, so a new
//! endpoint is swept automatically, and one the sweep cannot call (a public
//! endpoint not on the list below, a body it has no sample for) fails it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::{Method, StatusCode};
use common::TestApp;
use serde_json::{Value, json};

/// Endpoints that are public by design: everything else needs a token.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/v1/auth/register"),
    ("post", "/v1/auth/login"),
    ("post", "/v1/auth/refresh"),
    ("post", "/v1/admin/auth/login"),
    ("post", "/v1/auth/token"),
    ("post", "/v1/nodes/enrol"),
    // Authenticated by Stripe's signature of the body instead.
    ("post", "/v1/payments/stripe/webhook"),
];

/// A valid body for each operation that takes one, so a refusal cannot be
/// a body validation error in disguise.
fn sample_body(operation_id: &str) -> Option<Value> {
    match operation_id {
        "allocation_create" => Some(json!({"name": "sweep", "flavor": "cpu.small"})),
        "project_create" | "project_update" => Some(json!({"name": "sweep"})),
        "member_update" => Some(json!({"role": "viewer"})),
        "service_account_create" => Some(json!({"name": "sweep", "role": "viewer"})),
        "service_account_update" => Some(json!({"disabled": true})),
        "api_token_create" => Some(json!({"name": "sweep"})),
        "service_account_key_create" => Some(json!({})),
        "admin_operator_create" => Some(json!({
            "email": "sweep-operator@example.com", "password": "a long enough password", "role": "operator"
        })),
        "invitation_create" => Some(json!({"email": "sweep@example.com", "role": "viewer"})),
        "admin_flavor_create" => {
            Some(json!({"name": "sweep.flavor", "vcpus": 1, "memory_mib": 1, "disk_gib": 0}))
        }
        "admin_region_create" => Some(json!({"name": "sweep-1"})),
        "admin_tenant_quota_set" | "admin_project_quota_set" | "admin_quota_defaults_set" => {
            Some(json!({"allocations": 0, "vcpus": 0, "memory_mib": 0, "gpus": 0}))
        }
        "project_grant_set" => Some(json!({"role": "viewer"})),
        "admin_rate_card_create" => Some(json!({
            "flavor": "cpu.small", "region": "local-1", "currency": "USD", "unit": "hour", "unit_price": 1
        })),
        "admin_invoice_generate" => Some(json!({"period": "2026-01"})),
        "admin_invoice_void" => Some(json!({"reason": "sweep"})),
        "admin_invoice_mark_paid" => Some(json!({"reference": "sweep"})),
        "admin_credit_grant" => Some(json!({"amount": 1, "currency": "USD"})),
        "admin_billing_account_set" => Some(json!({"mode": "invoiced"})),
        "checkout_create" => Some(json!({"purpose": "credit", "amount": 5000, "currency": "USD"})),
        // Well formed, but for no invitation: refused as not found.
        "invitation_accept" => Some(json!({
            "token": "kit_0190a0a0a0a0a0a0a0a0a0a0a0a0a0a0_0190a0a0a0a0a0a0a0a0a0a0a0a0a0a0_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        })),
        "auth_account_delete" => Some(json!({"current_password": "a long enough password"})),
        // Some tenant and token; the cross-tenant sweep sends the owner's
        // tenant and the intruder's own refresh token.
        "auth_switch" => Some(json!({
            "tenant_id": "0190a0a0-a0a0-7a0a-8a0a-a0a0a0a0a0a0",
            "refresh_token": "krt_0190a0a0a0a0a0a0a0a0a0a0a0a0a0a0_0190a0a0a0a0a0a0a0a0a0a0a0a0a0a0_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        })),
        "auth_password_change" => Some(
            json!({"current_password": "a long enough password", "new_password": "a long enough password"}),
        ),
        _ => None,
    }
}

struct Operation {
    method: String,
    path: String,
    operation_id: String,
    secured: bool,
    has_body: bool,
}

fn operations() -> Vec<Operation> {
    let document: Value = serde_json::from_str(&keel_api::openapi::document_json()).unwrap();
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            operations.push(Operation {
                method: method.clone(),
                path: path.clone(),
                operation_id: operation["operationId"].as_str().unwrap().to_owned(),
                secured: operation
                    .get("security")
                    .is_some_and(|s| !s.as_array().unwrap().is_empty()),
                has_body: operation.get("requestBody").is_some(),
            });
        }
    }
    assert!(
        operations.len() >= 10,
        "the document lists the api's endpoints"
    );
    operations
}

/// Ids of the resource owner's tenant to put in the path.
struct Ids<'a> {
    project: &'a str,
    allocation: &'a str,
    user: &'a str,
    invitation: &'a str,
    /// A service account, one of its keys, a personal API token.
    account: &'a str,
    key: &'a str,
    token: &'a str,
}

fn fill(path: &str, ids: &Ids<'_>) -> String {
    path.replace("{project_id}", ids.project)
        .replace("{allocation_id}", ids.allocation)
        .replace("{user_id}", ids.user)
        .replace("{invitation_id}", ids.invitation)
        .replace("{service_account_id}", ids.account)
        .replace("{key_id}", ids.key)
        .replace("{token_id}", ids.token)
        // No invoice in the sweep: another resource's id is no invoice.
        .replace("{invoice_id}", ids.allocation)
        .replace("{checkout_id}", ids.allocation)
}

#[tokio::test]
async fn every_endpoint_is_public_by_design_or_refuses_a_caller_without_a_token() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    for operation in operations() {
        let public = PUBLIC.contains(&(operation.method.as_str(), operation.path.as_str()));
        assert_eq!(
            public, !operation.secured,
            "{} {} must either be on the public list or require a bearer token",
            operation.method, operation.path
        );
        if public {
            continue;
        }
        let random = uuid::Uuid::now_v7().to_string();
        let uri = fill(
            &operation.path,
            &Ids {
                project: &owner.project_id,
                allocation: &random,
                user: &owner.user_id,
                invitation: &random,
                account: &random,
                key: &random,
                token: &random,
            },
        );
        let method = Method::from_bytes(operation.method.to_uppercase().as_bytes()).unwrap();
        let body = sample_body(&operation.operation_id);
        app.request(method, &uri, None, body)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
}

#[tokio::test]
async fn every_tenant_resource_is_a_404_for_another_tenant_and_nothing_changes() {
    let app = TestApp::spawn().await;
    app.add_host(8, 16384).await;
    let owner = app.tenant("acme").await;
    let intruder = app.tenant("globex").await;
    let created = app
        .post(
            &format!("/v1/projects/{}/allocations", owner.project_id),
            Some(&owner.token),
            json!({"name": "victim", "flavor": "cpu.small"}),
        )
        .await;
    let allocation = created.body["id"].as_str().unwrap().to_owned();
    let member = app.member(&owner, "member").await;
    let invited = app
        .post(
            "/v1/invitations",
            Some(&owner.token),
            json!({"email": "pending@example.com", "role": "viewer"}),
        )
        .await;
    let invitation = invited.body["invitation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let account = app
        .post(
            &format!("/v1/projects/{}/service-accounts", owner.project_id),
            Some(&owner.token),
            json!({"name": "victim-sa", "role": "viewer"}),
        )
        .await;
    let account = account.body["id"].as_str().unwrap().to_owned();
    let key = app
        .post(
            &format!(
                "/v1/projects/{}/service-accounts/{account}/keys",
                owner.project_id
            ),
            Some(&owner.token),
            json!({}),
        )
        .await;
    let key = key.body["key"]["id"].as_str().unwrap().to_owned();
    let token = app
        .post(
            "/v1/auth/api-tokens",
            Some(&owner.token),
            json!({"name": "victim"}),
        )
        .await;
    let token = token.body["token"]["id"].as_str().unwrap().to_owned();
    let ids = Ids {
        project: &owner.project_id,
        allocation: &allocation,
        user: &member.user_id,
        invitation: &invitation,
        account: &account,
        key: &key,
        token: &token,
    };
    let owner_audit = || async {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE tenant_id = $1::uuid")
                .bind(&owner.tenant_id)
                .fetch_one(&mut app.database.admin().await)
                .await
                .unwrap();
        count
    };
    let audit_before = owner_audit().await;

    for operation in operations()
        .into_iter()
        .filter(|operation| operation.secured)
    {
        let method = Method::from_bytes(operation.method.to_uppercase().as_bytes()).unwrap();
        let uri = fill(&operation.path, &ids);
        // A fresh session each time: logout and password change end
        // sessions of the caller's own.
        let login = app
            .login(&intruder.email, "a long enough password", None)
            .await;
        let token = login.body["access_token"].as_str().unwrap();
        let body = if operation.operation_id == "auth_switch" {
            Some(
                json!({"tenant_id": owner.tenant_id, "refresh_token": login.body["refresh_token"]}),
            )
        } else {
            sample_body(&operation.operation_id)
        };
        assert!(
            !operation.has_body || body.is_some(),
            "add a sample body for {} to the sweep",
            operation.operation_id
        );
        let response = app.request(method, &uri, Some(token), body).await;
        if operation.path.starts_with("/v1/admin/") {
            // A tenant token is no operator token.
            response.assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
        } else if operation.operation_id == "auth_account_delete" {
            // The intruder's own account, which it cannot delete while it
            // is the only owner of its own tenant.
            response.assert_error(StatusCode::CONFLICT, "last_owner");
        } else if operation.operation_id == "auth_switch" {
            // Into the owner's tenant, where the intruder is no member.
            response.assert_error(StatusCode::NOT_FOUND, "not_found");
        } else if operation.operation_id == "invitation_accept" {
            // Tenant-wide, but the sample token names no invitation.
            response.assert_error(StatusCode::NOT_FOUND, "not_found");
        } else if operation.path.contains('{') {
            // A resource of another tenant: not found, never forbidden.
            response.assert_error(StatusCode::NOT_FOUND, "not_found");
        } else {
            // Tenant-wide endpoints act in the caller's own tenant only.
            assert!(
                response.status.is_success(),
                "{} {}: {:?}",
                operation.method,
                operation.path,
                response.body
            );
            let text = response.body.to_string();
            assert!(
                !text.contains(&owner.project_id) && !text.contains(&allocation),
                "{text}"
            );
        }
    }
    let allocation_state: String =
        sqlx::query_scalar("SELECT state FROM allocations WHERE id = $1::uuid")
            .bind(&allocation)
            .fetch_one(&mut app.database.admin().await)
            .await
            .unwrap();
    assert_eq!(allocation_state, "scheduled");
    assert_eq!(
        owner_audit().await,
        audit_before,
        "nothing changed in the owner's tenant"
    );
}

#[tokio::test]
async fn an_operator_token_opens_no_tenant_endpoint_and_admin_endpoints_need_one() {
    let app = TestApp::spawn().await;
    let owner = app.tenant("acme").await;
    let (_, operator) = app.operator(keel_auth::authz::PlatformRole::Operator).await;
    let document: Value = serde_json::from_str(&keel_api::openapi::document_json()).unwrap();
    for operation in operations().into_iter().filter(|o| o.secured) {
        let admin = operation.path.starts_with("/v1/admin/");
        let scheme = document["paths"][&operation.path][&operation.method]["security"][0]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        assert_eq!(
            scheme,
            if admin { "operator" } else { "bearer" },
            "{} {}",
            operation.method,
            operation.path
        );
        if admin {
            continue;
        }
        let random = uuid::Uuid::now_v7().to_string();
        let uri = fill(
            &operation.path,
            &Ids {
                project: &owner.project_id,
                allocation: &random,
                user: &owner.user_id,
                invitation: &random,
                account: &random,
                key: &random,
                token: &random,
            },
        );
        let method = Method::from_bytes(operation.method.to_uppercase().as_bytes()).unwrap();
        app.request(
            method,
            &uri,
            Some(&operator),
            sample_body(&operation.operation_id),
        )
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
}
