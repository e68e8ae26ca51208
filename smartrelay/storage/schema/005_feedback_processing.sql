-- The feedback processor's verdict on each report (docs/feedback-processing.md): what the
-- report is (`kind`: bounce, complaint, autoreply, other, unsubscribe), why it has its state
-- (`reason`: why it was ignored or could not be matched, or what was recorded), how it was
-- tied to our message (`matched_by`: verp, mailto, smartrelay-id, message-id, address) and
-- the message and recipient it was tied to (the first one when it names several).
ALTER TABLE feedback_reports ADD COLUMN kind TEXT;
ALTER TABLE feedback_reports ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE feedback_reports ADD COLUMN matched_by TEXT;
ALTER TABLE feedback_reports ADD COLUMN queue_id TEXT;
ALTER TABLE feedback_reports ADD COLUMN recipient TEXT;
ALTER TABLE feedback_reports ADD COLUMN recipient_id BIGINT;

-- `feedback list --state S` and `feedback reprocess --all-unmatched`, in arrival order.
CREATE INDEX feedback_reports_state ON feedback_reports (state, received_at, report_id);
