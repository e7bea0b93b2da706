-- Billing, second slice (keel-billing; doc/billing.md): rate cards, the cut
-- of open runs at period ends, invoices and the prepaid credit ledger.
-- Money is integer minor units of an ISO 4217 currency everywhere.

-- The exclusion constraint on rate cards compares text with `=` in a GiST
-- index. btree_gist is a trusted contrib extension.
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- A price for running one flavor in one region, from `effective_from` until
-- the next card of the pair takes over (`effective_until`, set then). Cards
-- never change otherwise: a price change is a new card, never a rewrite of
-- what was billed. Two cards of one pair never overlap in time.
CREATE TABLE rate_cards (
    id              uuid PRIMARY KEY,
    flavor          text NOT NULL REFERENCES flavors (name),
    region          text NOT NULL REFERENCES regions (name),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- The unit the price is per: run time per second, minute or hour.
    unit            text NOT NULL CHECK (unit IN ('second', 'minute', 'hour')),
    -- Minor units of `currency` per `unit`.
    unit_price      bigint NOT NULL CHECK (unit_price >= 0),
    effective_from  timestamptz NOT NULL,
    effective_until timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (effective_until IS NULL OR effective_until > effective_from),
    CONSTRAINT rate_cards_no_overlap EXCLUDE USING gist (
        flavor WITH =, region WITH =,
        tstzrange(effective_from, effective_until) WITH &&
    )
);
-- Prices are public to every signed-in tenant; operators (system role)
-- write them.
GRANT SELECT ON rate_cards TO keel_app;
GRANT SELECT, INSERT ON rate_cards TO keel_system;
GRANT UPDATE (effective_until) ON rate_cards TO keel_system;

-- An open run's time up to a period end is cut into usage records when
-- that period is invoiced; `billed_until` is where the next record starts.
ALTER TABLE meter_runs ADD COLUMN billed_until timestamptz;
ALTER TABLE meter_runs ADD CHECK (billed_until IS NULL OR billed_until >= started_at);

-- One invoice per tenant and billing period (a calendar month, UTC).
-- draft → finalized → paid | void; a draft is recomputed until it is
-- finalized, and a finalized invoice never changes but for its state.
CREATE TABLE invoices (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    period_start    date NOT NULL,
    period_end      date NOT NULL CHECK (period_end > period_start),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    state           text NOT NULL CHECK (state IN ('draft', 'finalized', 'paid', 'void')),
    -- Rated usage: the sum of the lines.
    subtotal        bigint NOT NULL CHECK (subtotal >= 0),
    -- Prepaid credit drawn (the ledger's `draw` entry for this invoice).
    credits         bigint NOT NULL CHECK (credits >= 0),
    tax_rate_bp     integer NOT NULL CHECK (tax_rate_bp BETWEEN 0 AND 10000),
    tax             bigint NOT NULL CHECK (tax >= 0),
    -- What is due.
    total           bigint NOT NULL CHECK (total >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finalized_at    timestamptz,
    paid_at         timestamptz,
    voided_at       timestamptz,
    -- How it was paid: `credit` (credit covered it), `manual` (an operator
    -- recorded a payment made out of band) or a payment provider's name.
    payment_method  text,
    payment_reference text,
    version         bigint NOT NULL DEFAULT 1,
    UNIQUE (tenant_id, period_start),
    CHECK (total = subtotal - credits + tax),
    CHECK (credits <= subtotal + tax),
    CHECK ((state = 'draft') = (finalized_at IS NULL)),
    CHECK ((state = 'paid') = (paid_at IS NOT NULL)),
    CHECK ((state = 'void') = (voided_at IS NOT NULL)),
    CHECK (state <> 'draft' OR credits = 0)
);
CREATE INDEX invoices_state ON invoices (state, period_start);

CREATE TABLE invoice_lines (
    invoice_id      uuid NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    line_no         integer NOT NULL,
    tenant_id       uuid NOT NULL,
    flavor          text NOT NULL,
    region          text NOT NULL,
    -- The card that priced the line; NULL for time no card covered.
    rate_card_id    uuid REFERENCES rate_cards (id),
    unit            text NOT NULL CHECK (unit IN ('second', 'minute', 'hour')),
    unit_price      bigint NOT NULL CHECK (unit_price >= 0),
    -- Run time in microseconds.
    quantity        bigint NOT NULL CHECK (quantity >= 0),
    amount          bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (invoice_id, line_no)
);

-- The invoice that billed a usage record; NULL until one is finalized. A
-- record that arrives after its period's invoice was finalized goes on the
-- next one.
ALTER TABLE usage_records ADD COLUMN invoice_id uuid REFERENCES invoices (id);
CREATE INDEX usage_records_unbilled ON usage_records (tenant_id, period_start)
    WHERE invoice_id IS NULL;
CREATE INDEX usage_records_invoice ON usage_records (invoice_id) WHERE invoice_id IS NOT NULL;
GRANT UPDATE (invoice_id) ON usage_records TO keel_system;
GRANT UPDATE (billed_until) ON meter_runs TO keel_system;

-- Prepaid credit: append-only. The balance is the sum of a tenant's
-- entries, never a number stored on its own.
CREATE TABLE credit_entries (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('grant', 'purchase', 'draw', 'reversal', 'refund')),
    -- Signed minor units: grants and purchases add, draws (credit paying an
    -- invoice) and refunds (a purchase paid back) take away; a reversal
    -- gives back the draw of an invoice that was voided.
    amount          bigint NOT NULL CHECK (amount <> 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- The invoice a draw paid or a reversal gave back.
    invoice_id      uuid REFERENCES invoices (id),
    -- The payment provider's or the operator's reference; unique, so one
    -- payment is credited once.
    reference       text UNIQUE,
    note            text NOT NULL DEFAULT '' CHECK (length(note) <= 500),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (CASE WHEN kind IN ('grant', 'purchase', 'reversal') THEN amount > 0
                ELSE amount < 0 END),
    CHECK ((kind IN ('draw', 'reversal')) = (invoice_id IS NOT NULL))
);
CREATE UNIQUE INDEX credit_entries_one_per_invoice ON credit_entries (invoice_id, kind)
    WHERE invoice_id IS NOT NULL;
CREATE INDEX credit_entries_tenant ON credit_entries (tenant_id, seq);

CREATE FUNCTION keel_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER credit_entries_append_only BEFORE UPDATE OR DELETE ON credit_entries
    FOR EACH ROW EXECUTE FUNCTION keel_append_only();

ALTER TABLE invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE invoices FORCE ROW LEVEL SECURITY;
CREATE POLICY invoices_isolation ON invoices FOR SELECT
    USING (tenant_id = keel_current_tenant());
ALTER TABLE invoice_lines ENABLE ROW LEVEL SECURITY;
ALTER TABLE invoice_lines FORCE ROW LEVEL SECURITY;
CREATE POLICY invoice_lines_isolation ON invoice_lines FOR SELECT
    USING (tenant_id = keel_current_tenant());
ALTER TABLE credit_entries ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_entries FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_entries_isolation ON credit_entries FOR SELECT
    USING (tenant_id = keel_current_tenant());

-- Tenants read; invoices and credit are written by operators and the
-- billing worker (system role).
GRANT SELECT ON invoices, invoice_lines, credit_entries TO keel_app;
GRANT SELECT, INSERT, UPDATE ON invoices TO keel_system;
-- A draft's lines are replaced when it is recomputed.
GRANT SELECT, INSERT, DELETE ON invoice_lines TO keel_system;
GRANT SELECT, INSERT ON credit_entries TO keel_system;
