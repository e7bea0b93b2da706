-- The worker purges what the outbox no longer needs (keel_outbox::retention):
-- delivered events a week after their fan-out, with their deliveries and
-- inbox rows. Finished apalis jobs it deletes as keel_app already may.
GRANT DELETE ON outbox, outbox_deliveries, consumer_inbox TO keel_system;

-- Deleting an event checks both foreign keys that point at it: without
-- these, every deleted event would scan both tables.
CREATE INDEX outbox_deliveries_event ON outbox_deliveries (event_id);
CREATE INDEX consumer_inbox_event ON consumer_inbox (event_id);
