-- Event positions (docs/storage.md, "Event positions"): the order in which events become
-- visible, which the webhooks and the event API read them in, gap-free and without a delay.
-- PostgreSQL: `txid` is the inserting transaction's id (pg_current_xact_id()); a reader
-- takes only rows of transactions older than every transaction still running
-- (pg_snapshot_xmin), in (txid, id) order, so a row that commits late is never passed over.
-- Rows written before this version, and rows copied in by copy-data, have txid 0: they come
-- first, in id order. SQLite (one writer at a time, ids given in commit order): txid is
-- always 0 and the position is the id; no index is needed.
ALTER TABLE events ADD COLUMN txid $EVENT_TXID;
$EVENT_TXID_INDEX
