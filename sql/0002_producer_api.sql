-- linkworker 0002: the producer API for systems that only speak SQL.
--
--   linkworker_enqueue(...)   insert one job (idempotent with idempotency_key), returns its id
--   link_batches              one row per batch_id: counts per state, done or not
--   linkworker_batch_done     NOTIFY channel: a batch's last unfinished job has finished
--
-- Like the table, these are public API: change them only in a new migration.

-- One job in, its id out. With an idempotency_key that is already taken for (provider, account),
-- nothing is inserted and the existing job's id is returned, so a re-run producer can call it
-- blindly. NULL arguments take the column defaults, for drivers that cannot omit arguments.
CREATE FUNCTION linkworker_enqueue(
    provider        text,
    payload         jsonb,
    account         text        DEFAULT 'default',
    idempotency_key text        DEFAULT NULL,
    batch_id        text        DEFAULT NULL,
    priority        integer     DEFAULT 0,
    run_at          timestamptz DEFAULT now(),
    max_attempts    integer     DEFAULT 5
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    job_id bigint;
BEGIN
    -- the insert; arguments are qualified with the function's name because they share the
    -- columns' names, and the conflict target is named by constraint for the same reason
    INSERT INTO link_jobs (provider, account, payload, idempotency_key, batch_id, priority,
                           run_at, max_attempts)
    VALUES (linkworker_enqueue.provider,
            coalesce(linkworker_enqueue.account, 'default'),
            linkworker_enqueue.payload,
            linkworker_enqueue.idempotency_key,
            linkworker_enqueue.batch_id,
            coalesce(linkworker_enqueue.priority, 0),
            coalesce(linkworker_enqueue.run_at, now()),
            coalesce(linkworker_enqueue.max_attempts, 5))
    ON CONFLICT ON CONSTRAINT link_jobs_idempotency_key_unique DO NOTHING
    RETURNING id INTO job_id;
    IF job_id IS NOT NULL THEN
        RETURN job_id;
    END IF;
    -- the key was taken: a new statement, so under READ COMMITTED it sees the row even when a
    -- concurrent call inserted it a moment ago (the INSERT above waited for that call to commit)
    SELECT j.id INTO job_id
      FROM link_jobs AS j
     WHERE j.provider = linkworker_enqueue.provider
       AND j.account = coalesce(linkworker_enqueue.account, 'default')
       AND j.idempotency_key = linkworker_enqueue.idempotency_key;
    RETURN job_id;
END;
$$;

COMMENT ON FUNCTION linkworker_enqueue(text, jsonb, text, text, text, integer, timestamptz, integer)
    IS 'linkworker: enqueue one payment-link job; idempotent with idempotency_key; returns the job id';

-- Batch progress, one row per batch_id (rows without a batch are left out). `done` is true once
-- no job of the batch is pending or running. A WHERE batch_id = ... on the view is pushed down
-- to the link_jobs_batch index, so looking at one batch does not count them all.
CREATE VIEW link_batches AS
SELECT batch_id,
       count(*)                                              AS total,
       count(*) FILTER (WHERE state = 'pending')             AS pending,
       count(*) FILTER (WHERE state = 'running')             AS running,
       count(*) FILTER (WHERE state = 'succeeded')           AS succeeded,
       count(*) FILTER (WHERE state = 'failed')              AS failed,
       count(*) FILTER (WHERE state = 'cancelled')           AS cancelled,
       min(created_at)                                       AS first_created_at,
       max(finished_at)                                      AS last_finished_at,
       count(*) FILTER (WHERE state IN ('pending', 'running')) = 0 AS done
  FROM link_jobs
 WHERE batch_id IS NOT NULL
 GROUP BY batch_id;

COMMENT ON VIEW link_batches IS 'linkworker: progress of each batch_id';

-- NOTIFY linkworker_batch_done '{"batch_id": ..., "succeeded": n, "failed": n, "cancelled": n}'
-- once, when the last pending or running job of a batch becomes final.
--
-- Once, even when two transactions finish a batch's last two jobs at the same moment: without
-- care each would see the other's row still running (it is not committed yet) and neither would
-- notify. So every statement that finishes jobs of a batch takes a transaction-scoped advisory
-- lock on that batch before looking: the second one waits until the first has committed, and
-- its look, a new statement with a new snapshot under READ COMMITTED, sees the first's rows
-- final. The first never sees the second's row final, since that commits only after the first.
-- (Under REPEATABLE READ or SERIALIZABLE the look could not see the other commit; the worker's
-- write-backs run under the default READ COMMITTED.)
--
-- Cheap on the write-back path: one pass over the statement's transition tables, rows without
-- a batch skipped, one lock and one index probe per distinct batch; counting the whole batch
-- happens only when it is really done.
CREATE FUNCTION link_jobs_batch_done() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    finished_batch text;
    succeeded_jobs bigint;
    failed_jobs    bigint;
    cancelled_jobs bigint;
BEGIN
    FOR finished_batch IN
        -- the batches of rows that became final in this statement, each once; in a fixed
        -- order, so that two statements take their locks in the same order and cannot deadlock
        SELECT DISTINCT n.batch_id
          FROM new_rows AS n
          JOIN old_rows AS o ON o.id = n.id
         WHERE n.batch_id IS NOT NULL
           AND n.state IN ('succeeded', 'failed', 'cancelled')
           AND o.state IN ('pending', 'running')
         ORDER BY n.batch_id
    LOOP
        -- serialise the look with every other statement finishing jobs of this batch (above)
        PERFORM pg_advisory_xact_lock(hashtext('linkworker_batch_done'), hashtext(finished_batch));
        -- is anything of the batch left? an index probe on link_jobs_batch, fresh snapshot
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM link_jobs
             WHERE batch_id = finished_batch AND state IN ('pending', 'running'));
        -- done: the final counts for the message
        SELECT count(*) FILTER (WHERE state = 'succeeded'),
               count(*) FILTER (WHERE state = 'failed'),
               count(*) FILTER (WHERE state = 'cancelled')
          INTO succeeded_jobs, failed_jobs, cancelled_jobs
          FROM link_jobs
         WHERE batch_id = finished_batch;
        PERFORM pg_notify('linkworker_batch_done', json_build_object(
            'batch_id', finished_batch,
            'succeeded', succeeded_jobs,
            'failed', failed_jobs,
            'cancelled', cancelled_jobs)::text);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER link_jobs_batch_done
    AFTER UPDATE ON link_jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION link_jobs_batch_done();
