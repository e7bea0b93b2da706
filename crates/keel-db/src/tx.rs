//! The one write path: a change, its audit row and its outbox events in one
//! transaction.

use keel_core::ids::{EventId, TenantId, UserId};
use keel_core::{Actor, ResourceName};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{DbError, DeferredCommit, OUTBOX_CHANNEL, PgTransaction};

/// What a request (or a worker step) carries into every change it makes.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    /// The `X-Request-Id` of the HTTP request, or a generated id for work
    /// that did not start with one.
    pub request_id: String,
    pub actor: Actor,
    /// W3C `traceparent` of the current span, copied into every outbox row
    /// so a consumer continues the same trace.
    pub traceparent: Option<String>,
}

impl RequestMeta {
    pub fn system(component: &str, request_id: impl Into<String>) -> Self {
        Self {
            request_id: request_id.into(),
            actor: Actor::system(component),
            traceparent: None,
        }
    }
}

/// Which rows a transaction may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One tenant's rows (row-level security), optionally with the user
    /// acting in it (who may also see their own memberships elsewhere).
    Tenant {
        tenant_id: TenantId,
        user_id: Option<UserId>,
    },
    /// A user who has not chosen a tenant yet (login): sees only their own
    /// memberships.
    User { user_id: UserId },
    /// Every tenant (`SET LOCAL ROLE keel_system`).
    System,
}

/// A domain event to write to the outbox with the change.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_type: &'static str,
    pub aggregate_type: &'static str,
    pub aggregate_id: Uuid,
    /// The aggregate's version after the change: consumers use it to keep
    /// order per aggregate.
    pub aggregate_version: i64,
    pub tenant_id: Option<TenantId>,
    pub resource: ResourceName,
    pub payload: serde_json::Value,
}

