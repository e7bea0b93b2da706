-- Deleting one's own account (POST /v1/auth/delete-account) spans every
-- tenant the user belongs to, so it runs in a system transaction: it locks
-- the owners of those tenants (the last owner of a tenant cannot leave)
-- and deletes the user row, whose memberships, sessions, refresh tokens,
-- grants and API tokens go with it (ON DELETE CASCADE). Audit rows keep
-- the user's id, never a foreign key to it.
GRANT DELETE ON users TO keel_system;
-- keel_api inherits this grant (see doc/decisions.md), but `users` has
-- row-level security and no DELETE policy: outside a system transaction
-- (BYPASSRLS) a delete matches no row.
