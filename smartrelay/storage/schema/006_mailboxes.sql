-- [[feedback.mailboxes]] (docs/feedback-mailboxes.md): the messages of each mailbox that are
-- done, i.e. stored as a feedback report and processed, so that a reader never fetches them
-- again. `mailbox`: the mailbox's URL without its password (scheme://user@host:port/folder);
-- `uid`: 'UIDVALIDITY:UID' for IMAP, the UIDL for POP3. A row outlives the report (retention)
-- as long as its message stays in the mailbox (delete_after_processing = false): the reader
-- forgets the rows of messages that are no longer listed.
CREATE TABLE mailbox_messages (
    mailbox TEXT NOT NULL,
    uid TEXT NOT NULL,
    report_id TEXT NOT NULL,
    done_at BIGINT NOT NULL,
    PRIMARY KEY (mailbox, uid)
);
