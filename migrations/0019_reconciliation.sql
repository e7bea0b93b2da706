-- The reconciler retries a transitional step a bounded number of times:
-- `attempts` counts the retries of the current state (reset by every
-- state change).
ALTER TABLE allocations ADD COLUMN attempts integer NOT NULL DEFAULT 0;
CREATE INDEX allocations_transitional ON allocations (updated_at)
    WHERE state IN ('requested', 'scheduled', 'provisioning', 'starting', 'stopping',
                    'terminating', 'lost');
