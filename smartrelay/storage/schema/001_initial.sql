-- SmartRelay schema, version 1. Portable SQL for SQLite and PostgreSQL; each engine rewrites
-- $ID_PK (auto-increment primary key) and $BLOB (raw bytes). Times are integer milliseconds
-- since the Unix epoch (UTC); JSON values are TEXT.

-- One row per accepted message. Written with its recipients and `received` events in one
-- transaction before the SMTP listener answers 250.
CREATE TABLE messages (
    queue_id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    sender TEXT NOT NULL,
    size BIGINT NOT NULL,
    client_ip TEXT,
    credential TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    options TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    raw $BLOB NOT NULL
);
CREATE INDEX messages_received_at ON messages (received_at);
CREATE INDEX messages_idempotency ON messages (idempotency_key, received_at)
    WHERE idempotency_key IS NOT NULL;

-- One row per (message, recipient): the delivery queue. `next_attempt_at` is NULL once the
-- recipient reached a final state, so the partial index holds only work still to do and
-- finding due work is an index range scan, never a table scan. A claimed row carries its
-- lease: `next_attempt_at` is pushed to the lease expiry, so a row whose owner died becomes
-- due again by itself.
CREATE TABLE recipients (
    id $ID_PK,
    queue_id TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    lease_owner TEXT,
    last_reply TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX recipients_due ON recipients (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX recipients_queue_id ON recipients (queue_id);

-- Every state change, one row (SPEC section 5). `data` holds the type's extra fields.
CREATE TABLE events (
    id $ID_PK,
    type TEXT NOT NULL,
    time BIGINT NOT NULL,
    queue_id TEXT,
    recipient TEXT,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_time ON events (time);
CREATE INDEX events_type_time ON events (type, time);
CREATE INDEX events_queue_id ON events (queue_id);

-- Addresses not to send to, lower-cased. `expires_at` NULL means forever.
CREATE TABLE suppressions (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX suppressions_expires_at ON suppressions (expires_at);

-- SMTP AUTH logins for applications; password hashes only (scrypt).
CREATE TABLE smtp_credentials (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Logins for the reports UI; password hashes only (scrypt).
CREATE TABLE web_users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
