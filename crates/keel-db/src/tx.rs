//! The one write path: a change, its audit row and its outbox events in one
//! transaction.

use keel_core::ids::{EventId, TenantId, UserId};
use keel_core::{Actor, ResourceName};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
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
    /// Who the row names, when not the transaction's actor (a change that
    /// spans tenants names the actor as each tenant knows it).
    pub actor: Option<Actor>,
}

impl Audit {
    pub fn new(action: &'static str, tenant_id: Option<TenantId>, resource: ResourceName) -> Self {
        Self {
            action,
            resource,
            tenant_id,
            details: serde_json::Value::Object(Default::default()),
            actor: None,
        }
    }

    pub fn by(mut self, actor: Actor) -> Self {
        self.actor = Some(actor);
        self
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
    /// Always `Some` while the `WriteTx` exists; taken by `commit`,
    /// `rollback` and `Drop`.
    pub(crate) tx: Option<PgTransaction>,
    meta: RequestMeta,
    scope: Scope,
    events: Vec<NewEvent>,
    audits: Vec<Audit>,
    /// Set when the idempotency layer owns the final commit.
    deferred: Option<DeferredCommit>,
}

/// `BEGIN` and the scope's settings as one simple query: one round trip
/// instead of two, on every transaction the api opens. Every scope sets
/// every setting (and the role back to the login role), so nothing of an
/// earlier transaction on the connection can carry over. Nothing in it can
/// fail once `BEGIN` ran (a failure would leave the connection inside an
/// aborted transaction that sqlx does not know of). Formatting values into
/// SQL is safe here only because they are typed UUIDs, whose text is hex
/// digits and hyphens.
fn begin_statement(scope: Scope) -> String {
    let (tenant, user) = match scope {
        Scope::Tenant { tenant_id, user_id } => (
            tenant_id.to_string(),
            user_id.map(|user| user.to_string()).unwrap_or_default(),
        ),
        Scope::User { user_id } => (String::new(), user_id.to_string()),
        Scope::System => (String::new(), String::new()),
    };
    format!(
        "BEGIN; SET LOCAL ROLE NONE; \
         SELECT set_config('keel.tenant_id', '{tenant}', true), set_config('keel.user_id', '{user}', true)"
    )
}

/// Begins a transaction with `statement` in a task of its own. sqlx
/// 0.9.0's begin is not cancel-safe on Postgres (transact-rs/sqlx#4393,
/// fixed upstream but not released): a request dropped while `BEGIN` is in
/// flight would hand its connection back to the pool inside an open
/// transaction, and the next borrower would run in it. The task runs to
/// the end even when the request is gone; its transaction is then dropped
/// normally, which rolls it back.
pub(crate) async fn begin_detached(
    pool: &PgPool,
    statement: String,
) -> Result<PgTransaction, DbError> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin_with(AssertSqlSafe(statement)).await })
        .await
        .map_err(|_| DbError::Sqlx(sqlx::Error::BeginFailed))?
        .map_err(DbError::from)
}

