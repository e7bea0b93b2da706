-- Inventory at production depth: local disk is reserved like CPUs, memory
-- and GPUs; flavors and regions are created and retired by operators and
-- carry versions.

ALTER TABLE hosts ADD COLUMN reserved_disk_gib bigint NOT NULL DEFAULT 0;
-- What placed allocations already hold (a host that reported less disk
-- than that is taken to have at least as much). Row-level security would
-- hide every allocation from a migrating owner that is not a superuser:
-- lifted for the backfill only.
ALTER TABLE allocations NO FORCE ROW LEVEL SECURITY;
UPDATE hosts h SET reserved_disk_gib = s.total, disk_gib = GREATEST(h.disk_gib, s.total)
  FROM (SELECT a.host_id, sum(f.disk_gib) AS total
          FROM allocations a JOIN flavors f ON f.name = a.flavor
         WHERE a.reserved GROUP BY a.host_id) s
 WHERE s.host_id = h.id;
ALTER TABLE allocations FORCE ROW LEVEL SECURITY;
ALTER TABLE hosts ADD CONSTRAINT hosts_reserved_disk_check
    CHECK (reserved_disk_gib BETWEEN 0 AND disk_gib);
GRANT UPDATE (reserved_disk_gib) ON hosts TO keel_app;

ALTER TABLE flavors ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE flavors ADD COLUMN version bigint NOT NULL DEFAULT 1;
