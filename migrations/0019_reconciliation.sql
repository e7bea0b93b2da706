-- The reconciler retries a transitional step a bounded number of times:
-- `attempts` counts the retries of the current state (reset by every
-- state change).
ALTER TABLE allocations ADD COLUMN attempts integer NOT NULL DEFAULT 0;
CREATE INDEX allocations_transitional ON allocations (updated_at)
    WHERE state IN ('requested', 'scheduled', 'provisioning', 'starting', 'stopping',
                    'terminating', 'lost');

-- Heartbeat reconciliation: when a host first stopped listing an
-- allocation's workload (it is believed gone only after a grace period of
-- consecutive heartbeats without it), and the index every heartbeat's
-- query of its host's allocations uses.
ALTER TABLE allocations ADD COLUMN unlisted_since timestamptz;
CREATE INDEX allocations_by_host ON allocations (host_id);
-- The worker's metrics count undelivered outbox deliveries every 5 s.
CREATE INDEX outbox_deliveries_undone ON outbox_deliveries (status) WHERE status <> 'done';
-- Orphan stops are asked for at most once a minute per workload.
CREATE INDEX outbox_orphan_stops ON outbox (aggregate_id, created_at)
    WHERE event_type = 'host.orphan_workload';
