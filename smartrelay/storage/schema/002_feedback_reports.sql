-- Messages received by the inbound listener (bounces, FBL reports, replies to the return
-- path), kept raw until the feedback processor classifies them. `state` is 'new' until then.
CREATE TABLE feedback_reports (
    report_id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    client_ip TEXT,
    state TEXT NOT NULL,
    processed_at BIGINT,
    raw $BLOB NOT NULL
);
CREATE INDEX feedback_reports_new ON feedback_reports (received_at) WHERE state = 'new';
