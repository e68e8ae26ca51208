-- Events of one recipient over time, whatever the case of the address: the soft-bounce count
-- of the suppression policy, and the message log of the reports UI.
CREATE INDEX events_recipient_time ON events (lower(recipient), time);
