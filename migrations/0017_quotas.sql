-- Quotas: limits on what a tenant (and, optionally, one of its projects)
-- may hold at once — allocations, vCPUs, memory, GPUs — counted over the
-- allocations that hold capacity. Enforced in the transaction that places
-- an allocation. A tenant without its own row has the platform defaults; a
-- project without one is limited only by its tenant's.

CREATE TABLE quota_defaults (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    allocations integer NOT NULL CHECK (allocations >= 0),
    vcpus       integer NOT NULL CHECK (vcpus >= 0),
    memory_mib  bigint NOT NULL CHECK (memory_mib >= 0),
    gpus        integer NOT NULL CHECK (gpus >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1
);
INSERT INTO quota_defaults (allocations, vcpus, memory_mib, gpus) VALUES (50, 128, 524288, 8);

CREATE TABLE quotas (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- NULL: the tenant's own quota.
    project_id  uuid,
    allocations integer NOT NULL CHECK (allocations >= 0),
    vcpus       integer NOT NULL CHECK (vcpus >= 0),
    memory_mib  bigint NOT NULL CHECK (memory_mib >= 0),
    gpus        integer NOT NULL CHECK (gpus >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1,
    UNIQUE NULLS NOT DISTINCT (tenant_id, project_id),
    FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id) ON DELETE CASCADE
);

ALTER TABLE quotas ENABLE ROW LEVEL SECURITY;
ALTER TABLE quotas FORCE ROW LEVEL SECURITY;
-- Tenants read their own rows; only operators (keel_system) write.
CREATE POLICY quotas_isolation ON quotas FOR SELECT USING (tenant_id = keel_current_tenant());

GRANT SELECT ON quotas, quota_defaults TO keel_app;
GRANT INSERT, UPDATE, DELETE ON quotas TO keel_system;
GRANT UPDATE ON quota_defaults TO keel_system;

-- Usage is summed over a tenant's capacity-holding allocations.
CREATE INDEX allocations_reserved_by_tenant ON allocations (tenant_id, project_id) WHERE reserved;
