-- Outbox delivery: each outbox event is fanned out to every consumer that
-- wants it (one row per consumer and event), and each row is handed to
-- that consumer's apalis queue when it is the oldest undelivered event of
-- its aggregate for that consumer. This keeps per-aggregate order under
-- SKIP LOCKED and several workers, and keeps retry state (attempts,
-- backoff in available_at, dead letters) in our own table, in the
-- database, where operators can inspect and replay it.

CREATE TABLE outbox_deliveries (
    consumer      text NOT NULL,
    event_id      uuid NOT NULL REFERENCES outbox (id),
    -- Copied from the event so ordering needs no join.
    aggregate_id  uuid NOT NULL,
    seq           bigint NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'queued', 'done', 'dead')),
    attempts      integer NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX outbox_deliveries_open_idx ON outbox_deliveries (consumer, aggregate_id, seq)
    WHERE status IN ('pending', 'queued');
CREATE INDEX outbox_deliveries_due_idx ON outbox_deliveries (available_at) WHERE status = 'pending';

-- What each consumer has finished, written in the transaction that marks
-- the delivery done: a re-run job finds it and does nothing.
CREATE TABLE consumer_inbox (
    consumer      text NOT NULL,
    event_id      uuid NOT NULL REFERENCES outbox (id),
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

GRANT SELECT, INSERT, UPDATE ON outbox_deliveries, consumer_inbox TO keel_system;
GRANT SELECT, UPDATE (task_seq, last_seen_at) ON hosts TO keel_system;

-- apalis keeps its jobs in its own schema (created by its migrations,
-- which keel_db::migrate runs before ours). The worker's apalis backend
-- runs on plain pool connections, so the runtime role needs these itself.
GRANT USAGE ON SCHEMA apalis TO keel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA apalis TO keel_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA apalis TO keel_app;
