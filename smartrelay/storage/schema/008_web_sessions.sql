-- The reports UI's logins (docs/web-ui.md, "Logins and sessions"). A session is a random token
-- in the browser's cookie; the database keeps only its SHA-256 (`token_hash`), so a copy of the
-- database does not let its reader log in. `csrf`: the token every form of the session must
-- send back. A session ends at `expires_at` (absolute) or after `idle_until` passes without a
-- request; removing the user or changing their password ends their sessions.
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES web_users (name) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    idle_until BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
CREATE INDEX web_sessions_username ON web_sessions (username);

-- Failed logins, per client IP (`key` 'ip:ADDRESS') and per user name ('user:NAME'), for the
-- login throttle: after a few failures, further attempts from that IP or for that user must
-- wait, longer after each failure. Rows older than the throttle's window are deleted.
CREATE TABLE web_login_failures (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    last_failure_at BIGINT NOT NULL
);
CREATE INDEX web_login_failures_last ON web_login_failures (last_failure_at);
