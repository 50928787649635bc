-- 0003: the turn mailbox. Control letters (a cancel, a client tool result)
-- for a turn that runs on another replica than the one that received them.
--
-- Applied by turnlog.storage.migrations.migrate(); docs/event-log.md, "Turn
-- mailbox", and docs/conversation.md, "Turn control", explain the design.
--
-- Not part of the log: rows are transient. The replica running the turn
-- deletes a row when it takes it (usually within milliseconds: a NOTIFY on
-- the channel turnlog_turn_control, whose payload is the turn id, wakes it);
-- the sender deletes its row when it stops waiting (the turn ended, or the
-- call's deadline passed); every replica deletes rows older than an hour
-- (a sender that died). A body holds what the sanitize guardrails left of
-- a tool result or cancel reason, never the text as the client sent it.
CREATE TABLE turnlog.turn_mailbox (
    letter_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    turn_id text NOT NULL,
    body text NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX turn_mailbox_turn_idx ON turnlog.turn_mailbox (turn_id);
