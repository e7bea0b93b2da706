-- Hardening after review.
--
-- The idempotency layer deletes the key of a request whose handler
-- committed and still failed; that runs in the tenant's transaction.
GRANT DELETE ON idempotency_keys TO keel_app;

-- Users are global (one person, many tenants), but a transaction may only
-- create or change the user it acts as: a mistaken WHERE clause can never
-- touch another user's password hash. Reading stays open (login looks a
-- user up by email before any context exists; member lists show emails).
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_read ON users FOR SELECT USING (true);
CREATE POLICY users_register ON users FOR INSERT WITH CHECK (id = keel_current_user());
CREATE POLICY users_update_self ON users FOR UPDATE
    USING (id = keel_current_user()) WITH CHECK (id = keel_current_user());
