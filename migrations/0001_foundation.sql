-- Keel's foundation schema: roles, tenancy, identity, audit, outbox.
--
-- Roles. The api and the workers log in as a role that is a member of
-- `keel_app` (table privileges, subject to row-level security) and of
-- `keel_system`. `keel_system` carries BYPASSRLS; it is never inherited (a
-- role attribute is not passed on through membership), so it applies only
-- inside a transaction that explicitly runs `SET LOCAL ROLE keel_system`:
-- `keel_db::Db::begin_system`, used by the worker and by the agent-facing
-- endpoints, whose every change is audited as a system or node actor.
-- Creating a BYPASSRLS role needs a superuser: in local mode and in tests the
-- migrations run as one; in production a DBA creates the two roles first.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keel_app') THEN
        CREATE ROLE keel_app NOLOGIN NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keel_system') THEN
        CREATE ROLE keel_system NOLOGIN BYPASSRLS;
        GRANT keel_app TO keel_system;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO keel_app;
GRANT SELECT ON _sqlx_migrations TO keel_app;

-- The tenant of the current transaction, set with
-- `set_config('keel.tenant_id', …, true)` (transaction-local, so a pooled
-- connection never carries one tenant's setting into another's request).
-- Unset means NULL, and `tenant_id = NULL` matches no row: a forgotten
-- context shows nothing rather than everything.
CREATE FUNCTION keel_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('keel.tenant_id', true), '')::uuid $$;

-- The signed-in user of the current transaction; lets a user see their own
-- memberships in every tenant (needed to pick a tenant at login).
CREATE FUNCTION keel_current_user() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('keel.user_id', true), '')::uuid $$;

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1
);

-- Users are global: one person may belong to several tenants. The email is
-- stored as given and unique case-insensitively.
CREATE TABLE users (
    id             uuid PRIMARY KEY,
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE memberships (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz,
    version     bigint NOT NULL DEFAULT 1,
    -- Lets child tables reference (tenant_id, project_id) together, so a
    -- row can never claim a project of another tenant.
    UNIQUE (tenant_id, id)
);
CREATE UNIQUE INDEX projects_tenant_name_key ON projects (tenant_id, lower(name)) WHERE deleted_at IS NULL;

-- Append-only: keel_app may insert and read, never update or delete.
CREATE TABLE audit_log (
    id           uuid PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    tenant_id    uuid,
    actor        text NOT NULL,
    actor_detail jsonb NOT NULL,
    action       text NOT NULL,
    resource     text NOT NULL CHECK (resource LIKE 'krn:keel:%'),
    request_id   text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('success', 'failure')),
    details      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_tenant_idx ON audit_log (tenant_id, occurred_at);

-- Domain events, written in the transaction of the change they describe.
-- The relay (keel-outbox) fans each one out to its consumers; see
-- outbox_deliveries in 0003.
CREATE TABLE outbox (
    id                 uuid PRIMARY KEY,
    seq                bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    tenant_id          uuid,
    event_type         text NOT NULL,
    aggregate_type     text NOT NULL,
    aggregate_id       uuid NOT NULL,
    aggregate_version  bigint NOT NULL,
    resource           text NOT NULL CHECK (resource LIKE 'krn:keel:%'),
    payload            jsonb NOT NULL,
    traceparent        text,
    request_id         text NOT NULL,
    fanned_out_at      timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (seq) WHERE fanned_out_at IS NULL;

-- Row-level security on every tenant-owned table. FORCE makes the table
-- owner obey the policies too.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenants_isolation ON tenants
    USING (id = keel_current_tenant());

ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE memberships FORCE ROW LEVEL SECURITY;
CREATE POLICY memberships_isolation ON memberships
    USING (tenant_id = keel_current_tenant());
CREATE POLICY memberships_own_rows ON memberships FOR SELECT
    USING (user_id = keel_current_user());

ALTER TABLE projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE projects FORCE ROW LEVEL SECURITY;
CREATE POLICY projects_isolation ON projects
    USING (tenant_id = keel_current_tenant());

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_log_isolation ON audit_log
    USING (tenant_id = keel_current_tenant());

-- Tenants only ever write outbox rows; reading and relaying them is the
-- worker's job, in a system transaction.
ALTER TABLE outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY outbox_tenant_insert ON outbox FOR INSERT
    WITH CHECK (tenant_id = keel_current_tenant());

GRANT SELECT, INSERT, UPDATE ON tenants, projects TO keel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON memberships TO keel_app;
GRANT SELECT, INSERT ON users TO keel_app;
GRANT SELECT, INSERT ON audit_log TO keel_app;
GRANT INSERT ON outbox TO keel_app;
GRANT SELECT, UPDATE ON outbox TO keel_system;
