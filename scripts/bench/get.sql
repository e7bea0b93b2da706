-- The SQL of an authenticated GET /v1/projects/{id}, statement for
-- statement: crates/keel-db WriteTx::begin sends BEGIN and the settings in
-- one round trip; crates/keel-auth service::project_get reads the caller's
-- standing and the project in one statement; the dropped transaction's
-- ROLLBACK goes out with the pool's release check.
\startpipeline
BEGIN;
SET LOCAL ROLE NONE;
SELECT set_config('keel.tenant_id', :tenant, true), set_config('keel.user_id', :user, true);
\endpipeline
SELECT s.role, s.grant_role, s.project_visible, p.id, p.tenant_id, p.name, p.created_at, p.version
  FROM caller_standing('user', :tenant::uuid, :user::uuid, :session::uuid, :project::uuid) s
  LEFT JOIN projects p ON s.project_visible AND p.id = :project::uuid AND p.tenant_id = :tenant::uuid
                      AND p.deleted_at IS NULL;
ROLLBACK;
