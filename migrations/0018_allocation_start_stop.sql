-- Stop and start: a stopped allocation keeps its host and the capacity it
-- holds there (it starts again on the same host, with its files); `starting`
-- is the way back to `running`. Terminated allocations are purged after a
-- retention window; `terminated_at` says when.
ALTER TABLE allocations DROP CONSTRAINT allocations_state_check;
ALTER TABLE allocations ADD CONSTRAINT allocations_state_check
    CHECK (state IN ('requested', 'scheduled', 'provisioning', 'running', 'stopping', 'stopped',
                     'starting', 'terminating', 'terminated', 'failed', 'lost'));
ALTER TABLE allocations NO FORCE ROW LEVEL SECURITY;
UPDATE allocations SET terminated_at = updated_at WHERE state = 'terminated' AND terminated_at IS NULL;
ALTER TABLE allocations FORCE ROW LEVEL SECURITY;
CREATE INDEX allocations_terminated_at ON allocations (terminated_at) WHERE state = 'terminated';
-- Only the worker's purge deletes allocations (as keel_system, which
-- bypasses row-level security); a tenant transaction never can, whatever
-- it inherits.
GRANT DELETE ON allocations TO keel_system;
CREATE POLICY allocations_never_deleted_by_tenants ON allocations AS RESTRICTIVE
    FOR DELETE USING (false);
