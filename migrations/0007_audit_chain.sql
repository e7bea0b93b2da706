-- A tamper-evident audit log: each tenant's entries form a hash chain.
--
-- Writers insert entries unsealed, so concurrent transactions never queue
-- behind one another. A background sealer (the worker) takes each chain's
-- unsealed entries in id order, gives them the next sequence numbers and
-- hash = SHA-256(previous hash ‖ canonical entry), and moves the chain's
-- head. Verification recomputes every link: an entry altered in the
-- database no longer matches its hash, a removed one leaves a gap in the
-- sequence, and removed entries at the end no longer reach the head.
-- Entries without a tenant (operator and system actions) form the platform
-- chain, keyed by the nil UUID.
ALTER TABLE audit_log
    ADD COLUMN chain_seq   bigint,
    ADD COLUMN prev_hash   bytea,
    ADD COLUMN entry_hash  bytea,
    ADD COLUMN sealed_at   timestamptz;
CREATE UNIQUE INDEX audit_log_chain_key ON audit_log
    (COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), chain_seq)
    WHERE chain_seq IS NOT NULL;
CREATE INDEX audit_log_unsealed_idx ON audit_log
    (COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), id)
    WHERE entry_hash IS NULL;

CREATE TABLE audit_chain_heads (
    chain_id   uuid PRIMARY KEY,  -- the tenant id, or nil for the platform
    seq        bigint NOT NULL,
    head_hash  bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE audit_chain_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_chain_heads FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_chain_heads_isolation ON audit_chain_heads
    USING (chain_id = keel_current_tenant());

-- Tenants read their chain; only the sealer (a system transaction) writes
-- the chain columns, never the entries' content.
GRANT SELECT ON audit_chain_heads TO keel_app;
GRANT INSERT, UPDATE ON audit_chain_heads TO keel_system;
GRANT UPDATE (chain_seq, prev_hash, entry_hash, sealed_at) ON audit_log TO keel_system;
