-- The worker purges what the outbox no longer needs (keel_outbox::retention):
-- delivered events a week after their fan-out, with their deliveries and
-- inbox rows. Finished apalis jobs it deletes as keel_app already may.
GRANT DELETE ON outbox, outbox_deliveries, consumer_inbox TO keel_system;
