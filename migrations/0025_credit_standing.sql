-- The prepaid credit policy (keel-billing `standing`; doc/billing.md,
-- "When credit runs out"). A tenant is billed `invoiced` (pays invoices
-- when due; the default, `[billing] default_mode`) or `prepaid` (usage
-- draws on credit). A prepaid tenant whose available credit runs out is
-- warned, then its launches stop, then its running allocations stop; each
-- step is an event and an audit row.

CREATE TABLE billing_accounts (
    tenant_id        uuid PRIMARY KEY REFERENCES tenants (id),
    -- Set by operators; NULL follows `[billing] default_mode`.
    mode             text CHECK (mode IN ('prepaid', 'invoiced')),
    standing         text NOT NULL DEFAULT 'active'
                     CHECK (standing IN ('active', 'warned', 'launches_stopped', 'suspended')),
    standing_since   timestamptz NOT NULL DEFAULT now(),
    -- The lowest low-balance threshold the available credit went below
    -- (an event was sent for it); NULL while above every threshold.
    low_balance_below bigint,
    -- The time of the last check that changed the account: a check that
    -- ran as of an earlier time (a slower worker) changes nothing.
    checked_at       timestamptz NOT NULL DEFAULT now(),
    -- When billing last asked provisioning to stop the tenant's running
    -- allocations (it asks again only for runs that opened after).
    stop_requested_at timestamptz,
    version          bigint NOT NULL DEFAULT 1,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE billing_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing_accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY billing_accounts_isolation ON billing_accounts FOR SELECT
    USING (tenant_id = keel_current_tenant());
GRANT SELECT ON billing_accounts TO keel_app;
GRANT SELECT, INSERT, UPDATE ON billing_accounts TO keel_system;

-- Provisioning's side: a tenant whose launches are held (set and cleared
-- by the provisioning consumer from billing's events). Launching and
-- starting are refused while a hold exists.
CREATE TABLE launch_holds (
    tenant_id        uuid PRIMARY KEY REFERENCES tenants (id),
    reason           text NOT NULL,
    held_since       timestamptz NOT NULL DEFAULT now(),
    -- The event that set it.
    source_event_id  uuid NOT NULL
);
ALTER TABLE launch_holds ENABLE ROW LEVEL SECURITY;
ALTER TABLE launch_holds FORCE ROW LEVEL SECURITY;
CREATE POLICY launch_holds_isolation ON launch_holds FOR SELECT
    USING (tenant_id = keel_current_tenant());
GRANT SELECT ON launch_holds TO keel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON launch_holds TO keel_system;
