-- Retention (docs/storage.md, "Retention and purge") and the hourly roll-ups the reports read.

-- When the message's last recipient reached a final state (NULL while any is still to be
-- delivered), and when its raw body was deleted (NULL while it is kept). The two partial
-- indexes are what the purge walks: bodies still kept of finished messages, and finished
-- messages; each in finishing order, so a purge batch is an index range, never a scan.
ALTER TABLE messages ADD COLUMN finished_at BIGINT;
ALTER TABLE messages ADD COLUMN body_purged_at BIGINT;
UPDATE messages SET finished_at = (
    SELECT MAX(r.updated_at) FROM recipients r WHERE r.queue_id = messages.queue_id)
    WHERE NOT EXISTS (SELECT 1 FROM recipients r
                      WHERE r.queue_id = messages.queue_id AND r.next_attempt_at IS NOT NULL);
CREATE INDEX messages_bodies_kept ON messages (finished_at)
    WHERE finished_at IS NOT NULL AND body_purged_at IS NULL;
CREATE INDEX messages_finished ON messages (finished_at) WHERE finished_at IS NOT NULL;

-- Events in (time, id) order: the roll-up reads them in that order from where it stopped.
DROP INDEX events_time;
CREATE INDEX events_time ON events (time, id);

CREATE INDEX feedback_reports_received_at ON feedback_reports (received_at);

-- Event counts per hour, outliving the events (retention). `tag` is '*' for every event
-- (each counted once) and otherwise one of the message's tags (an event of a message with two
-- tags is counted in both). `detail`: for bounced, the category and 'hard' or 'soft'
-- ('mailbox:hard'); for opened and clicked, 'human' or 'machine'; else ''. `unique_count`:
-- for opened and clicked, the events that were the recipient's first human one.
CREATE TABLE rollups (
    hour BIGINT NOT NULL,
    tag TEXT NOT NULL,
    sender_domain TEXT NOT NULL,
    recipient_domain TEXT NOT NULL,
    type TEXT NOT NULL,
    detail TEXT NOT NULL,
    count BIGINT NOT NULL,
    unique_count BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tag, sender_domain, recipient_domain, type, detail)
);

-- How far the roll-up has read the events: every event before (time_ms, last_id), in
-- (time, id) order, is counted in `rollups`. One row, name 'rollups'.
CREATE TABLE rollup_progress (
    name TEXT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    last_id BIGINT NOT NULL
);
