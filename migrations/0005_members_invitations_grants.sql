-- Membership management: versions for optimistic concurrency, invitations,
-- and per-project grants.

ALTER TABLE memberships ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- An invitation to join a tenant with a role. Only the SHA-256 of its
-- token's secret is stored; the token is shown to the inviter once (and,
-- once notifications exist, mailed to the invitee). Accepting it needs a
-- signed-in user with the invited email.
CREATE TABLE invitations (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    role           text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    secret_sha256  bytea NOT NULL,
    invited_by     uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    accepted_at    timestamptz,
    accepted_by    uuid REFERENCES users (id) ON DELETE SET NULL,
    revoked_at     timestamptz,
    CHECK (accepted_at IS NULL OR revoked_at IS NULL)
);
-- One open invitation per email and tenant.
CREATE UNIQUE INDEX invitations_open_email_key ON invitations (tenant_id, lower(email))
    WHERE accepted_at IS NULL AND revoked_at IS NULL;

-- A grant raises a member's role on one project above their tenant role
-- (grants only add: the effective role is the higher of the two).
CREATE TABLE project_grants (
    tenant_id   uuid NOT NULL,
    project_id  uuid NOT NULL,
    user_id     uuid NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (project_id, user_id),
    FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id) ON DELETE CASCADE,
    -- A grant ends with the membership it belongs to.
    FOREIGN KEY (tenant_id, user_id) REFERENCES memberships (tenant_id, user_id) ON DELETE CASCADE
);
CREATE INDEX project_grants_user_idx ON project_grants (tenant_id, user_id);

ALTER TABLE invitations ENABLE ROW LEVEL SECURITY;
ALTER TABLE invitations FORCE ROW LEVEL SECURITY;
CREATE POLICY invitations_isolation ON invitations
    USING (tenant_id = keel_current_tenant());

ALTER TABLE project_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE project_grants FORCE ROW LEVEL SECURITY;
CREATE POLICY project_grants_isolation ON project_grants
    USING (tenant_id = keel_current_tenant());

GRANT SELECT, INSERT, UPDATE ON invitations TO keel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON project_grants TO keel_app;
