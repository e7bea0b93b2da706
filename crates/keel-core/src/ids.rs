//! Typed ids. Every id is a UUID (v7, so ids sort by creation time), but a
//! `ProjectId` can never be passed where an `AllocationId` is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
            Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(value: Uuid) -> Self {
                Self(value)
            }
        }
    };
}

typed_id!(
    /// A tenant: the organisation that owns projects and pays the bills.
    TenantId
);
typed_id!(
    /// A project inside a tenant: the unit that owns allocations.
    ProjectId
);
typed_id!(
    /// A person who logs in with an email and a password.
    UserId
);
typed_id!(
    /// An allocation: one workload of one flavor placed on one host.
    AllocationId
);
typed_id!(
    /// A compute host, enrolled by its node agent.
    HostId
);
typed_id!(
    /// A one-time join token an operator hands to a new host.
    JoinTokenId
);
typed_id!(
    /// One outbox event.
    EventId
);
typed_id!(
    /// One signed task sent to a node agent.
    TaskId
);
typed_id!(
    /// One login of a user into a tenant; the family of its refresh tokens.
    SessionId
);
typed_id!(
    /// One refresh token of a session.
    RefreshTokenId
);
typed_id!(
    /// An invitation to join a tenant.
    InvitationId
);
typed_id!(
    /// A platform operator.
    OperatorId
);
typed_id!(
    /// A project's service account (a non-human principal).
    ServiceAccountId
);
typed_id!(
    /// One key of a service account.
    ServiceAccountKeyId
);
typed_id!(
    /// A user's personal API token.
    ApiTokenId
);
typed_id!(
    /// One login of an operator.
    OperatorSessionId
);
typed_id!(
    /// A price for one flavor in one region over a span of time.
    RateCardId
);
typed_id!(
    /// A tenant's invoice for one billing period.
    InvoiceId
);
typed_id!(
    /// One entry of a tenant's prepaid credit ledger.
    CreditEntryId
);

typed_id!(
    /// A payment a tenant started at the payment provider (a Checkout).
    CheckoutId
);
