-- linkworker 0003: batch-completion webhooks.
--
--   link_batch_webhooks   one row per batch_id whose end a producer wants POSTed to a URL
--
-- A producer registers one with a plain INSERT, in the same transaction as the batch's jobs or
-- after the last of them (a webhook is due once the batch has jobs and none is pending or
-- running, so registering before jobs that arrive in several transactions could fire it early):
--
--   INSERT INTO link_batch_webhooks (batch_id, url)
--   VALUES ('invoices-2026-11', 'https://erp.example/hooks/linkworker')
--   ON CONFLICT (batch_id) DO NOTHING;
--
-- The worker POSTs {"event": "batch.finished", "batch_id", "total", "succeeded", "failed",
-- "cancelled", "finished_at"} once the batch is done, signed with HMAC-SHA256 of the body
-- (header X-Linkworker-Signature: sha256=<hex>), retried with backoff until a 2xx answer or
-- until the worker's attempt limit. Delivery is at least once (a worker dying between the POST
-- and recording it means a second POST): receivers dedupe on batch_id.
--
-- The table is public API: change it only in a new migration.

CREATE TABLE link_batch_webhooks (
    -- producer columns
    batch_id        text        PRIMARY KEY
                    CONSTRAINT link_batch_webhooks_batch_id_not_blank CHECK (batch_id <> ''),
    url             text        NOT NULL
                    CONSTRAINT link_batch_webhooks_url_http CHECK (url ~ '^https?://[^/?#\s]+'),
    -- delivery columns, written by the worker
    state           text        NOT NULL DEFAULT 'waiting'
                    CONSTRAINT link_batch_webhooks_state_known
                    CHECK (state IN ('waiting', 'delivering', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0
                    CONSTRAINT link_batch_webhooks_attempts_not_negative CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_by       text,
    locked_until    timestamptz,
    payload         jsonb,
    last_error      text,
    response_status integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    -- a row being delivered always names its deliverer and when its lease runs out
    CONSTRAINT link_batch_webhooks_delivering_is_leased
        CHECK (state <> 'delivering' OR (locked_by IS NOT NULL AND locked_until IS NOT NULL))
);

COMMENT ON TABLE link_batch_webhooks IS
    'linkworker: a URL to POST once a batch_id of link_jobs has no pending or running job left';
COMMENT ON COLUMN link_batch_webhooks.batch_id IS
    'the link_jobs.batch_id to watch; one webhook per batch';
COMMENT ON COLUMN link_batch_webhooks.url IS
    'http(s) URL the event is POSTed to; a token in its query string is never logged or stored elsewhere';
COMMENT ON COLUMN link_batch_webhooks.state IS
    'waiting (batch not done, or a retry is scheduled) -> delivering (a worker is POSTing) -> delivered or failed';
COMMENT ON COLUMN link_batch_webhooks.attempts IS
    'POSTs started so far (a delivery whose worker died counts too)';
COMMENT ON COLUMN link_batch_webhooks.next_attempt_at IS
    'not before this time: the worker pushes it back after a failed POST';
COMMENT ON COLUMN link_batch_webhooks.locked_by IS
    'worker id of the deliverer while delivering';
COMMENT ON COLUMN link_batch_webhooks.locked_until IS
    'while delivering: after this time the deliverer is taken for dead and any worker may POST again';
COMMENT ON COLUMN link_batch_webhooks.payload IS
    'the event as first sent, counts taken when the batch was found done; every retry sends the same body';
COMMENT ON COLUMN link_batch_webhooks.last_error IS
    'why the last POST failed (the URL shown without its query string); NULL once delivered';
COMMENT ON COLUMN link_batch_webhooks.response_status IS
    'HTTP status of the last answer, NULL if there was none (connection failed, timeout)';
COMMENT ON COLUMN link_batch_webhooks.delivered_at IS
    'when a 2xx answer was received';

-- the deliverer: rows that may become due, soonest first (delivered and failed rows drop out)
CREATE INDEX link_batch_webhooks_due ON link_batch_webhooks (next_attempt_at)
    WHERE state IN ('waiting', 'delivering');
