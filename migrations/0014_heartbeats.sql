-- Heartbeats: agents report their capacity and workloads; a host not heard
-- from for a grace period goes `offline` (remembering the state it had, so
-- a cordoned host comes back cordoned) and its allocations become `lost`
-- until it returns or the lifecycle decides otherwise. Lost allocations
-- keep their capacity: the host may still be running them.
ALTER TABLE hosts ADD COLUMN disk_gib bigint NOT NULL DEFAULT 0 CHECK (disk_gib >= 0);
ALTER TABLE hosts ADD COLUMN state_before_offline text
    CHECK (state_before_offline IN ('ready', 'cordoned', 'draining'));

ALTER TABLE allocations DROP CONSTRAINT allocations_state_check;
ALTER TABLE allocations ADD CONSTRAINT allocations_state_check
    CHECK (state IN ('requested', 'scheduled', 'provisioning', 'running', 'stopping', 'stopped',
                     'terminating', 'terminated', 'failed', 'lost'));
