-- Stop and start: a stopped allocation keeps its host and the capacity it
-- holds there (it starts again on the same host, with its files); `starting`
-- is the way back to `running`. Terminated allocations are purged after a
-- retention window; `terminated_at` says when.
ALTER TABLE allocations DROP CONSTRAINT allocations_state_check;
ALTER TABLE allocations ADD CONSTRAINT allocations_state_check
    CHECK (state IN ('requested', 'scheduled', 'provisioning', 'running', 'stopping', 'stopped',
                     'starting', 'terminating', 'terminated', 'failed', 'lost'));
UPDATE allocations SET terminated_at = updated_at WHERE state = 'terminated' AND terminated_at IS NULL;
CREATE INDEX allocations_terminated_at ON allocations (terminated_at) WHERE state = 'terminated';
GRANT DELETE ON allocations TO keel_system;
