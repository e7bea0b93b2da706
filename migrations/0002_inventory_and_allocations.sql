-- Inventory (regions, flavors, hosts, join tokens) and allocations.
--
-- Inventory is operator data, owned by no tenant: no row-level security.
-- Allocations are tenant-owned and isolated like every tenant table.

CREATE TABLE regions (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9-]{1,40}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flavors (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9.-]{1,60}$'),
    vcpus       integer NOT NULL CHECK (vcpus > 0),
    memory_mib  integer NOT NULL CHECK (memory_mib > 0),
    gpu_model   text,
    gpu_count   integer NOT NULL DEFAULT 0 CHECK (gpu_count >= 0),
    disk_gib    integer NOT NULL CHECK (disk_gib >= 0),
    retired_at  timestamptz,
    CHECK ((gpu_count = 0) = (gpu_model IS NULL))
);

INSERT INTO regions (name) VALUES ('local-1');
INSERT INTO flavors (name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib) VALUES
    ('cpu.small',   1,   1024, NULL, 0, 10),
    ('cpu.medium',  2,   4096, NULL, 0, 40),
    ('cpu.large',   8,  16384, NULL, 0, 160),
    ('gpu.a100.1',  12, 98304, 'nvidia-a100', 1, 500);

-- A host is created by node enrolment with the capacity its agent detected.
-- reserved_* is what placed allocations hold; the CHECKs make over-commit
-- impossible whatever the application does.
CREATE TABLE hosts (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    region            text NOT NULL REFERENCES regions (name),
    state             text NOT NULL CHECK (state IN ('ready', 'cordoned', 'draining', 'offline')),
    agent_url         text NOT NULL,
    vcpus             integer NOT NULL CHECK (vcpus >= 0),
    memory_mib        bigint NOT NULL CHECK (memory_mib >= 0),
    gpu_model         text,
    gpu_count         integer NOT NULL DEFAULT 0,
    reserved_vcpus    integer NOT NULL DEFAULT 0,
    reserved_memory_mib bigint NOT NULL DEFAULT 0,
    reserved_gpus     integer NOT NULL DEFAULT 0,
    -- Bumped by every (re-)enrolment; tasks name the epoch they were
    -- signed for and the agent refuses any other.
    enrolment_epoch   bigint NOT NULL DEFAULT 1,
    cert_serial       text NOT NULL,
    cert_not_after    timestamptz NOT NULL,
    -- The last task sequence number handed out for this host.
    task_seq          bigint NOT NULL DEFAULT 0,
    enrolled_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz,
    revoked_at        timestamptz,
    version           bigint NOT NULL DEFAULT 1,
    CHECK (reserved_vcpus BETWEEN 0 AND vcpus),
    CHECK (reserved_memory_mib BETWEEN 0 AND memory_mib),
    CHECK (reserved_gpus BETWEEN 0 AND gpu_count)
);

-- `id.secret` tokens; only the SHA-256 of the secret is stored.
CREATE TABLE join_tokens (
    id            uuid PRIMARY KEY,
    secret_sha256 bytea NOT NULL,
    region        text NOT NULL REFERENCES regions (name),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz,
    host_id       uuid REFERENCES hosts (id)
);

CREATE TABLE allocations (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL,
    project_id      uuid NOT NULL,
    name            text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    flavor          text NOT NULL REFERENCES flavors (name),
    region          text NOT NULL REFERENCES regions (name),
    command         text[] NOT NULL,
    state           text NOT NULL CHECK (state IN ('requested', 'scheduled', 'provisioning', 'running',
                        'stopping', 'stopped', 'terminating', 'terminated', 'failed')),
    failure_reason  text,
    host_id         uuid REFERENCES hosts (id),
    -- What the allocation holds on its host; released (set to 0) exactly
    -- once, when it reaches terminated or failed.
    reserved        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    terminated_at   timestamptz,
    version         bigint NOT NULL DEFAULT 1,
    FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id),
    CHECK ((state = 'failed') = (failure_reason IS NOT NULL))
);
CREATE INDEX allocations_project_idx ON allocations (tenant_id, project_id, id);
CREATE INDEX allocations_host_idx ON allocations (host_id) WHERE reserved;

ALTER TABLE allocations ENABLE ROW LEVEL SECURITY;
ALTER TABLE allocations FORCE ROW LEVEL SECURITY;
CREATE POLICY allocations_isolation ON allocations
    USING (tenant_id = keel_current_tenant());

GRANT SELECT ON regions, flavors TO keel_app;
-- Tenants' transactions reserve capacity on hosts when they place an
-- allocation; they cannot create or delete hosts.
GRANT SELECT, UPDATE (reserved_vcpus, reserved_memory_mib, reserved_gpus) ON hosts TO keel_app;
GRANT SELECT, INSERT, UPDATE ON allocations TO keel_app;
GRANT INSERT, UPDATE, DELETE ON hosts TO keel_system;
GRANT SELECT, INSERT, UPDATE ON join_tokens TO keel_system;
GRANT INSERT, UPDATE ON regions, flavors TO keel_system;
