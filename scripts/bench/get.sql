-- The SQL of an authenticated GET /v1/projects/{id}, statement for
-- statement (crates/keel-auth: Ctx::begin, authz::standing, project_get).
BEGIN;
SELECT set_config('keel.tenant_id', :tenant, true), set_config('keel.user_id', :user, true);
SELECT m.role, g.role, p.id IS NOT NULL
  FROM memberships m
  LEFT JOIN projects p ON p.id = :project::uuid AND p.tenant_id = m.tenant_id AND p.deleted_at IS NULL
  LEFT JOIN project_grants g ON g.project_id = p.id AND g.tenant_id = m.tenant_id AND g.user_id = m.user_id
 WHERE m.tenant_id = :tenant::uuid AND m.user_id = :user::uuid
   AND EXISTS (SELECT FROM sessions s
               WHERE s.id = :session::uuid AND s.user_id = :user::uuid AND s.tenant_id = :tenant::uuid
                 AND s.revoked_at IS NULL AND s.expires_at > now());
SELECT id, tenant_id, name, created_at, version FROM projects
 WHERE id = :project::uuid AND tenant_id = :tenant::uuid AND deleted_at IS NULL;
ROLLBACK;
