//! Request and response bodies of the identity endpoints, and validation.

use keel_core::ResourceName;
use keel_core::ids::{InvitationId, ProjectId, TenantId, UserId};

use crate::Role;
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const PASSWORD_MIN_LEN: usize = 10;
pub const PASSWORD_MAX_LEN: usize = 128;
/// The longest email address (RFC 5321's path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// `POST /v1/auth/register`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Login email; unique, compared case-insensitively.
    #[schema(example = "ada@example.com")]
    pub email: String,
    /// 10 to 128 characters.
    pub password: String,
    /// Name of the organisation (tenant) to create.
    #[schema(example = "Analytical Engines Ltd")]
    pub tenant_name: String,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("email", &self.email)
            .field("password", &"[REDACTED]")
            .field("tenant_name", &self.tenant_name)
            .finish()
    }
}

pub(crate) fn field(field: &str, code: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

/// A plausible email: one `@`, something on each side, a dot in the
/// domain, no whitespace. Deliverability is the mail server's business.
pub(crate) fn email_is_plausible(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
        && (3..=254).contains(&email.len())
}

/// Characters that change how text displays without being visible:
/// zero-width characters, bidirectional overrides and isolates, the BOM.
/// A name containing one can impersonate another name in a list.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2069}'
        | '\u{FEFF}'
        | '\u{00AD}')
}

/// The rules for a name people read (tenants, projects, service accounts,
/// tokens): 1–100 characters after trimming, no control characters, no
/// invisible formatting characters.
pub(crate) fn display_name_errors(name_field: &str, value: &str) -> Option<FieldError> {
    let value = value.trim();
    if value.is_empty() {
        Some(field(name_field, "required", "must not be empty"))
    } else if value.chars().count() > 100 {
        Some(field(
            name_field,
            "too_long",
            "must be at most 100 characters",
        ))
    } else if value
        .chars()
        .any(|c| c.is_control() || is_invisible_format(c))
    {
        Some(field(
            name_field,
            "invalid",
            "must not contain control or invisible formatting characters",
        ))
    } else {
        None
    }
}

/// The password rules, shared by registration and password change.
pub(crate) fn password_errors(name: &str, password: &str) -> Option<FieldError> {
    let len = password.chars().count();
    if len < PASSWORD_MIN_LEN {
        Some(field(name, "too_short", "must be at least 10 characters"))
    } else if len > PASSWORD_MAX_LEN {
        Some(field(name, "too_long", "must be at most 128 characters"))
    } else {
        None
    }
}

impl RegisterRequest {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !email_is_plausible(&self.email) {
            errors.push(field("email", "invalid", "must be an email address"));
        }
        errors.extend(password_errors("password", &self.password));
        errors.extend(display_name_errors("tenant_name", &self.tenant_name));
        errors
    }
}

/// The result of registration.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub user_id: UserId,
    pub tenant_id: TenantId,
    /// The tenant's first project, named `default`.
    pub project_id: ProjectId,
}

/// `POST /v1/auth/login`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// The tenant to act in; defaults to the user's oldest membership.
    #[serde(default)]
    pub tenant_id: Option<TenantId>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("email", &self.email)
            .field("password", &"[REDACTED]")
            .field("tenant_id", &self.tenant_id)
            .finish()
    }
}

/// An access token and the refresh token of its session (RFC 6749 §5.1
/// shape).
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u32,
    /// Exchange it at `POST /v1/auth/refresh` for new tokens; each refresh
    /// token works once.
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: i64,
    /// The tenant this session acts in.
    pub tenant_id: TenantId,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/auth/session`: who the caller is, where they act, and where
/// else they could (a console's tenant switcher).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub user_id: UserId,
    pub email: String,
    /// The tenant this session acts in.
    pub tenant_id: TenantId,
    pub tenant_name: String,
    /// The caller's role in it.
    pub role: Role,
    /// Every tenant the user belongs to, this one included, oldest
    /// membership first.
    pub tenants: Vec<TenantMembership>,
}

/// One of the user's tenants.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TenantMembership {
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
}

/// `POST /v1/auth/switch`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    /// One of the caller's tenants (`GET /v1/auth/session` lists them).
    pub tenant_id: TenantId,
    /// The current session's refresh token: used up by the switch, as by
    /// a refresh.
    pub refresh_token: String,
}

impl std::fmt::Debug for SwitchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchRequest")
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/auth/refresh`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

impl std::fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshRequest { .. }")
    }
}

/// `POST /v1/auth/password`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChangeRequest {
    pub current_password: String,
    /// 10 to 128 characters.
    pub new_password: String,
}

impl std::fmt::Debug for PasswordChangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChangeRequest { .. }")
    }
}

impl PasswordChangeRequest {
    pub fn validate(&self) -> Vec<FieldError> {
        password_errors("new_password", &self.new_password)
            .into_iter()
            .collect()
    }
}

/// `POST /v1/auth/delete-account`: the password again, as for a password
/// change.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountDeleteRequest {
    pub current_password: String,
}

