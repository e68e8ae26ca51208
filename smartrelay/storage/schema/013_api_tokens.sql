-- Bearer tokens for GET /api/events and /metrics (docs/api.md): `api-token add NAME` prints
-- a token once; only its SHA-256 (hex) is kept (a token is 256 random bits, so a fast hash
-- is enough, and a lookup by hash needs no secret comparison).
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT
);
