-- Batched delivery (keel-outbox; doc/performance.md): a consumer that takes
-- batches gets several deliveries in one apalis job. Each delivery records
-- the idempotency key of the job it was released in, which the stranded
-- sweep looks for (before, the key was always the delivery's own
-- `event_id:attempts`; rows without one still mean that).
ALTER TABLE outbox_deliveries ADD COLUMN job_key text;
