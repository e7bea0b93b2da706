-- Platform operators: separate principals, never members of a tenant. The
-- first is created with `api operator create`, further ones by operators.
-- Platform tables are touched only in system transactions (keel_system
-- bypasses row-level security; with RLS forced and no policy, no other
-- role sees a row).
CREATE TABLE operators (
    id             uuid PRIMARY KEY,
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('operator', 'read_only_operator')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     uuid REFERENCES operators (id) ON DELETE SET NULL,
    disabled_at    timestamptz,
    version        bigint NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX operators_email_key ON operators (lower(email));

CREATE TABLE operator_sessions (
    id           uuid PRIMARY KEY,
    operator_id  uuid NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);

ALTER TABLE operators ENABLE ROW LEVEL SECURITY;
ALTER TABLE operators FORCE ROW LEVEL SECURITY;
ALTER TABLE operator_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE operator_sessions FORCE ROW LEVEL SECURITY;

GRANT SELECT, INSERT, UPDATE ON operators, operator_sessions TO keel_system;
-- Operators list tenants.
GRANT SELECT ON tenants, memberships, projects TO keel_system;
