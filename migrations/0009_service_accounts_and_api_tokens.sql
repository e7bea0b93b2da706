-- Non-interactive principals.
--
-- A service account belongs to one project and has a project role (admin,
-- member or viewer); it never administers the tenant. Its keys (several,
-- for rotation; each expiring and revocable; only the SHA-256 of the secret
-- stored) are exchanged at POST /v1/auth/token for short-lived access
-- tokens. A personal API token acts as its user in one tenant, under the
-- same rules: exchanged for access tokens, never tenant administration.
CREATE TABLE service_accounts (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    project_id   uuid NOT NULL,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role         text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    disabled_at  timestamptz,
    version      bigint NOT NULL DEFAULT 1,
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX service_accounts_name_key ON service_accounts (project_id, lower(name));

CREATE TABLE service_account_keys (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL,
    service_account_id  uuid NOT NULL,
    secret_sha256       bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    revoked_at          timestamptz,
    FOREIGN KEY (tenant_id, service_account_id) REFERENCES service_accounts (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX service_account_keys_account_idx ON service_account_keys (service_account_id);

CREATE TABLE api_tokens (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    user_id        uuid NOT NULL,
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    secret_sha256  bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    revoked_at     timestamptz,
    -- A token ends with its user's membership.
    FOREIGN KEY (tenant_id, user_id) REFERENCES memberships (tenant_id, user_id) ON DELETE CASCADE
);
CREATE INDEX api_tokens_user_idx ON api_tokens (tenant_id, user_id);

ALTER TABLE service_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE service_accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY service_accounts_isolation ON service_accounts
    USING (tenant_id = keel_current_tenant());
ALTER TABLE service_account_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE service_account_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY service_account_keys_isolation ON service_account_keys
    USING (tenant_id = keel_current_tenant());
ALTER TABLE api_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY api_tokens_isolation ON api_tokens
    USING (tenant_id = keel_current_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON service_accounts TO keel_app;
GRANT SELECT, INSERT, UPDATE ON service_account_keys, api_tokens TO keel_app;
