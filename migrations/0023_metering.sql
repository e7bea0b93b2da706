-- Metering (keel-billing `meter`): the billing worker turns allocation
-- events into usage. A run opens when an allocation becomes `running` and
-- closes at its next change (stopping, terminating, failed or lost); a
-- closed run becomes usage records, one per billing period (calendar month,
-- UTC) it touches. Every row names the event that made it, so a redelivered
-- event changes nothing.

CREATE TABLE meter_runs (
    opened_by      uuid PRIMARY KEY,          -- the `allocation.running` event
    allocation_id  uuid NOT NULL,
    tenant_id      uuid NOT NULL,
    project_id     uuid NOT NULL,
    flavor         text NOT NULL,
    region         text NOT NULL,
    started_at     timestamptz NOT NULL,
    ended_at       timestamptz,
    closed_by      uuid UNIQUE,               -- the event that ended the run
    CHECK ((ended_at IS NULL) = (closed_by IS NULL)),
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
-- At most one open run per allocation.
CREATE UNIQUE INDEX meter_runs_open ON meter_runs (allocation_id) WHERE ended_at IS NULL;

CREATE TABLE usage_records (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    project_id       uuid NOT NULL,
    allocation_id    uuid NOT NULL,
    -- What was measured; `allocation.run` is run time in microseconds.
    meter            text NOT NULL,
    flavor           text NOT NULL,
    region           text NOT NULL,
    -- The billing period (first day of the month, UTC) the piece lies in.
    period_start     date NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz NOT NULL,
    quantity         bigint NOT NULL CHECK (quantity >= 0),
    source_event_id  uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_event_id, period_start),
    CHECK (ended_at >= started_at)
);
CREATE INDEX usage_records_tenant_period ON usage_records (tenant_id, period_start);

-- Tenants read their own usage; only the billing worker (system role)
-- writes it.
ALTER TABLE usage_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_records FORCE ROW LEVEL SECURITY;
CREATE POLICY usage_records_isolation ON usage_records FOR SELECT
    USING (tenant_id = keel_current_tenant());
ALTER TABLE meter_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE meter_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY meter_runs_isolation ON meter_runs FOR SELECT
    USING (tenant_id = keel_current_tenant());
GRANT SELECT ON usage_records, meter_runs TO keel_app;
GRANT SELECT, INSERT, UPDATE ON usage_records, meter_runs TO keel_system;
