-- Sandbox credentials (docs/smtp.md, "Sandbox credentials"): mail submitted with one is
-- stored and re-wrapped as usual, then recorded as delivered (sandbox: true) without leaving
-- the relay, or sent to `[delivery] sandbox_route`. The flag is copied onto the message at
-- accept (0 or 1, as every flag here), so changing the credential later does not change mail
-- already accepted.
ALTER TABLE smtp_credentials ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
