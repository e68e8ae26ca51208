-- Content warnings (docs/deliverability.md): when a message's warnings were recorded. The
-- `warning` event is inserted in the transaction that sets this, and only while it is NULL,
-- so a message's warnings are recorded once, whatever its retries, restarts and delivery
-- processes. NULL: not recorded yet (also for a message without warnings: nothing is written).
ALTER TABLE messages ADD COLUMN warnings_checked_at BIGINT;
