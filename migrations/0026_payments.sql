-- Payments (keel-payments; doc/payments.md): money that reaches Keel
-- through a payment provider, recorded in the credit ledger.
--
-- The ledger gains three kinds of entry:
--   payment      + money received for one invoice (with invoice_id)
--   settlement   - that money applied to the invoice (with invoice_id); a
--                  payment and its settlement net to zero
--   refund_failed + a recorded refund that the provider later reported
--                  as failed: the money came back
-- and refunds name the payment they return (payment_reference), so the
-- refunds of a payment never exceed it.
ALTER TABLE credit_entries DROP CONSTRAINT credit_entries_kind_check;
ALTER TABLE credit_entries ADD CONSTRAINT credit_entries_kind_check CHECK (kind IN (
    'grant', 'purchase', 'draw', 'reversal', 'refund', 'payment', 'settlement', 'refund_failed'));
ALTER TABLE credit_entries DROP CONSTRAINT credit_entries_check;
ALTER TABLE credit_entries ADD CONSTRAINT credit_entries_sign_check CHECK (
    CASE WHEN kind IN ('grant', 'purchase', 'reversal', 'payment', 'refund_failed') THEN amount > 0
         ELSE amount < 0 END);
ALTER TABLE credit_entries DROP CONSTRAINT credit_entries_check1;
ALTER TABLE credit_entries ADD CONSTRAINT credit_entries_invoice_check CHECK (
    (kind IN ('draw', 'reversal', 'payment', 'settlement')) = (invoice_id IS NOT NULL));
ALTER TABLE credit_entries ADD COLUMN payment_reference text;
ALTER TABLE credit_entries ADD CONSTRAINT credit_entries_refund_check CHECK (
    (kind IN ('refund', 'refund_failed')) = (payment_reference IS NOT NULL));
CREATE INDEX credit_entries_payment ON credit_entries (payment_reference)
    WHERE payment_reference IS NOT NULL;

-- Invoices paid out of band before this migration get their payment and
-- settlement, so that the reconciliation's new check holds for them too.
-- Their ids are UUIDv7-shaped from the time the invoice was paid (the
-- ledger lists entries in id order, oldest first), the payment before
-- its settlement.
INSERT INTO credit_entries (id, tenant_id, kind, amount, currency, invoice_id, note, created_at)
SELECT (lpad(to_hex((extract(epoch FROM coalesce(i.paid_at, now())) * 1000)::bigint), 12, '0')
        || '7' || CASE e.kind WHEN 'payment' THEN '000' ELSE '001' END
        || '8' || substr(md5(i.id::text || e.kind), 1, 15))::uuid,
       i.tenant_id, e.kind, e.sign * i.total, i.currency, i.id,
       coalesce(i.payment_method, ''), coalesce(i.paid_at, now())
  FROM invoices i
 CROSS JOIN (VALUES ('payment', 1), ('settlement', -1)) AS e (kind, sign)
 WHERE i.state = 'paid' AND i.total > 0
 ORDER BY i.id, e.sign DESC;

-- The provider's customer of each tenant (one per tenant and provider).
CREATE TABLE payment_customers (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    provider      text NOT NULL CHECK (provider IN ('stripe')),
    customer_id   text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider),
    UNIQUE (provider, customer_id)
);

-- A payment a tenant started at the provider: credit to buy, or an
-- invoice to pay. Its amount and currency are fixed here, before the
-- tenant pays; the provider's word that it was paid must match them.
CREATE TABLE checkouts (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL REFERENCES tenants (id),
    provider            text NOT NULL CHECK (provider IN ('stripe')),
    provider_session_id text NOT NULL,
    purpose             text NOT NULL CHECK (purpose IN ('credit', 'invoice')),
    invoice_id          uuid REFERENCES invoices (id),
    amount              bigint NOT NULL CHECK (amount > 0),
    currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    url                 text,
    expires_at          timestamptz NOT NULL,
    -- open → paid | expired; `refused` when the provider's word did not
    -- match what was started here (an operator looks at it).
    status              text NOT NULL DEFAULT 'open'
                        CHECK (status IN ('open', 'paid', 'expired', 'refused')),
    -- The provider's payment, once paid (what refunds name).
    payment_reference   text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_session_id),
    CHECK ((purpose = 'invoice') = (invoice_id IS NOT NULL))
);
CREATE INDEX checkouts_tenant ON checkouts (tenant_id, id);
CREATE INDEX checkouts_invoice ON checkouts (invoice_id) WHERE invoice_id IS NOT NULL;
CREATE INDEX checkouts_payment ON checkouts (payment_reference)
    WHERE payment_reference IS NOT NULL;

-- Every webhook event Stripe delivered, once: the row is written in the
-- transaction of the event's effect, so a replayed or redelivered event
-- finds it and changes nothing.
CREATE TABLE stripe_events (
    event_id      text PRIMARY KEY,
    event_type    text NOT NULL,
    livemode      boolean NOT NULL,
    -- applied | ignored | refused | deferred | expired; `detail` says why.
    outcome       text NOT NULL,
    detail        text NOT NULL DEFAULT '',
    tenant_id     uuid REFERENCES tenants (id),
    -- A refund that arrived before its payment waits here (outcome
    -- `deferred`) and is applied when the payment is recorded.
    deferred_payment text,
    refund_id     text,
    refund_amount bigint,
    refund_currency text,
    received_at   timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_deferred ON stripe_events (deferred_payment)
    WHERE outcome = 'deferred';

-- Refunds Stripe reported failed or canceled before Keel recorded them
-- (Stripe does not order its events): a `succeeded` event that comes
-- later for one of them is refused.
CREATE TABLE stripe_failed_refunds (
    refund_id   text PRIMARY KEY,
    event_id    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE payment_customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE payment_customers FORCE ROW LEVEL SECURITY;
CREATE POLICY payment_customers_isolation ON payment_customers FOR SELECT
    USING (tenant_id = keel_current_tenant());
-- Stripe's events are the system's alone (no policy: no tenant reads one).
ALTER TABLE stripe_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE stripe_events FORCE ROW LEVEL SECURITY;
ALTER TABLE checkouts ENABLE ROW LEVEL SECURITY;
ALTER TABLE checkouts FORCE ROW LEVEL SECURITY;
CREATE POLICY checkouts_isolation ON checkouts FOR SELECT
    USING (tenant_id = keel_current_tenant());

-- Tenants read their own customer and checkouts; webhook effects are
-- written as the system role.
GRANT SELECT ON payment_customers, checkouts TO keel_app;
GRANT SELECT, INSERT ON payment_customers TO keel_system;
GRANT SELECT, INSERT, UPDATE ON checkouts TO keel_system;
GRANT SELECT, INSERT, UPDATE ON stripe_events TO keel_system;
GRANT SELECT, INSERT ON stripe_failed_refunds TO keel_system;

-- A tenant's admin starts a checkout in the tenant's own transaction: it
-- may add its own rows only.
CREATE POLICY payment_customers_insert ON payment_customers FOR INSERT
    WITH CHECK (tenant_id = keel_current_tenant());
CREATE POLICY checkouts_insert ON checkouts FOR INSERT
    WITH CHECK (tenant_id = keel_current_tenant());
GRANT INSERT ON payment_customers, checkouts TO keel_app;
