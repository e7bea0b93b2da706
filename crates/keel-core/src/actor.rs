//! Who caused a change. Every audit row names its actor.

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, OperatorId, ServiceAccountId, TenantId, UserId};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Actor {
    /// A signed-in person acting inside one tenant.
    User {
        user_id: UserId,
        tenant_id: TenantId,
    },
    /// A project's service account, through one of its keys.
    ServiceAccount {
        service_account_id: ServiceAccountId,
        tenant_id: TenantId,
    },
    /// A platform operator (never a member of a tenant).
    Operator { operator_id: OperatorId },
    /// Someone who is not signed in yet (registration, login).
    Anonymous,
    /// A node agent, identified by its mTLS certificate.
    Node { host_id: HostId },
    /// A control-plane component acting on its own (worker, reconciler).
    System { component: String },
}

impl Actor {
    pub fn system(component: &str) -> Self {
        Self::System {
            component: component.to_owned(),
        }
    }

    /// A short, stable label for logs and the audit row's `actor` column,
    /// e.g. `user:0190…`, `node:0190…`, `system:worker`, `anonymous`.
    pub fn label(&self) -> String {
        match self {
            Actor::User { user_id, .. } => format!("user:{user_id}"),
            Actor::Operator { operator_id } => format!("operator:{operator_id}"),
            Actor::ServiceAccount {
                service_account_id, ..
            } => format!("service_account:{service_account_id}"),
            Actor::Anonymous => "anonymous".to_owned(),
            Actor::Node { host_id } => format!("node:{host_id}"),
            Actor::System { component } => format!("system:{component}"),
        }
    }
}
