-- Sessions and refresh tokens.
--
-- A session is one login of one user into one tenant; it is also the
-- family of the refresh tokens that descend from that login. Each refresh
-- exchanges the current refresh token for a new one (rotation); presenting
-- a token that was already exchanged revokes the whole session, because
-- either the legitimate client or a thief holds a copy. Access tokens name
-- their session (`sid`), and every authorised request checks that the
-- session is live, so logout and revocation take effect at once.
CREATE TABLE sessions (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Absolute lifetime: no refresh extends a session past this.
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    revoked_reason  text CHECK (revoked_reason IN ('logout', 'password_changed', 'refresh_token_reused', 'membership_ended'))
);
CREATE INDEX sessions_user_idx ON sessions (user_id) WHERE revoked_at IS NULL;

-- Only the SHA-256 of a refresh token's secret is stored.
CREATE TABLE refresh_tokens (
    id             uuid PRIMARY KEY,
    session_id     uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    secret_sha256  bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    -- Set when the token is exchanged; a second exchange is reuse.
    used_at        timestamptz
);
CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);

-- Sessions belong to a user, not to a tenant: a user sees and revokes their
-- own sessions in every tenant (password change signs out everywhere).
ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY sessions_own_rows ON sessions
    USING (user_id = keel_current_user());

ALTER TABLE refresh_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE refresh_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY refresh_tokens_own_rows ON refresh_tokens
    USING (user_id = keel_current_user());

GRANT SELECT, INSERT, UPDATE ON sessions, refresh_tokens TO keel_app;
GRANT UPDATE (password_hash) ON users TO keel_app;
