//! Authorisation: ONE decision function, [`decide`], for every request,
//! and lookups that return already-authorised handles.
//!
//! Deny by default: an action is allowed only if [`decide`] lists it for
//! the caller's role. A caller who may not even read a resource gets 404
//! (never 403, which would confirm that it exists); a caller who may read
//! it but not do this to it gets 403.

use keel_core::ids::{ProjectId, TenantId, UserId};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, FromRow, PgConnection};

use crate::context::Caller;
use crate::{AuthError, Principal};

/// A member's role in a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
}

impl Role {
    pub const ALL: &'static [Role] = &[Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// Owner > admin > member > viewer.
    fn rank(self) -> u8 {
        match self {
            Role::Owner => 3,
            Role::Admin => 2,
            Role::Member => 1,
            Role::Viewer => 0,
        }
    }

    /// The stronger of two roles (a project grant never lowers a tenant
    /// role).
    pub fn max(self, other: Role) -> Role {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// A platform operator's role. Operators are never tenant members; tenant
/// roles never reach the admin api.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlatformRole {
    Operator,
    ReadOnlyOperator,
}

impl PlatformRole {
    pub const ALL: &'static [PlatformRole] =
        &[PlatformRole::Operator, PlatformRole::ReadOnlyOperator];

    pub fn as_str(self) -> &'static str {
        match self {
            PlatformRole::Operator => "operator",
            PlatformRole::ReadOnlyOperator => "read_only_operator",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "operator" => Some(PlatformRole::Operator),
            "read_only_operator" => Some(PlatformRole::ReadOnlyOperator),
            _ => None,
        }
    }
}

/// Whoever is asking, as the decision sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A member signed in interactively.
    Tenant(Role),
    /// A member through a personal API token: their role, minus tenant
    /// administration and self-service.
    ApiToken(Role),
    /// A project's service account with its project role: the same, minus
    /// anything outside its project.
    ServiceAccount(Role),
    /// An operator acting on the platform.
    Platform(PlatformRole),
}

impl From<Role> for Subject {
    fn from(role: Role) -> Self {
        Subject::Tenant(role)
    }
}

impl From<PlatformRole> for Subject {
    fn from(role: PlatformRole) -> Self {
        Subject::Platform(role)
    }
}

impl Subject {
    /// Every column of the matrix.
    fn all() -> Vec<Subject> {
        let delegated = [Role::Admin, Role::Member, Role::Viewer];
        Role::ALL
            .iter()
            .map(|role| Subject::Tenant(*role))
            .chain(Role::ALL.iter().map(|role| Subject::ApiToken(*role)))
            .chain(delegated.iter().map(|role| Subject::ServiceAccount(*role)))
            .chain(
                PlatformRole::ALL
                    .iter()
                    .map(|role| Subject::Platform(*role)),
            )
            .collect()
    }

    fn label(self) -> String {
        match self {
            Subject::Tenant(role) => role.as_str().to_owned(),
            Subject::ApiToken(role) => format!("token:{}", role.as_str()),
            Subject::ServiceAccount(role) => format!("sa:{}", role.as_str()),
            Subject::Platform(role) => role.as_str().to_owned(),
        }
    }
}

/// Declares [`Action`] and [`Action::ALL`] from one list, so the matrix
/// snapshot can never miss a variant.
macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident),+ $(,)?) => {
        /// Everything a principal can ask to do. Named `<resource>_<verb>`,
        /// like the handlers and operation ids.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Action {
            $($(#[$doc])* $name),+
        }

        impl Action {
            /// Every action, in declaration order.
            pub const ALL: &'static [Action] = &[$(Action::$name),+];
        }
    };
}