impl NewEvent {
    pub fn new(
        event_type: &'static str,
        aggregate_type: &'static str,
        aggregate_id: Uuid,
        aggregate_version: i64,
        tenant_id: Option<TenantId>,
        resource: ResourceName,
        payload: impl Serialize,
    ) -> Self {
        Self {
            event_type,
            aggregate_type,
            aggregate_id,
            aggregate_version,
            tenant_id,
            resource,
            // Serialising our own payload types cannot fail (no maps with
            // non-string keys); fall back to null rather than panic.
            payload: serde_json::to_value(payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The audit record of a change: what was done to which resource.
#[derive(Clone, Debug)]
pub struct Audit {
    /// `<resource>.<verb>`, e.g. `allocation.create`.
    pub action: &'static str,
    pub resource: ResourceName,
    pub tenant_id: Option<TenantId>,
    pub details: serde_json::Value,
}

impl Audit {
    pub fn new(action: &'static str, tenant_id: Option<TenantId>, resource: ResourceName) -> Self {
        Self {
            action,
            resource,
            tenant_id,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn with_details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(details).unwrap_or(serde_json::Value::Null);
        self
    }
}

/// A scoped transaction. Domain code runs its SQL on [`WriteTx::conn`],
/// queues events with [`WriteTx::emit`] and finishes with
/// [`WriteTx::commit`], which writes the audit rows and the outbox rows
/// and commits all of it atomically. Dropped without commit, it rolls back.
///
/// Read-only handlers use the same type and simply drop it.
pub struct WriteTx {
    tx: PgTransaction,
    meta: RequestMeta,
    scope: Scope,
    events: Vec<NewEvent>,
    audits: Vec<Audit>,
    /// Set when the idempotency layer owns the final commit.
    deferred: Option<DeferredCommit>,
}

impl WriteTx {
    pub(crate) async fn begin(
        pool: &PgPool,
        meta: RequestMeta,
        scope: Scope,
    ) -> Result<Self, DbError> {
        let mut tx = pool.begin().await?;
        match scope {
            Scope::Tenant { tenant_id, user_id } => {
                sqlx::query("SELECT set_config('keel.tenant_id', $1, true), set_config('keel.user_id', $2, true)")
                    .bind(tenant_id.to_string())
                    .bind(user_id.map(|u| u.to_string()).unwrap_or_default())
                    .execute(&mut *tx)
                    .await?;
            }
            Scope::User { user_id } => {
                sqlx::query("SELECT set_config('keel.user_id', $1, true)")
                    .bind(user_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            Scope::System => {
                sqlx::query("SET LOCAL ROLE keel_system")
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(Self {
            tx,
            meta,
            scope,
            events: Vec::new(),
            audits: Vec::new(),
            deferred: None,
        })
    }

    /// Makes [`WriteTx::commit`] park the transaction in `deferred` instead
    /// of committing it.
    pub(crate) fn defer_commit_to(&mut self, deferred: DeferredCommit) {
        self.deferred = Some(deferred);
    }

    /// The connection to run domain SQL on.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub fn meta(&self) -> &RequestMeta {
        &self.meta
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Switches a transaction to another tenant: used by registration,
    /// which creates the tenant it then acts in.
    pub async fn enter_tenant(
        &mut self,
        tenant_id: TenantId,
        user_id: Option<UserId>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "SELECT set_config('keel.tenant_id', $1, true), set_config('keel.user_id', $2, true)",
        )
        .bind(tenant_id.to_string())
        .bind(user_id.map(|u| u.to_string()).unwrap_or_default())
        .execute(&mut *self.tx)
        .await?;
        self.scope = Scope::Tenant { tenant_id, user_id };
        Ok(())
    }

    /// Names the actor once it is known (login learns who is acting only
    /// after checking the password).
    pub fn set_actor(&mut self, actor: Actor) {
        self.meta.actor = actor;
    }

    /// Queues an event; it is written to the outbox at commit.
    pub fn emit(&mut self, event: NewEvent) {
        self.events.push(event);
    }

    /// Queues an extra audit row besides the one `commit` takes.
    pub fn audit(&mut self, audit: Audit) {
        self.audits.push(audit);
    }

    /// Writes the audit rows and the outbox rows, then commits. Either all
    /// of the transaction lands or none of it. Under an idempotency key the
    /// commit is the idempotency layer's, after it stored the response (see
    /// [`DeferredCommit`]).
    pub async fn commit(mut self, audit: Audit) -> Result<(), DbError> {
        self.audits.push(audit);
        let actor_detail =
            serde_json::to_value(&self.meta.actor).unwrap_or(serde_json::Value::Null);
        for audit in &self.audits {
            sqlx::query(
                "INSERT INTO audit_log (id, tenant_id, actor, actor_detail, action, resource, request_id, outcome, details)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'success', $8)",
            )
            .bind(Uuid::now_v7())
            .bind(audit.tenant_id)
            .bind(self.meta.actor.label())
            .bind(&actor_detail)
            .bind(audit.action)
            .bind(audit.resource.as_str())
            .bind(&self.meta.request_id)
            .bind(&audit.details)
            .execute(&mut *self.tx)
            .await?;
        }
        for event in &self.events {
            sqlx::query(
                "INSERT INTO outbox (id, tenant_id, event_type, aggregate_type, aggregate_id, aggregate_version,
                                     resource, payload, traceparent, request_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(EventId::new())
            .bind(event.tenant_id)
            .bind(event.event_type)
            .bind(event.aggregate_type)
            .bind(event.aggregate_id)
            .bind(event.aggregate_version)
            .bind(event.resource.as_str())
            .bind(&event.payload)
            .bind(&self.meta.traceparent)
            .bind(&self.meta.request_id)
            .execute(&mut *self.tx)
            .await?;
        }
        if !self.events.is_empty() {
            // Delivered only if the transaction commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut *self.tx)
                .await?;
        }
        match self.deferred.take() {
            // The idempotency layer stores the response in this same
            // transaction and commits it.
            Some(deferred) => deferred.park(self.tx),
            None => self.tx.commit().await?,
        }
        Ok(())
    }
}
