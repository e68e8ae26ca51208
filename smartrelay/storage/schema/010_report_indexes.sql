-- The reports UI (smartrelay/storage/reports.py): message search by index on both engines,
-- the queue page's grouping by destination, the feedback list, and clicks per URL.

-- Search terms of each message, written with it in queue_message's transaction: one row per
-- distinct term, `r:` + recipient address and `rd:` + recipient domain, `s:` + sender and
-- `sd:` + sender domain (addresses and domains lower-cased), `t:` + tag, `m:` + the JSON
-- array [key, value] of a metadata entry. A term longer than 500 characters is not kept (and
-- cannot be searched). The tags and metadata live in JSON text columns that no index can
-- read on both engines; a search by sender domain or recipient domain would otherwise need
-- an expression index or a join through `recipients`. Every search by one of these filters
-- is one range of the primary key in the page's order: (term, received_at, queue_id),
-- newest first, the keyset position included. Filled for the messages already stored by a
-- Python step of this delta (reports.backfill_report_tables); deleted with the message
-- (retention, and ON DELETE CASCADE).
CREATE TABLE message_terms (
    term TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    queue_id TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    PRIMARY KEY (term, received_at, queue_id)
);
-- A second filter is checked per candidate message (queue_id, term); the purge and the
-- cascade find a message's terms here.
CREATE INDEX message_terms_queue_id ON message_terms (queue_id, term);

-- Every search in the page's order (received_at, queue_id), newest first: the time range and
-- the search without a term filter (queue id, outcome, or nothing) walk this index. It
-- replaces messages_received_at (received_at), of which it is an extension.
CREATE INDEX messages_received_order ON messages (received_at, queue_id);
DROP INDEX messages_received_at;

-- The outcome filter: the messages having a recipient in a state (a set built from this index
-- and probed while walking messages_received_order).
CREATE INDEX recipients_state ON recipients (state, queue_id);

-- The queue page: recipients still to deliver, by destination (grouped, listed by id for the
-- keyset, retried or dropped per destination). Partial: only work still to do, like
-- recipients_due.
CREATE INDEX recipients_pending_domain ON recipients (domain, id)
    WHERE next_attempt_at IS NOT NULL;

-- The feedback page: reports of one kind, newest first.
CREATE INDEX feedback_reports_kind ON feedback_reports (kind, received_at, report_id);

-- The dashboard reads the '*' rows of a period: (tag, hour) first, so that a 30-day read does
-- not walk the rows of every tag.
CREATE INDEX rollups_tag_hour ON rollups (tag, hour, recipient_domain);

-- Clicks per hour x tag x URL, counted by the roll-up pass (storage/rollups.py) in the same
-- transaction as `rollups`. `url` is the clicked URL reduced to scheme://host/path (query
-- string and fragment dropped: a personalised query would make one row per recipient), at most
-- 2,000 characters. `machine_count`: the clicks of those that were a machine's.
CREATE TABLE rollup_urls (
    hour BIGINT NOT NULL,
    tag TEXT NOT NULL,
    url TEXT NOT NULL,
    count BIGINT NOT NULL,
    machine_count BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tag, url)
);
CREATE INDEX rollup_urls_tag_hour ON rollup_urls (tag, hour);
