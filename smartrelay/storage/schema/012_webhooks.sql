-- Webhooks (docs/webhooks.md): each [[webhooks]] url's progress and state, and the batches
-- that exhausted their retries. A position is (txid, id) as in `events` (011).

-- One row per configured url, made when the relay first sees it (at the events' head then:
-- a new endpoint gets events from then on, not the whole history).
CREATE TABLE webhook_endpoints (
    url TEXT PRIMARY KEY,
    -- every event up to this position has been acknowledged (or dead-lettered)
    position_txid BIGINT NOT NULL,
    position_id BIGINT NOT NULL,
    -- 'active' or 'disabled' (the receiver answered 410, or `webhooks disable`)
    state TEXT NOT NULL DEFAULT 'active',
    disabled_at BIGINT,
    disabled_reason TEXT,
    -- the current run of failures: since when, how many attempts, the next one, the last error
    failing_since BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    last_error TEXT,
    last_success_at BIGINT,
    -- totals for /metrics (every node's)
    sent_events BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    -- the node sending for this endpoint now (one at a time) and until when
    lease_owner TEXT,
    lease_until BIGINT,
    created_at BIGINT NOT NULL
);

-- Ranges of events an endpoint did not take within `retry_for`: (after, upto] in position
-- order, the endpoint's event types applied when they are sent again (`webhooks dead replay`).
CREATE TABLE webhook_dead_letters (
    id $ID_PK,
    url TEXT NOT NULL,
    after_txid BIGINT NOT NULL,
    after_id BIGINT NOT NULL,
    upto_txid BIGINT NOT NULL,
    upto_id BIGINT NOT NULL,
    events INTEGER NOT NULL,
    first_event_at BIGINT,
    last_event_at BIGINT,
    created_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    -- a replay asked for (CLI or UI) and how far it got
    replay_requested_at BIGINT,
    replay_txid BIGINT,
    replay_id BIGINT
);
CREATE INDEX webhook_dead_letters_url ON webhook_dead_letters (url, id);
