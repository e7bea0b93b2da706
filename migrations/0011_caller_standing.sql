-- The caller's standing in its tenant, for each kind of caller, as ONE
-- function: its role, its grant on a project, and whether that project is
-- within its reach. crates/keel-auth/src/authz.rs decides on the result.
-- Being a function, a read can ask for its rows and the caller's standing
-- in one statement (`FROM caller_standing(…) s LEFT JOIN … ON
-- s.project_visible`), which saves a round trip on every authorised read.
--
-- Arguments: $1 the kind of caller ('user', 'api_token' or
-- 'service_account'), $2 the tenant, $3 the user or service account, $4
-- the credential (session, API token or key), $5 the project or NULL.
-- Written positionally: in a SQL function a column of the same name would
-- win over an argument name.
--
-- LANGUAGE sql and STABLE so that the planner inlines it; SECURITY INVOKER
-- (the default), so row-level security applies inside as everywhere else.
-- Callers pass the kind as a literal (authz.rs `with_standing!`): each
-- kind then has its own prepared statement whose generic plan keeps only
-- its branch. With the kind as a parameter, Postgres would re-plan all
-- three branches on every call.
CREATE FUNCTION caller_standing(text, uuid, uuid, uuid, uuid)
RETURNS TABLE (role text, grant_role text, project_visible boolean)
LANGUAGE sql STABLE
AS $$
    -- A user signed in: a session older than the membership belongs to an
    -- earlier membership that ended, and never comes back.
    SELECT m.role, g.role, p.id IS NOT NULL
      FROM memberships m
      LEFT JOIN projects p ON p.id = $5 AND p.tenant_id = m.tenant_id AND p.deleted_at IS NULL
      LEFT JOIN project_grants g ON g.project_id = p.id AND g.tenant_id = m.tenant_id AND g.user_id = m.user_id
     WHERE $1 = 'user' AND m.tenant_id = $2 AND m.user_id = $3
       AND EXISTS (SELECT FROM sessions s
                    WHERE s.id = $4 AND s.user_id = $3 AND s.tenant_id = $2
                      AND s.created_at >= m.created_at
                      AND s.revoked_at IS NULL AND s.expires_at > now())
    UNION ALL
    -- A user through a personal API token.
    SELECT m.role, g.role, p.id IS NOT NULL
      FROM memberships m
      LEFT JOIN projects p ON p.id = $5 AND p.tenant_id = m.tenant_id AND p.deleted_at IS NULL
      LEFT JOIN project_grants g ON g.project_id = p.id AND g.tenant_id = m.tenant_id AND g.user_id = m.user_id
     WHERE $1 = 'api_token' AND m.tenant_id = $2 AND m.user_id = $3
       AND EXISTS (SELECT FROM api_tokens t
                    WHERE t.id = $4 AND t.user_id = $3 AND t.tenant_id = $2
                      AND t.revoked_at IS NULL AND t.expires_at > now())
    UNION ALL
    -- A service account: enabled, its key live, and the project its own.
    SELECT sa.role, NULL::text, (p.id IS NOT NULL AND p.id = sa.project_id)
      FROM service_accounts sa
      LEFT JOIN projects p ON p.id = $5 AND p.tenant_id = sa.tenant_id AND p.deleted_at IS NULL
     WHERE $1 = 'service_account' AND sa.id = $3 AND sa.tenant_id = $2 AND sa.disabled_at IS NULL
       AND EXISTS (SELECT FROM service_account_keys k
                    WHERE k.id = $4 AND k.service_account_id = sa.id
                      AND k.revoked_at IS NULL AND k.expires_at > now())
$$;