actions! {
    /// Who the caller is, where they act, and their other tenants.
    SessionRead,
    /// A new session in another of the caller's tenants.
    SessionSwitch,
    SessionEnd,
    PasswordChange,
    /// Deleting one's own user account (every membership with it).
    AccountDelete,
    AuditRead,
    MemberList,
    MemberUpdate,
    MemberRemove,
    MemberLeave,
    /// Granting, changing or taking away the owner role.
    OwnerManage,
    InvitationList,
    InvitationCreate,
    InvitationRevoke,
    InvitationAccept,
    ProjectGrantList,
    ProjectGrantManage,
    ServiceAccountList,
    ServiceAccountManage,
    ApiTokenList,
    ApiTokenManage,
    FlavorList,
    RegionList,
    /// How many of each flavor can launch now, per region.
    AvailabilityRead,
    /// The tenant's or a project's quota and usage.
    QuotaRead,
    ProjectList,
    ProjectRead,
    ProjectCreate,
    ProjectUpdate,
    ProjectDelete,
    AllocationList,
    AllocationRead,
    AllocationCreate,
    AllocationTerminate,
    AllocationStop,
    AllocationStart,
    /// Open a terminal into a running allocation's workload.
    AllocationTerminal,
    /// The prices (rate cards) in effect and scheduled.
    PriceList,
    /// The tenant's invoices, usage and credit.
    BillingRead,
    /// Pay: buy credit or pay an invoice through the payment provider.
    BillingPay,
    AdminSessionEnd,
    AdminOperatorList,
    AdminOperatorCreate,
    AdminTenantList,
    AdminAuditVerify,
    AdminHostList,
    AdminHostRevoke,
    /// Cordon, uncordon and drain hosts.
    AdminHostManage,
    AdminFlavorList,
    /// Create and retire flavors.
    AdminFlavorManage,
    /// Create regions.
    AdminRegionManage,
    AdminQuotaRead,
    /// Set tenants', projects' and the default quotas.
    AdminQuotaManage,
    /// Run the allocation reconciler now.
    AdminReconcile,
    /// Rate cards, invoices, credit and the billing reconciliation.
    AdminBillingRead,
    /// Add rate cards; draft, finalize, void and mark invoices paid; grant
    /// credit.
    AdminBillingManage,
}

impl Action {
    /// The action that decides whether the caller may see the resource at
    /// all (for the 404-versus-403 choice).
    fn read_action(self) -> Action {
        match self {
            Action::FlavorList
            | Action::RegionList
            | Action::AvailabilityRead
            | Action::PriceList
            | Action::BillingRead => self,
            Action::BillingPay => Action::BillingRead,
            Action::AdminSessionEnd
            | Action::AdminOperatorList
            | Action::AdminOperatorCreate
            | Action::AdminTenantList
            | Action::AdminAuditVerify
            | Action::AdminHostList
            | Action::AdminHostRevoke
            | Action::AdminHostManage
            | Action::AdminFlavorList
            | Action::AdminFlavorManage
            | Action::AdminRegionManage
            | Action::AdminQuotaRead
            | Action::AdminQuotaManage
            | Action::AdminReconcile
            | Action::AdminBillingRead
            | Action::AdminBillingManage => self,
            Action::QuotaRead => Action::ProjectRead,
            Action::SessionRead => Action::SessionRead,
            Action::SessionSwitch => Action::SessionSwitch,
            Action::SessionEnd => Action::SessionEnd,
            Action::PasswordChange => Action::PasswordChange,
            Action::AccountDelete => Action::AccountDelete,
            Action::MemberLeave => Action::MemberLeave,
            Action::InvitationAccept => Action::InvitationAccept,
            Action::MemberList
            | Action::MemberUpdate
            | Action::MemberRemove
            | Action::OwnerManage => Action::MemberList,
            Action::InvitationList | Action::InvitationCreate | Action::InvitationRevoke => {
                Action::InvitationList
            }
            Action::ProjectGrantList
            | Action::ProjectGrantManage
            | Action::ServiceAccountList
            | Action::ServiceAccountManage => Action::ProjectRead,
            Action::ApiTokenList | Action::ApiTokenManage => Action::ApiTokenList,
            Action::AuditRead => Action::AuditRead,
            Action::ProjectList
            | Action::ProjectRead
            | Action::ProjectCreate
            | Action::ProjectUpdate
            | Action::ProjectDelete => Action::ProjectRead,
            Action::AllocationList
            | Action::AllocationRead
            | Action::AllocationCreate
            | Action::AllocationTerminate
            | Action::AllocationStop
            | Action::AllocationStart
            | Action::AllocationTerminal => Action::AllocationRead,
        }
    }
}

