//! Sessions: login, refresh-token rotation with reuse detection, logout and
//! password change.
//!
//! A login starts a session (one user, one tenant) and hands out a
//! short-lived access token naming the session plus a refresh token. Each
//! refresh exchanges the refresh token for a new one; a refresh token
//! presented twice means two parties hold it, and the whole session is
//! revoked. Every authorised request checks that its session is live (see
//! `authz`), so revocation takes effect at once, not when the access token
//! expires.

use keel_core::ids::{RefreshTokenId, SessionId, TenantId, UserId};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, NewEvent, RequestMeta, Scope, WriteTx};
use time::OffsetDateTime;

use crate::Role;
use crate::authz::TenantHandle;
use crate::members::member_name;
use crate::model::{
    AccountDeleteRequest, LoginRequest, PasswordChangeRequest, SessionView, SwitchRequest,
    TenantMembership, TokenResponse,
};
use crate::{AuthError, Principal, TokenKeys, password, secret};

const REFRESH_PREFIX: &str = "krt";

fn session_name(tenant_id: TenantId, session_id: SessionId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), None, "session", session_id)
}

/// Inserts a refresh token of `session_id` and returns the token to hand
/// out. It expires after the refresh lifetime, never after the session.
async fn new_refresh_token(
    tx: &mut WriteTx,
    keys: &TokenKeys,
    user_id: UserId,
    session_id: SessionId,
    session_expires_at: OffsetDateTime,
) -> Result<(String, OffsetDateTime), AuthError> {
    let id = RefreshTokenId::new();
    let made = secret::generate(REFRESH_PREFIX, &[user_id.as_uuid(), id.as_uuid()]);
    let expires_at = (OffsetDateTime::now_utc() + keys.refresh_ttl()).min(session_expires_at);
    sqlx::query(
        "INSERT INTO refresh_tokens (id, session_id, user_id, secret_sha256, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(session_id)
    .bind(user_id)
    .bind(&made.digest)
    .bind(expires_at)
    .execute(tx.conn())
    .await?;
    Ok((made.token, expires_at))
}

async fn insert_session(
    tx: &mut WriteTx,
    session_id: SessionId,
    user_id: UserId,
    tenant_id: TenantId,
    expires_at: OffsetDateTime,
) -> Result<(), AuthError> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, tenant_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(session_id)
    .bind(user_id)
    .bind(tenant_id)
    .bind(expires_at)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// A refresh token of `user_id` with its session, both locked: concurrent
/// refreshes (and switches) of one token serialise, the second sees it
/// used.
async fn lock_refresh_token(
    tx: &mut WriteTx,
    token_id: RefreshTokenId,
    user_id: UserId,
) -> Result<Option<PresentedRow>, AuthError> {
    Ok(sqlx::query_as(
        "SELECT r.session_id, r.secret_sha256, r.expires_at, r.used_at,
                s.tenant_id, s.revoked_at, s.expires_at AS session_expires_at
         FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id
         WHERE r.id = $1 AND r.user_id = $2
         FOR UPDATE OF r, s",
    )
    .bind(token_id)
    .bind(user_id)
    .fetch_optional(tx.conn())
    .await?)
}

fn token_response(
    keys: &TokenKeys,
    user_id: UserId,
    tenant_id: TenantId,
    session_id: SessionId,
    refresh: (String, OffsetDateTime),
) -> Result<TokenResponse, AuthError> {
    let issued = keys.issue(user_id, tenant_id, session_id)?;
    let (refresh_token, refresh_expires_at) = refresh;
    Ok(TokenResponse {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
        refresh_token,
        refresh_expires_in: (refresh_expires_at - OffsetDateTime::now_utc())
            .whole_seconds()
            .max(0),
        tenant_id,
    })
}

/// Checks the password and starts a session in one of the user's tenants.
/// Wrong email and wrong password are the same error, and take the same
/// time.
pub async fn login(
    db: &Db,
    keys: &TokenKeys,
    meta: RequestMeta,
    request: LoginRequest,
) -> Result<TokenResponse, AuthError> {
    let found: Option<(UserId, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE lower(email) = lower($1)")
            .bind(request.email.trim())
            .fetch_optional(db.pool())
            .await?;
    let (user_id, stored) = match found {
        Some((id, hash)) => (Some(id), Some(hash)),
        None => (None, None),
    };
    let password_ok = password::verify(request.password, stored).await?;
    let user_id = match (user_id, password_ok) {
        (Some(user_id), true) => user_id,
        _ => return Err(AuthError::InvalidCredentials),
    };
    // The user's own memberships are visible in a user-scoped transaction.
    let mut tx = db.begin_tenant(meta, Scope::User { user_id }).await?;
    let tenant_id: Option<TenantId> = sqlx::query_scalar(
        "SELECT tenant_id FROM memberships WHERE user_id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)
         ORDER BY created_at, tenant_id LIMIT 1",
    )
    .bind(user_id)
    .bind(request.tenant_id)
    .fetch_optional(tx.conn())
    .await?;
    let tenant_id = match (tenant_id, request.tenant_id) {
        (Some(tenant_id), _) => tenant_id,
        (None, Some(_)) => return Err(AuthError::NotFound("tenant")),
        (None, None) => return Err(AuthError::NoTenant),
    };
    tx.enter_tenant(tenant_id, Some(user_id)).await?;
    tx.set_actor(Actor::User { user_id, tenant_id });
    let session_id = SessionId::new();
    let session_expires_at = OffsetDateTime::now_utc() + keys.session_max_age();
    insert_session(&mut tx, session_id, user_id, tenant_id, session_expires_at).await?;
    let refresh = new_refresh_token(&mut tx, keys, user_id, session_id, session_expires_at).await?;
    let response = token_response(keys, user_id, tenant_id, session_id, refresh)?;
    tx.commit(Audit::new(
        "session.create",
        Some(tenant_id),
        session_name(tenant_id, session_id),
    ))
    .await?;
    Ok(response)
}

/// The caller's session: who they are, the tenant they act in with their
/// role, and every tenant they belong to. Read in the caller's tenant
/// transaction, as the user (the names of the user's other tenants are
/// visible to them: migration 0022).
pub async fn describe(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
    principal: &Principal,
) -> Result<SessionView, AuthError> {
    let user = principal.user_session()?;
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(user.user_id)
        .fetch_one(&mut *conn)
        .await?;
    let rows: Vec<(TenantId, String, String)> = sqlx::query_as(
        "SELECT m.tenant_id, t.name, m.role FROM memberships m JOIN tenants t ON t.id = m.tenant_id
         WHERE m.user_id = $1 ORDER BY m.created_at, m.tenant_id",
    )
    .bind(user.user_id)
    .fetch_all(&mut *conn)
    .await?;
    let tenants = rows
        .into_iter()
        .filter_map(|(tenant_id, name, role)| {
            Role::parse(&role).map(|role| TenantMembership {
                tenant_id,
                name,
                role,
            })
        })
        .collect::<Vec<_>>();
    let current = tenants
        .iter()
        .find(|membership| membership.tenant_id == tenant.tenant_id)
        .ok_or(AuthError::Unauthenticated("the session has ended"))?;
    Ok(SessionView {
        user_id: user.user_id,
        email,
        tenant_id: current.tenant_id,
        tenant_name: current.name.clone(),
        role: current.role,
        tenants,
    })
}

/// Moves the signed-in caller's session to another of their tenants: a
/// refresh that lands elsewhere. The caller presents the session's current
/// refresh token, which is used up as by a refresh (the session it belongs
/// to can no longer be renewed; its access token lapses within minutes),
/// and gets a new session in `request.tenant_id` that ends when the old one
/// would. So an access token alone never becomes a longer session, and
/// switching never extends one. `tx` is the caller's authorised
/// transaction; the new session's audit row is the target tenant's.
pub async fn switch(
    mut tx: WriteTx,
    keys: &TokenKeys,
    principal: &Principal,
    request: SwitchRequest,
) -> Result<TokenResponse, AuthError> {
    let user = principal.user_session()?;
    let user_id = user.user_id;
    let presented = secret::parse::<2>(REFRESH_PREFIX, &request.refresh_token)
        .ok_or(AuthError::RefreshTokenInvalid)?;
    let token_id = RefreshTokenId::from(presented.ids[1]);
    // A refresh and a switch with one token cannot both succeed.
    let row = lock_refresh_token(&mut tx, token_id, user_id).await?;
    // Only this session's own refresh token moves it.
    let row = row
        .filter(|row| row.session_id == user.session_id && presented.matches(&row.secret_sha256))
        .ok_or(AuthError::RefreshTokenInvalid)?;
    let now = OffsetDateTime::now_utc();
    if row.revoked_at.is_some() || row.expires_at <= now || row.session_expires_at <= now {
        return Err(AuthError::RefreshTokenInvalid);
    }
    if row.used_at.is_some() {
        tracing::warn!(session_id = %row.session_id, "refresh token reused in a switch; revoking the session");
        revoke_and_commit(
            tx,
            user_id,
            row.tenant_id,
            row.session_id,
            "refresh_token_reused",
        )
        .await?;
        return Err(AuthError::RefreshTokenReused);
    }
    let target = request.tenant_id;
    let member: Option<TenantId> = sqlx::query_scalar(
        "SELECT tenant_id FROM memberships WHERE user_id = $1 AND tenant_id = $2",
    )
    .bind(user_id)
    .bind(target)
    .fetch_optional(tx.conn())
    .await?;
    if member.is_none() {
        return Err(AuthError::NotFound("tenant"));
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1")
        .bind(token_id)
        .execute(tx.conn())
        .await?;
    tx.enter_tenant(target, Some(user_id)).await?;
    tx.set_actor(Actor::User {
        user_id,
        tenant_id: target,
    });
    let session_id = SessionId::new();
    insert_session(&mut tx, session_id, user_id, target, row.session_expires_at).await?;
    let refresh =
        new_refresh_token(&mut tx, keys, user_id, session_id, row.session_expires_at).await?;
    let response = token_response(keys, user_id, target, session_id, refresh)?;
    // Which tenant the user came from is theirs, not this tenant's admins'.
    tx.commit(
        Audit::new(
            "session.create",
            Some(target),
            session_name(target, session_id),
        )
        .with_details(serde_json::json!({ "via": "switch" })),
    )
    .await?;
    Ok(response)
}

#[derive(sqlx::FromRow)]
struct PresentedRow {
    session_id: SessionId,
    secret_sha256: Vec<u8>,
    expires_at: OffsetDateTime,
    used_at: Option<OffsetDateTime>,
    tenant_id: TenantId,
    revoked_at: Option<OffsetDateTime>,
    session_expires_at: OffsetDateTime,
}

/// Revokes a session for `reason` and commits that (with its audit row).
async fn revoke_and_commit(
    mut tx: WriteTx,
    user_id: UserId,
    tenant_id: TenantId,
    session_id: SessionId,
    reason: &'static str,
) -> Result<(), AuthError> {
    sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = $2 WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(session_id)
    .bind(reason)
    .execute(tx.conn())
    .await?;
    tx.enter_tenant(tenant_id, Some(user_id)).await?;
    tx.set_actor(Actor::User { user_id, tenant_id });
    tx.commit(
        Audit::new(
            "session.revoke",
            Some(tenant_id),
            session_name(tenant_id, session_id),
        )
        .with_details(serde_json::json!({ "reason": reason })),
    )
    .await?;
    Ok(())
}

/// Exchanges a refresh token for a new access token and a new refresh
/// token. Presenting an already exchanged token revokes the session.
pub async fn refresh(
    db: &Db,
    keys: &TokenKeys,
    meta: RequestMeta,
    refresh_token: &str,
) -> Result<TokenResponse, AuthError> {
    let presented =
        secret::parse::<2>(REFRESH_PREFIX, refresh_token).ok_or(AuthError::RefreshTokenInvalid)?;
    let user_id = UserId::from(presented.ids[0]);
    let token_id = RefreshTokenId::from(presented.ids[1]);
    let mut tx = db.begin_tenant(meta, Scope::User { user_id }).await?;
    let row = lock_refresh_token(&mut tx, token_id, user_id).await?;
    let row = row
        .filter(|row| presented.matches(&row.secret_sha256))
        .ok_or(AuthError::RefreshTokenInvalid)?;
    let now = OffsetDateTime::now_utc();
    if row.revoked_at.is_some() {
        return Err(AuthError::RefreshTokenInvalid);
    }
    if row.used_at.is_some() {
        tracing::warn!(session_id = %row.session_id, "refresh token reused; revoking the session");
        revoke_and_commit(
            tx,
            user_id,
            row.tenant_id,
            row.session_id,
            "refresh_token_reused",
        )
        .await?;
        return Err(AuthError::RefreshTokenReused);
    }
    if row.expires_at <= now || row.session_expires_at <= now {
        return Err(AuthError::RefreshTokenInvalid);
    }
    // The membership the session was started in: a member removed and
    // invited back does not get their old sessions back.
    let still_member: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM memberships m JOIN sessions s ON s.id = $3
                        WHERE m.tenant_id = $1 AND m.user_id = $2 AND s.created_at >= m.created_at)",
    )
    .bind(row.tenant_id)
    .bind(user_id)
    .bind(row.session_id)
    .fetch_one(tx.conn())
    .await?;
    if !still_member {
        revoke_and_commit(
            tx,
            user_id,
            row.tenant_id,
            row.session_id,
            "membership_ended",
        )
        .await?;
        return Err(AuthError::RefreshTokenInvalid);
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1")
        .bind(token_id)
        .execute(tx.conn())
        .await?;
    let refresh = new_refresh_token(
        &mut tx,
        keys,
        user_id,
        row.session_id,
        row.session_expires_at,
    )
    .await?;
    let response = token_response(keys, user_id, row.tenant_id, row.session_id, refresh)?;
    tx.enter_tenant(row.tenant_id, Some(user_id)).await?;
    tx.set_actor(Actor::User {
        user_id,
        tenant_id: row.tenant_id,
    });
    tx.commit(Audit::new(
        "session.refresh",
        Some(row.tenant_id),
        session_name(row.tenant_id, row.session_id),
    ))
    .await?;
    Ok(response)
}

/// Ends the caller's session: its access and refresh tokens stop working.
pub async fn logout(tx: WriteTx, principal: &Principal) -> Result<(), AuthError> {
    let user = principal.user_session()?;
    revoke_and_commit(
        tx,
        user.user_id,
        principal.tenant_id,
        user.session_id,
        "logout",
    )
    .await
}

/// Changes the caller's password after checking the current one, and ends
/// every other session of the user, in every tenant.
pub async fn password_change(
    mut tx: WriteTx,
    principal: &Principal,
    request: PasswordChangeRequest,
) -> Result<(), AuthError> {
    let user = principal.user_session()?;
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let stored: Option<String> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
            .bind(user.user_id)
            .fetch_optional(tx.conn())
            .await?;
    if !password::verify(request.current_password, stored).await? {
        return Err(AuthError::WrongPassword);
    }
    let new_hash = password::hash(request.new_password).await?;
    // The user's sessions before the user row, as account deletion locks
    // them: the two never wait on each other in a cycle.
    sqlx::query("SELECT FROM sessions WHERE user_id = $1 ORDER BY id FOR UPDATE")
        .bind(user.user_id)
        .execute(tx.conn())
        .await?;
    sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(user.user_id)
        .bind(&new_hash)
        .execute(tx.conn())
        .await?;
    let revoked = sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = 'password_changed'
         WHERE user_id = $1 AND id <> $2 AND revoked_at IS NULL",
    )
    .bind(user.user_id)
    .bind(user.session_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    tx.commit(
        Audit::new(
            "user.password_change",
            Some(principal.tenant_id),
            ResourceName::new(None, None, None, "user", user.user_id),
        )
        .with_details(serde_json::json!({ "other_sessions_revoked": revoked })),
    )
    .await?;
    Ok(())
}

/// Deletes the caller's own account, in every tenant at once: after the
/// password again, and only if no tenant would be left without an owner.
/// The user row goes, and with it (ON DELETE CASCADE) every membership,
/// session, refresh token, project grant and API token: every token the
/// user holds fails its next request. Each tenant's audit log records it.
///
/// `tx` is a system transaction: the owners of the user's other tenants
/// are invisible to a tenant transaction, and the last-owner check needs
/// them locked.
pub async fn account_delete(
    mut tx: WriteTx,
    principal: &Principal,
    request: AccountDeleteRequest,
) -> Result<(), AuthError> {
    let user = principal.user_session()?;
    // The password first, holding no lock (hashing is slow).
    let stored: Option<String> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
            .bind(user.user_id)
            .fetch_optional(tx.conn())
            .await?;
    if !password::verify(request.current_password, stored.clone()).await? {
        return Err(AuthError::WrongPassword);
    }
    // Then the rows the delete cascades to, in the order a refresh locks
    // them (refresh token, then session), before the user row that a
    // refresh's insert waits on: a refresh running now either finishes
    // first or finds its rows gone, and neither waits on the other in a
    // cycle.
    sqlx::query("SELECT FROM refresh_tokens WHERE user_id = $1 ORDER BY id FOR UPDATE")
        .bind(user.user_id)
        .execute(tx.conn())
        .await?;
    sqlx::query("SELECT FROM sessions WHERE user_id = $1 ORDER BY id FOR UPDATE")
        .bind(user.user_id)
        .execute(tx.conn())
        .await?;
    let locked: Option<String> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1 FOR UPDATE")
            .bind(user.user_id)
            .fetch_optional(tx.conn())
            .await?;
    if locked.is_none() || locked != stored {
        // Changed (or gone) while the password was being checked.
        return Err(AuthError::WrongPassword);
    }
    // The user's memberships and every owner of their tenants, locked in
    // (tenant, user) order as member changes lock them within a tenant.
    let rows: Vec<(TenantId, UserId, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, user_id, role, version FROM memberships
         WHERE tenant_id IN (SELECT tenant_id FROM memberships WHERE user_id = $1)
           AND (role = 'owner' OR user_id = $1)
         ORDER BY tenant_id, user_id FOR UPDATE",
    )
    .bind(user.user_id)
    .fetch_all(tx.conn())
    .await?;
    let memberships: Vec<(TenantId, &str, i64)> = rows
        .iter()
        .filter(|(_, user_id, _, _)| *user_id == user.user_id)
        .map(|(tenant_id, _, role, version)| (*tenant_id, role.as_str(), *version))
        .collect();
    for (tenant_id, role, _) in &memberships {
        let other_owners = rows
            .iter()
            .filter(|(t, u, r, _)| t == tenant_id && *u != user.user_id && r == "owner")
            .count();
        if *role == "owner" && other_owners == 0 {
            return Err(AuthError::LastOwnerOfATenant);
        }
    }
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(user.user_id)
        .execute(tx.conn())
        .await?;
    for (tenant_id, role, version) in &memberships {
        let name = member_name(*tenant_id, user.user_id);
        tx.emit(NewEvent::new(
            "member.removed",
            "member",
            user.user_id.as_uuid(),
            version + 1,
            Some(*tenant_id),
            name.clone(),
            serde_json::json!({ "user_id": user.user_id, "left": true, "account_deleted": true }),
        ));
        if *tenant_id != principal.tenant_id {
            // Named as this tenant knows them, not by the tenant they
            // were signed in to.
            tx.audit(
                Audit::new("user.delete", Some(*tenant_id), name)
                    .with_details(serde_json::json!({ "role": role }))
                    .by(Actor::User {
                        user_id: user.user_id,
                        tenant_id: *tenant_id,
                    }),
            );
        }
    }
    let role = memberships
        .iter()
        .find(|(tenant_id, _, _)| *tenant_id == principal.tenant_id)
        .map(|(_, role, _)| *role);
    tx.commit(
        Audit::new(
            "user.delete",
            Some(principal.tenant_id),
            member_name(principal.tenant_id, user.user_id),
        )
        .with_details(serde_json::json!({ "role": role, "tenants": memberships.len() })),
    )
    .await?;
    Ok(())
}
