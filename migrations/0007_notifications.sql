-- The operator's outgoing notifications (operator/shadowgate_operator/notify/): one row per message and
-- receiver, written when a transition is announced. The queue lives in PostgreSQL, not in memory, so a
-- message survives an operator restart: a worker claims due rows for a lease (FOR UPDATE SKIP LOCKED, so
-- replicas never post the same row at once), posts them, and marks each delivered, or due again later
-- with backoff. Each receiver gets its messages one at a time, in order (`seq`): only the oldest message
-- not delivered yet of a receiver is ever claimed. A worker that dies with a row claimed leaves it to the
-- next one when the lease ends: delivery is at least once, and `id` (the same on every attempt) lets
-- receivers drop duplicates.
-- Finished rows (delivered or abandoned) stay a week as the record of what was said to whom.
-- A small plain table on every edition (not a hypertable: rows are updated in place, and few).
CREATE TABLE IF NOT EXISTS notifications (
    seq           bigint      GENERATED ALWAYS AS IDENTITY,  -- queueing order
    id            text        NOT NULL,   -- the message's id: the same on every attempt and every receiver
    receiver      text        NOT NULL,   -- spec.notifications[].name
    namespace     text        NOT NULL,
    deployment    text        NOT NULL,
    format        text        NOT NULL CHECK (format IN ('cloudevents', 'slack')),
    url_secret    text        NOT NULL,   -- the Secret holding the URL (read at each attempt, never stored)
    url_key       text        NOT NULL,
    headers       jsonb       NOT NULL,   -- Content-Type and the like
    body          bytea       NOT NULL,   -- exactly what is posted, on every attempt
    created_at    timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    due_at        timestamptz NOT NULL DEFAULT now(),  -- next attempt, not before
    leased_until  timestamptz,            -- claimed by a worker until then
    delivered_at  timestamptz,
    abandoned_at  timestamptz,            -- given up: a permanent refusal, or too old
    last_error    text,
    PRIMARY KEY (id, receiver)
);
CREATE INDEX IF NOT EXISTS notifications_waiting ON notifications (namespace, deployment, receiver, seq)
    WHERE delivered_at IS NULL AND abandoned_at IS NULL;