/// The whole role × action matrix as text, one line per action: the
/// committed snapshot `authz-matrix.txt` is compared with it by a test.
pub fn matrix() -> String {
    let subjects = Subject::all();
    let mut out = format!("{:<22}", "action");
    for subject in &subjects {
        out.push_str(&format!(" {:<18}", subject.label()));
    }
    out = out.trim_end().to_owned();
    out.push('\n');
    for action in Action::ALL {
        let mut line = format!("{:<22}", format!("{action:?}"));
        for subject in &subjects {
            line.push_str(&format!(
                " {:<18}",
                if decide(*subject, *action) {
                    "allow"
                } else {
                    "deny"
                }
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What every member may do, viewers included: read, and manage
/// themselves.
const VIEWER: &[Action] = &[
    Action::SessionRead,
    Action::SessionSwitch,
    Action::SessionEnd,
    Action::PasswordChange,
    Action::AccountDelete,
    Action::FlavorList,
    Action::RegionList,
    Action::AvailabilityRead,
    Action::PriceList,
    Action::QuotaRead,
    Action::ProjectList,
    Action::ProjectRead,
    Action::AllocationList,
    Action::AllocationRead,
    Action::MemberList,
    Action::MemberLeave,
    Action::InvitationAccept,
    Action::ApiTokenList,
    Action::ApiTokenManage,
];

/// Members also run workloads.
const MEMBER: &[Action] = &[
    Action::AllocationCreate,
    Action::AllocationTerminate,
    Action::AllocationStop,
    Action::AllocationStart,
    Action::AllocationTerminal,
];

/// Admins administer the tenant, except for the owner role.
const ADMIN: &[Action] = &[
    Action::AuditRead,
    Action::BillingRead,
    Action::BillingPay,
    Action::ProjectCreate,
    Action::ProjectUpdate,
    Action::ProjectDelete,
    Action::MemberUpdate,
    Action::MemberRemove,
    Action::InvitationList,
    Action::InvitationCreate,
    Action::InvitationRevoke,
    Action::ProjectGrantList,
    Action::ProjectGrantManage,
    Action::ServiceAccountList,
    Action::ServiceAccountManage,
];

/// What a role may hand to a token or a service account: the work, never
/// the administration of the tenant or of anyone's access.
const DELEGABLE: &[Action] = &[
    Action::FlavorList,
    Action::RegionList,
    Action::AvailabilityRead,
    Action::PriceList,
    Action::QuotaRead,
    Action::ProjectList,
    Action::ProjectRead,
    Action::ProjectUpdate,
    Action::ProjectDelete,
    Action::AllocationList,
    Action::AllocationRead,
    Action::AllocationCreate,
    Action::AllocationTerminate,
    Action::AllocationStop,
    Action::AllocationStart,
    Action::AllocationTerminal,
];

/// Owners alone hand out and take away ownership.
const OWNER: &[Action] = &[Action::OwnerManage];

/// What read-only operators may do: look.
const READ_ONLY_OPERATOR: &[Action] = &[
    Action::AdminSessionEnd,
    Action::AdminOperatorList,
    Action::AdminTenantList,
    Action::AdminAuditVerify,
    Action::AdminHostList,
    Action::AdminFlavorList,
    Action::AdminQuotaRead,
    Action::AdminBillingRead,
];

/// Operators also manage the platform.
const OPERATOR: &[Action] = &[
    Action::AdminOperatorCreate,
    Action::AdminHostRevoke,
    Action::AdminHostManage,
    Action::AdminFlavorManage,
    Action::AdminRegionManage,
    Action::AdminQuotaManage,
    Action::AdminReconcile,
    Action::AdminBillingManage,
];

/// The decision: may `subject` (a tenant role or a platform role) do
/// `action`? Pure, total, and the only place this is answered. Deny by
/// default: an action no list names is allowed to nobody. Tenant roles
/// never get an admin action, and operators never a tenant action.
pub fn decide(subject: impl Into<Subject>, action: Action) -> bool {
    fn tenant_lists(role: Role) -> &'static [&'static [Action]] {
        match role {
            Role::Owner => &[VIEWER, MEMBER, ADMIN, OWNER],
            Role::Admin => &[VIEWER, MEMBER, ADMIN],
            Role::Member => &[VIEWER, MEMBER],
            Role::Viewer => &[VIEWER],
        }
    }
    let allowed = |lists: &[&[Action]]| lists.iter().any(|list| list.contains(&action));
    match subject.into() {
        Subject::Tenant(role) => allowed(tenant_lists(role)),
        Subject::ApiToken(role) => DELEGABLE.contains(&action) && allowed(tenant_lists(role)),
        // A service account lives in one project: no tenant-wide listing.
        Subject::ServiceAccount(role) => {
            DELEGABLE.contains(&action)
                && action != Action::ProjectList
                && allowed(tenant_lists(role))
        }
        Subject::Platform(PlatformRole::Operator) => allowed(&[READ_ONLY_OPERATOR, OPERATOR]),
        Subject::Platform(PlatformRole::ReadOnlyOperator) => allowed(&[READ_ONLY_OPERATOR]),
    }
}

/// Proof that the caller may perform `action` on this project. Functions
/// that touch a project's resources take this, never a bare id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectHandle {
    pub tenant_id: TenantId,
    pub project_id: ProjectId,
    pub caller: Caller,
    /// The caller's effective role on the project (tenant role raised by a
    /// project grant, or a service account's project role).
    pub role: Role,
    pub action: Action,
}

/// Proof that the caller may perform a tenant-wide `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantHandle {
    pub tenant_id: TenantId,
    pub caller: Caller,
    pub subject: Subject,
}

impl TenantHandle {
    /// Whether the caller may also do `action` (for a second,
    /// data-dependent check such as touching an owner).
    pub fn may(&self, action: Action) -> bool {
        decide(self.subject, action)
    }

    /// The user behind the caller (403 for a service account).
    pub fn user_id(&self) -> Result<UserId, AuthError> {
        match self.caller {
            Caller::User { user_id, .. } | Caller::ApiToken { user_id, .. } => Ok(user_id),
            Caller::ServiceAccount { .. } => {
                Err(AuthError::Forbidden("a service account cannot do this"))
            }
        }
    }
}

const SESSION_ENDED: AuthError = AuthError::Unauthenticated(
    "the session or token has ended, or its tenant membership no longer exists",
);

/// What the database says about the caller (and, for a project, about the
/// project): the row of `caller_standing(…)` (migrations/0011), one
/// statement whichever kind of caller.
#[derive(sqlx::FromRow)]
struct StandingRow {
    role: String,
    grant_role: Option<String>,
    project_visible: bool,
}

struct Standing {
    role: Role,
    /// A project grant (users) raising the role on the project.
    grant: Option<Role>,
    /// Whether the project exists and is within the caller's reach.
    project_visible: bool,
}

impl StandingRow {
    fn parse(self) -> Result<Standing, AuthError> {
        Ok(Standing {
            role: Role::parse(&self.role).ok_or(SESSION_ENDED)?,
            grant: self.grant_role.as_deref().and_then(Role::parse),
            project_visible: self.project_visible,
        })
    }
}

/// Statements calling `caller_standing(…)` (migrations/0011), one per kind
/// of caller: `[user, API token, service account]`. The kind is a literal,
/// so that each kind gets its own prepared statement whose plan keeps only
/// its branch of the function (with the kind as a parameter, Postgres
/// re-plans all three branches on every call). The arguments are `$1` the
/// tenant, `$2` the user or service account, `$3` the credential, `$4` the
/// project (bound by [`standing_args`]).
macro_rules! with_standing {
    ($before:literal, $after:literal) => {
        [
            concat!($before, "caller_standing('user', $1, $2, $3, $4)", $after),
            concat!(
                $before,
                "caller_standing('api_token', $1, $2, $3, $4)",
                $after
            ),
            concat!(
                $before,
                "caller_standing('service_account', $1, $2, $3, $4)",
                $after
            ),
        ]
    };
}

pub(crate) use with_standing;

/// The statements (see [`with_standing!`]) that read the caller's standing.
const STANDING: [&str; 3] = with_standing!("SELECT role, grant_role, project_visible FROM ", "");

/// Which of a [`with_standing!`] statement's variants is this caller's,
/// and its arguments.
fn standing_args(
    principal: &Principal,
    project_id: Option<ProjectId>,
) -> Result<(usize, PgArguments), AuthError> {
    let (variant, who, credential) = match principal.caller {
        Caller::User {
            user_id,
            session_id,
        } => (0, user_id.as_uuid(), session_id.as_uuid()),
        Caller::ApiToken { user_id, token_id } => (1, user_id.as_uuid(), token_id.as_uuid()),
        Caller::ServiceAccount {
            service_account_id,
            key_id,
        } => (2, service_account_id.as_uuid(), key_id.as_uuid()),
    };
    let mut args = PgArguments::default();
    let encoded = args
        .add(principal.tenant_id)
        .and_then(|()| args.add(who))
        .and_then(|()| args.add(credential))
        .and_then(|()| args.add(project_id));
    encoded.map_err(|error| AuthError::from(sqlx::Error::Encode(error)))?;
    Ok((variant, args))
}

async fn standing(
    conn: &mut PgConnection,
    principal: &Principal,
    project_id: Option<ProjectId>,
) -> Result<Standing, AuthError> {
    let (variant, args) = standing_args(principal, project_id)?;
    sqlx::query_as_with::<_, StandingRow, _>(STANDING[variant], args)
        .fetch_optional(conn)
        .await?
        .ok_or(SESSION_ENDED)?
        .parse()
}

/// Checks only that the caller's credential is live (the idempotency layer
/// asks before replaying a stored response).
pub async fn ensure_live(conn: &mut PgConnection, principal: &Principal) -> Result<(), AuthError> {
    standing(conn, principal, None).await.map(|_| ())
}

fn subject_of(caller: Caller, role: Role) -> Subject {
    match caller {
        Caller::User { .. } => Subject::Tenant(role),
        Caller::ApiToken { .. } => Subject::ApiToken(role),
        Caller::ServiceAccount { .. } => Subject::ServiceAccount(role),
    }
}

/// Authorises a tenant-wide action (e.g. listing projects). The caller's
/// standing is read in the same transaction as the work it guards.
pub async fn authorize_tenant(
    conn: &mut PgConnection,
    principal: &Principal,
    action: Action,
) -> Result<TenantHandle, AuthError> {
    let standing = standing(conn, principal, None).await?;
    let subject = subject_of(principal.caller, standing.role);
    if !decide(subject, action) {
        return Err(AuthError::Forbidden("your role does not allow this"));
    }
    Ok(TenantHandle {
        tenant_id: principal.tenant_id,
        caller: principal.caller,
        subject,
    })
}

/// Authorises `action` on a project: 404 when the project does not exist
/// or is not visible to the caller, 403 when it is visible but the action
/// is not allowed. Row-level security already hides other tenants'
/// projects; the tenant filter is the application's half of the double
/// isolation.
pub async fn authorize_project(
    conn: &mut PgConnection,
    principal: &Principal,
    action: Action,
    project_id: ProjectId,
) -> Result<ProjectHandle, AuthError> {
    let standing = standing(conn, principal, Some(project_id)).await?;
    judge_project(standing, principal, action, project_id)
}

/// [`authorize_project`] and a read of the project's rows in ONE
/// statement, which returns `T` when the caller may do `action`. `sql`,
/// made by [`with_standing!`], selects `s.role, s.grant_role,
/// s.project_visible` and `T`'s columns `FROM caller_standing(…) s LEFT
/// JOIN … ON s.project_visible AND …` (`$1` the tenant, `$4` the project);
/// the row of a project the caller cannot see is never decoded. For reads
/// of one row (`fetch_optional`).
pub async fn authorize_project_read<T>(
    conn: &mut PgConnection,
    principal: &Principal,
    action: Action,
    project_id: ProjectId,
    sql: &[&'static str; 3],
) -> Result<(ProjectHandle, T), AuthError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    let (variant, args) = standing_args(principal, Some(project_id))?;
    let row = sqlx::query_with(sql[variant], args)
        .fetch_optional(conn)
        .await?
        .ok_or(SESSION_ENDED)?;
    let standing = StandingRow::from_row(&row)?.parse()?;
    let project = judge_project(standing, principal, action, project_id)?;
    Ok((project, T::from_row(&row)?))
}

fn judge_project(
    standing: Standing,
    principal: &Principal,
    action: Action,
    project_id: ProjectId,
) -> Result<ProjectHandle, AuthError> {
    let role = match standing.grant {
        Some(granted) => standing.role.max(granted),
        None => standing.role,
    };
    let subject = subject_of(principal.caller, role);
    if !standing.project_visible || !decide(subject, action.read_action()) {
        return Err(AuthError::NotFound("project"));
    }
    if !decide(subject, action) {
        return Err(AuthError::Forbidden("your role does not allow this"));
    }
    Ok(ProjectHandle {
        tenant_id: principal.tenant_id,
        project_id,
        caller: principal.caller,
        role,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_action_matrix_matches_its_committed_snapshot() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/authz-matrix.txt");
        let produced = matrix();
        if std::env::var_os("KEEL_UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &produced).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == produced,
            "the authorisation matrix changed; review it, then run with KEEL_UPDATE_SNAPSHOTS=1:\n{produced}"
        );
    }

    #[test]
    fn owners_may_do_every_tenant_action_and_viewers_only_read() {
        for &action in Action::ALL {
            let admin_action = format!("{action:?}").starts_with("Admin");
            assert_eq!(decide(Role::Owner, action), !admin_action, "{action:?}");
            if !admin_action {
                assert!(!decide(PlatformRole::Operator, action), "{action:?}");
            }
        }
        assert!(decide(Role::Viewer, Action::AllocationRead));
        assert!(!decide(Role::Viewer, Action::AllocationCreate));
        assert!(!decide(Role::Viewer, Action::AllocationTerminate));
    }
}
