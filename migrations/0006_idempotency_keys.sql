-- Idempotency keys (Stripe semantics). A row is written in the SAME
-- transaction as the change it guards, together with the response, so a
-- retry after a crash either finds both or neither. Keys are scoped to the
-- principal (and tenant) that sent them and purged after the retention
-- period (at least 24 hours) by the worker.
CREATE TABLE idempotency_keys (
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    principal      text NOT NULL,
    key            text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of method, path and body: the same key with another request
    -- is refused.
    request_hash   bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    status_code    smallint,
    response_headers jsonb,
    response_body  bytea,
    PRIMARY KEY (tenant_id, principal, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY idempotency_keys_isolation ON idempotency_keys
    USING (tenant_id = keel_current_tenant());

GRANT SELECT, INSERT, UPDATE ON idempotency_keys TO keel_app;
GRANT DELETE ON idempotency_keys TO keel_system;
