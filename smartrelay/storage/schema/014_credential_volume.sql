-- Per-credential volume alerts (docs/smtp.md, "Volume alerts"): each SMTP credential's
-- baseline (messages per window, exponentially weighted), its last alert, and whether its
-- mail is held (451 4.7.1) until `smtp-credential release NAME`. Gone with the credential.
CREATE TABLE credential_volume (
    credential TEXT PRIMARY KEY REFERENCES smtp_credentials (name) ON DELETE CASCADE,
    baseline DOUBLE PRECISION,
    windows INTEGER NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    alerted_at BIGINT,
    held_at BIGINT,
    hold_reason TEXT
);
