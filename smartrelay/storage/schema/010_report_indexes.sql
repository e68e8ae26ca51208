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
-- newest first, the keyset position included; a second filter is a seek of the same key per
-- candidate. Nothing else: no index by queue id and no foreign key (each would cost every
-- accepted message's terms one more B-tree write or lookup); the purge deletes a message's
-- terms by primary key, computed again from the message (storage/search_terms.py). On
-- SQLite the table is its primary key (WITHOUT ROWID). Filled for the messages already
-- stored by a Python step of this delta (reports.backfill_report_tables).
CREATE TABLE message_terms (
    term TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    queue_id TEXT NOT NULL,
    PRIMARY KEY (term, received_at, queue_id)
) $WITHOUT_ROWID;

-- Every search in the page's order (received_at, queue_id), newest first: the time range and
-- the search without a term filter (queue id, outcome, or nothing) walk this index. It
-- replaces messages_received_at (received_at), of which it is an extension.
CREATE INDEX messages_received_order ON messages (received_at, queue_id);
DROP INDEX messages_received_at;

-- The outcome filter: does this message have a recipient in that state (one seek per message
-- met while walking messages_received_order or message_terms).
CREATE INDEX recipients_state ON recipients (state, queue_id);

-- The queue page: recipients still to deliver, by destination (grouped, listed by id for the
-- keyset, retried or dropped per destination). Partial: only work still to do, like
-- recipients_due.
CREATE INDEX recipients_pending_domain ON recipients (domain, id)
    WHERE next_attempt_at IS NOT NULL;

-- The feedback page: reports newest first (all, or of one kind); the first also serves the
-- purge, in place of feedback_reports_received_at (received_at).
CREATE INDEX feedback_reports_kind ON feedback_reports (kind, received_at, report_id);
CREATE INDEX feedback_reports_recent ON feedback_reports (received_at, report_id);
DROP INDEX feedback_reports_received_at;

-- The dashboard over 30 days: `rollups` has a row per hour and pair of domains that occurred,
-- about two rows per event at a relay with thousands of recipient domains (bench/reports.py:
-- 2 million rows for a million events), too many to sum at page load. Two summaries of it,
-- written by the roll-up pass in the same transaction (storage/rollups.py): per hour x tag x
-- type x detail, which rollup_totals and rollup_series read when no domain is filtered on;
-- and per UTC day x tag x recipient domain x type (received, delivered, deferred, bounced,
-- complained), which top_recipient_domains reads for the whole days of its period (the hours
-- at its two ends come from `rollups`). Filled here from `rollups`.
CREATE TABLE rollups_by_tag (
    hour BIGINT NOT NULL,
    tag TEXT NOT NULL,
    type TEXT NOT NULL,
    detail TEXT NOT NULL,
    count BIGINT NOT NULL,
    unique_count BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tag, hour, type, detail)
);
INSERT INTO rollups_by_tag (hour, tag, type, detail, count, unique_count)
    SELECT hour, tag, type, detail, SUM(count), SUM(unique_count) FROM rollups
    GROUP BY hour, tag, type, detail;
CREATE TABLE rollups_by_domain_day (
    day BIGINT NOT NULL,
    tag TEXT NOT NULL,
    recipient_domain TEXT NOT NULL,
    type TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (tag, day, recipient_domain, type)
);
INSERT INTO rollups_by_domain_day (day, tag, recipient_domain, type, count)
    SELECT hour - hour % 86400000, tag, recipient_domain, type, SUM(count) FROM rollups
    WHERE type IN ('received', 'delivered', 'deferred', 'bounced', 'complained')
    GROUP BY hour - hour % 86400000, tag, recipient_domain, type;
-- A domain filter on the dashboard reads that domain's rows of `rollups` only.
CREATE INDEX rollups_tag_sender_domain ON rollups (tag, sender_domain, hour);
CREATE INDEX rollups_tag_recipient_domain ON rollups (tag, recipient_domain, hour);

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
-- The same per UTC day: top_urls reads the whole days of its period here (a month of
-- rollup_urls is 200,000 rows at bench/reports.py's relay), the hours at its ends above.
CREATE TABLE rollup_urls_by_day (
    tag TEXT NOT NULL,
    day BIGINT NOT NULL,
    url TEXT NOT NULL,
    count BIGINT NOT NULL,
    machine_count BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tag, day, url)
);
