-- A message's raw body in a table of its own, so that the purge of bodies ([retention]
-- message_bodies) deletes whole rows: on SQLite, emptying a column in place left the part of
-- the row kept on its own page (up to about 4 KB of every message) unused until the message
-- row itself went, 90 days later (bench/disk.py measured it); whole rows deleted in finishing
-- order empty whole pages, which incremental vacuum gives back.
CREATE TABLE message_bodies (
    queue_id TEXT PRIMARY KEY REFERENCES messages (queue_id) ON DELETE CASCADE,
    raw $BLOB NOT NULL
);
INSERT INTO message_bodies (queue_id, raw)
    SELECT queue_id, raw FROM messages WHERE body_purged_at IS NULL;
ALTER TABLE messages DROP COLUMN raw;