impl WriteTx {
    pub(crate) async fn begin(
        pool: &PgPool,
        meta: RequestMeta,
        scope: Scope,
    ) -> Result<Self, DbError> {
        let mut tx = begin_detached(pool, begin_statement(scope)).await?;
        if scope == Scope::System {
            // Apart from the one-query begin: it can fail (a missing grant),
            // and inside sqlx's transaction a failure rolls back.
            sqlx::query("SET LOCAL ROLE keel_system")
                .execute(&mut *tx)
                .await?;
        }
        Ok(Self {
            tx: Some(tx),
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
        self.inner()
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
        .execute(&mut **self.inner())
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
        let mut audits = std::mem::take(&mut self.audits);
        audits.push(audit);
        let events = std::mem::take(&mut self.events);
        let request_id = self.meta.request_id.clone();
        let traceparent = self.meta.traceparent.clone();
        // Every audit row, every event and the relay's wake-up in one
        // statement: one round trip however many rows, which matters
        // because the transaction may hold a hot lock (a host row, a
        // tenant's quota) until it commits. Events keep their order: their
        // `seq` follows the array.
        let mut audit_ids = Vec::with_capacity(audits.len());
        let mut audit_tenants = Vec::with_capacity(audits.len());
        let mut actors = Vec::with_capacity(audits.len());
        let mut actor_details = Vec::with_capacity(audits.len());
        let mut actions = Vec::with_capacity(audits.len());
        let mut audit_resources = Vec::with_capacity(audits.len());
        let mut details = Vec::with_capacity(audits.len());
        for audit in audits {
            let actor = audit.actor.as_ref().unwrap_or(&self.meta.actor);
            audit_ids.push(Uuid::now_v7());
            audit_tenants.push(audit.tenant_id.map(|tenant| tenant.as_uuid()));
            actors.push(actor.label());
            actor_details.push(serde_json::to_value(actor).unwrap_or(serde_json::Value::Null));
            actions.push(audit.action);
            audit_resources.push(audit.resource.to_string());
            details.push(audit.details);
        }
        let mut event_ids = Vec::with_capacity(events.len());
        let mut event_tenants = Vec::with_capacity(events.len());
        let mut event_types = Vec::with_capacity(events.len());
        let mut aggregate_types = Vec::with_capacity(events.len());
        let mut aggregate_ids = Vec::with_capacity(events.len());
        let mut aggregate_versions = Vec::with_capacity(events.len());
        let mut event_resources = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let any_events = !events.is_empty();
        for event in events {
            event_ids.push(EventId::new().as_uuid());
            event_tenants.push(event.tenant_id.map(|tenant| tenant.as_uuid()));
            event_types.push(event.event_type);
            aggregate_types.push(event.aggregate_type);
            aggregate_ids.push(event.aggregate_id);
            aggregate_versions.push(event.aggregate_version);
            event_resources.push(event.resource.to_string());
            payloads.push(event.payload);
        }
        // On an error below, dropping `self` hands a lent transaction back
        // to the idempotency layer (see `Drop`).
        sqlx::query(
            "WITH audit AS (
                 INSERT INTO audit_log (id, tenant_id, actor, actor_detail, action, resource,
                                        request_id, outcome, details)
                 SELECT id, tenant_id, actor, actor_detail, action, resource, $1, 'success', details
                 FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::jsonb[], $6::text[],
                             $7::text[], $8::jsonb[])
                      AS a (id, tenant_id, actor, actor_detail, action, resource, details)
             ), events AS (
                 INSERT INTO outbox (id, tenant_id, event_type, aggregate_type, aggregate_id,
                                     aggregate_version, resource, payload, traceparent, request_id)
                 SELECT id, tenant_id, event_type, aggregate_type, aggregate_id,
                        aggregate_version, resource, payload, $9, $1
                 FROM unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::uuid[],
                             $15::bigint[], $16::text[], $17::jsonb[])
                      WITH ORDINALITY
                      AS e (id, tenant_id, event_type, aggregate_type, aggregate_id,
                            aggregate_version, resource, payload, n)
                 ORDER BY n
             )
             -- Delivered only if the transaction commits.
             SELECT pg_notify($18, '') WHERE $19",
        )
        .bind(&request_id)
        .bind(&audit_ids)
        .bind(&audit_tenants)
        .bind(&actors)
        .bind(&actor_details)
        .bind(&actions)
        .bind(&audit_resources)
        .bind(&details)
        .bind(&traceparent)
        .bind(&event_ids)
        .bind(&event_tenants)
        .bind(&event_types)
        .bind(&aggregate_types)
        .bind(&aggregate_ids)
        .bind(&aggregate_versions)
        .bind(&event_resources)
        .bind(&payloads)
        .bind(OUTBOX_CHANNEL)
        .bind(any_events)
        .execute(&mut **self.inner())
        .await?;
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        match self.deferred.take() {
            // The idempotency layer stores the response in this same
            // transaction and commits it.
            Some(deferred) => deferred.park(tx),
            None => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back now (rather than when the connection is next used, as a
    /// plain drop does): locks taken in the transaction are released before
    /// this returns.
    pub async fn rollback(mut self) -> Result<(), DbError> {
        if let Some(tx) = self.tx.take() {
            tx.rollback().await?;
        }
        Ok(())
    }

    fn inner(&mut self) -> &mut PgTransaction {
        // Only `commit`, `rollback` and `Drop` take the transaction, and
        // each consumes the `WriteTx`.
        self.tx
            .as_mut()
            .unwrap_or_else(|| unreachable!("a WriteTx is used after it ended"))
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        // A transaction the idempotency layer lent goes back to it, which
        // rolls it back at once; any other one rolls back when its
        // connection is next used (sqlx's behaviour).
        if let (Some(deferred), Some(tx)) = (self.deferred.take(), self.tx.take()) {
            deferred.give_back(tx);
        }
    }
}