impl std::fmt::Debug for AccountDeleteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountDeleteRequest { .. }")
    }
}

/// A project row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Project {
    pub id: ProjectId,
    pub tenant_id: TenantId,
    pub name: String,
    pub created_at: OffsetDateTime,
    pub version: i64,
}

impl Project {
    pub fn resource_name(&self) -> ResourceName {
        ResourceName::project(self.tenant_id, self.id)
    }
}

/// A project as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectView {
    pub id: ProjectId,
    pub tenant_id: TenantId,
    pub name: String,
    /// Canonical resource name, as in audit rows and events.
    #[schema(example = "krn:keel::0190…::0190…:project/0190…")]
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Increases with every change; also the `ETag`.
    pub version: i64,
}

impl From<Project> for ProjectView {
    fn from(project: Project) -> Self {
        Self {
            resource_name: project.resource_name().to_string(),
            id: project.id,
            tenant_id: project.tenant_id,
            name: project.name,
            created_at: project.created_at,
            version: project.version,
        }
    }
}

/// `POST /v1/projects` and `PATCH /v1/projects/{project_id}`.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectRequest {
    /// 1–100 characters, unique among the tenant's projects
    /// (case-insensitively).
    #[schema(example = "research")]
    pub name: String,
}

impl ProjectRequest {
    pub fn validate(&self) -> Vec<FieldError> {
        display_name_errors("name", &self.name)
            .into_iter()
            .collect()
    }
}

/// A member of the tenant.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct MemberView {
    pub user_id: UserId,
    pub email: String,
    pub role: Role,
    /// Canonical resource name, as in audit rows and events.
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub joined_at: OffsetDateTime,
    /// Increases with every change; also the `ETag`.
    pub version: i64,
}

/// `PATCH /v1/members/{user_id}`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberUpdateRequest {
    pub role: Role,
}

/// `POST /v1/invitations`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationRequest {
    #[schema(example = "grace@example.com")]
    pub email: String,
    pub role: Role,
}

impl InvitationRequest {
    pub fn validate(&self) -> Vec<FieldError> {
        if email_is_plausible(self.email.trim()) {
            Vec::new()
        } else {
            vec![field("email", "invalid", "must be an email address")]
        }
    }
}

/// An open invitation.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct InvitationView {
    pub id: InvitationId,
    pub email: String,
    pub role: Role,
    /// The member who invited (null if their account is gone).
    pub invited_by: Option<UserId>,
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
}

/// A new invitation and its token, shown only in this response.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct InvitationCreated {
    pub invitation: InvitationView,
    /// Give it to the invitee, who accepts it at
    /// `POST /v1/invitations/accept` while signed in with the invited email.
    pub token: String,
}

impl std::fmt::Debug for InvitationCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvitationCreated")
            .field("invitation", &self.invitation)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/invitations/accept`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationAcceptRequest {
    pub token: String,
}

impl std::fmt::Debug for InvitationAcceptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InvitationAcceptRequest { .. }")
    }
}

/// `PUT /v1/projects/{project_id}/grants/{user_id}`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// `admin`, `member` or `viewer`.
    pub role: Role,
}

/// A member's role on one project, on top of their tenant role.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectGrantView {
    pub project_id: ProjectId,
    pub user_id: UserId,
    pub role: Role,
    pub resource_name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(email: &str, password: &str, tenant: &str) -> RegisterRequest {
        RegisterRequest {
            email: email.into(),
            password: password.into(),
            tenant_name: tenant.into(),
        }
    }

    #[test]
    fn a_good_registration_has_no_field_errors() {
        assert!(
            request("ada@example.com", "long enough pw", "Acme")
                .validate()
                .is_empty()
        );
    }

    #[test]
    fn every_bad_field_is_reported_by_name() {
        let fields: Vec<String> = request("nope", "short", " ")
            .validate()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["email", "password", "tenant_name"]);
    }

    #[test]
    fn implausible_emails_are_refused() {
        for email in ["a@b", "@b.c", "a b@c.d", "a@.c", "a@c.", "a@b@c.d"] {
            assert!(!email_is_plausible(email), "{email}");
        }
        assert!(email_is_plausible("a+tag@sub.example.org"));
    }

    #[test]
    fn names_with_invisible_or_control_characters_are_refused() {
        for name in [
            "evil\u{202E}gnp.exe",
            "zero\u{200B}width",
            "bell\u{7}",
            "\u{FEFF}bom",
        ] {
            assert_eq!(
                display_name_errors("name", name).map(|e| e.code),
                Some("invalid".to_owned()),
                "{name:?}"
            );
        }
        assert!(display_name_errors("name", "Ünïcödé 日本 ok").is_none());
    }

    #[test]
    fn passwords_never_appear_in_debug_output() {
        let debug = format!("{:?}", request("a@b.c", "hunter2hunter2", "x"));
        assert!(!debug.contains("hunter2"));
    }
}
