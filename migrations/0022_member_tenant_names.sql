-- A user may read the name of every tenant they belong to (the console's
-- tenant switcher, `GET /v1/auth/session`), not only of the one their
-- session acts in. Nothing else of another tenant becomes visible.
CREATE POLICY tenants_member_read ON tenants FOR SELECT
    USING (EXISTS (SELECT FROM memberships m
                   WHERE m.tenant_id = tenants.id AND m.user_id = keel_current_user()));
