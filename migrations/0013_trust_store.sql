-- The control plane's trust material, shared by every api and worker
-- process. Private keys are stored only sealed (keel-kms envelopes: a data
-- key per secret, wrapped by the configured KMS, bound to a context naming
-- the row); public halves are plain.
CREATE TABLE certificate_authorities (
    kind               text PRIMARY KEY CHECK (kind IN ('node', 'control-plane')),
    certificate_pem    text NOT NULL,
    private_key_sealed bytea NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Task-signing keys. A key signs from `signs_from` (the newest such key
-- signs) and is trusted by agents until `retires_at`. `ca_signature` is the
-- control-plane CA's signature over the key, `signs_from` and `retires_at`
-- (keel-task `key_statement`): agents accept a key, or a retirement, only
-- with it, so writing this table gains nothing without the CA's key.
CREATE TABLE task_signing_keys (
    key_id             text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
    public_key         text NOT NULL,
    private_key_sealed bytea NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    signs_from         timestamptz NOT NULL,
    retires_at         timestamptz,
    ca_signature       bytea NOT NULL CHECK (octet_length(ca_signature) BETWEEN 8 AND 80),
    CHECK (retires_at IS NULL OR retires_at > signs_from)
);

-- Every node certificate ever issued, for revocation: a handshake with a
-- certificate whose serial is revoked here fails (the api keeps a deny
-- list from this table; see keel_inventory::revocation).
CREATE TABLE node_certificates (
    serial          text PRIMARY KEY,
    -- Never cascaded away: a revoked serial must stay on the deny list.
    host_id         uuid NOT NULL REFERENCES hosts (id) ON DELETE RESTRICT,
    enrolment_epoch bigint NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    not_after       timestamptz NOT NULL,
    revoked_at      timestamptz
);
CREATE INDEX node_certificates_host ON node_certificates (host_id);
CREATE INDEX node_certificates_revoked ON node_certificates (not_after) WHERE revoked_at IS NOT NULL;
INSERT INTO node_certificates (serial, host_id, enrolment_epoch, issued_at, not_after, revoked_at)
    SELECT cert_serial, id, enrolment_epoch, enrolled_at, cert_not_after, revoked_at FROM hosts;

-- Join tokens may be bound to an existing host: re-enrolment keeps the
-- node's id and bumps its epoch.
ALTER TABLE join_tokens ADD COLUMN for_host uuid REFERENCES hosts (id) ON DELETE CASCADE;

-- Platform tables: only system transactions (BYPASSRLS) see a row.
ALTER TABLE certificate_authorities ENABLE ROW LEVEL SECURITY;
ALTER TABLE certificate_authorities FORCE ROW LEVEL SECURITY;
ALTER TABLE task_signing_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE task_signing_keys FORCE ROW LEVEL SECURITY;
ALTER TABLE node_certificates ENABLE ROW LEVEL SECURITY;
ALTER TABLE node_certificates FORCE ROW LEVEL SECURITY;

GRANT SELECT, INSERT, UPDATE ON certificate_authorities, task_signing_keys, node_certificates TO keel_system;
