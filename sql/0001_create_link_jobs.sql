-- linkworker 0001: the link_jobs queue table, its indexes and the wake-up trigger.
-- The table and its columns are the public API for producers: change them only in a new migration.

CREATE TABLE link_jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- producer columns
    provider         text        NOT NULL
                     CONSTRAINT link_jobs_provider_known CHECK (provider IN ('billpocket', 'cheqpay', 'kushki')),
    account          text        NOT NULL DEFAULT 'default'
                     CONSTRAINT link_jobs_account_not_blank CHECK (account <> ''),
    payload          jsonb       NOT NULL
                     CONSTRAINT link_jobs_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    idempotency_key  text,
    batch_id         text,
    priority         integer     NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    max_attempts     integer     NOT NULL DEFAULT 5
                     CONSTRAINT link_jobs_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    -- result columns
    state            text        NOT NULL DEFAULT 'pending'
                     CONSTRAINT link_jobs_state_known
                     CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    url              text,
    external_id      text,
    response         jsonb,
    last_error       text,
    errors           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    attempts         integer     NOT NULL DEFAULT 0,
    unknown_outcomes integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    -- lease: which worker holds a running job, and until when
    locked_by        text,
    locked_until     timestamptz,
    -- a re-run producer inserts with ON CONFLICT (provider, account, idempotency_key) DO NOTHING;
    -- NULL keys never conflict
    CONSTRAINT link_jobs_idempotency_key_unique UNIQUE (provider, account, idempotency_key)
);

COMMENT ON TABLE link_jobs IS 'linkworker queue: one row per payment link to create';

-- the claim: pending rows of one lane, highest priority first, oldest first
CREATE INDEX link_jobs_claim ON link_jobs (provider, account, priority DESC, run_at, id)
    WHERE state = 'pending';
-- the rescuer: running rows whose lease ran out
CREATE INDEX link_jobs_lease ON link_jobs (locked_until) WHERE state = 'running';
-- status, export and retry by batch
CREATE INDEX link_jobs_batch ON link_jobs (batch_id, state) WHERE batch_id IS NOT NULL;

-- Wake idle workers when rows become claimable now: one NOTIFY per statement (not per row, so a
-- 100k-row COPY costs one), naming the lanes as 'provider/account' separated by commas.
CREATE FUNCTION link_jobs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    lanes text;
BEGIN
    SELECT string_agg(DISTINCT provider || '/' || account, ',') INTO lanes
      FROM new_rows
     WHERE state = 'pending' AND run_at <= now();
    IF lanes IS NOT NULL THEN
        PERFORM pg_notify('linkworker_jobs', left(lanes, 7900));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER link_jobs_notify_insert
    AFTER INSERT ON link_jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION link_jobs_notify();

CREATE TRIGGER link_jobs_notify_update
    AFTER UPDATE ON link_jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION link_jobs_notify();
