-- linkworker 0004: lane limits that hold for the whole fleet, and fair claims.
--
-- One row per lane (provider, account) holds its limits and its rate budget as a GCRA: the
-- time of the next free send slot. A worker takes a block of slots (about 100 ms of the rate)
-- with one call of linkworker_take_slots and sends each at its time, so Postgres is touched
-- once per block, not per request; slots a dead worker held pass within that block. A 429
-- seen by any worker pauses the lane for all of them (linkworker_lane_throttled), and in
-- adaptive mode lowers the lane's rate, which then climbs back while calls succeed.

CREATE TABLE linkworker_lanes (
    provider         text             NOT NULL,
    account          text             NOT NULL,
    -- limits, seeded from the workers' configuration (the last worker to start writes them)
    rate_per_s       double precision NOT NULL CONSTRAINT linkworker_lanes_rate_positive CHECK (rate_per_s > 0),
    burst            integer          NOT NULL CONSTRAINT linkworker_lanes_burst_positive CHECK (burst >= 1),
    max_in_flight    integer          NOT NULL CONSTRAINT linkworker_lanes_in_flight_positive CHECK (max_in_flight >= 1),
    rate_headroom    double precision NOT NULL DEFAULT 0.01 CONSTRAINT linkworker_lanes_headroom_range CHECK (rate_headroom >= 0 AND rate_headroom < 0.5),
    adaptive         boolean          NOT NULL DEFAULT false,
    configured_by    text,
    configured_at    timestamptz      NOT NULL DEFAULT now(),
    -- the budget
    current_per_s    double precision NOT NULL CONSTRAINT linkworker_lanes_current_positive CHECK (current_per_s > 0),
    learned_per_s    double precision, -- adaptive: the rate at which the provider last said 429
    rate_changed_at  timestamptz      NOT NULL DEFAULT now(),
    next_slot_at     timestamptz      NOT NULL DEFAULT '-infinity',
    paused_until     timestamptz      NOT NULL DEFAULT '-infinity',
    throttled_at     timestamptz,
    throttles        bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, account)
);

COMMENT ON TABLE linkworker_lanes IS
    'linkworker: each lane''s limits (for every worker together) and its shared rate budget';

-- Which workers serve a lane right now, for each one's share of max_in_flight.
CREATE TABLE linkworker_lane_workers (
    provider   text        NOT NULL,
    account    text        NOT NULL,
    worker_id  text        NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    -- alive until then, unless it says so again (every fleet_refresh_s, for 3 of them)
    alive_until timestamptz NOT NULL,
    PRIMARY KEY (provider, account, worker_id)
);

-- How many slots a lane may send at once after an idle spell (its burst, and the half slot
-- that lets a late send be made up), never more than half its rate: credit + rate x 1 s stays
-- under the limit in any one-second window.
CREATE FUNCTION linkworker_lane_credit(rate double precision, burst integer)
RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(burst - 0.5, rate / 2)
$$;

-- The spacing of a lane's slots: draining at (rate - credit) / (1 + headroom), a bucket of
-- capacity credit + 1 lets no one-second window hold more than the rate, with the headroom kept
-- for jitter (worker.budget.drain_rate is the same formula).
CREATE FUNCTION linkworker_lane_spacing(rate double precision, burst integer, headroom double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT (1 + headroom) / (rate - linkworker_lane_credit(rate, burst))
$$;

-- Take `wanted` send slots of a lane. The first is due at `first_at`, the others every
-- `spacing_s` after it; times are the server's clock as epoch seconds, and `now_at` is the
-- server's clock when the slots were taken, so a worker can map them onto its own clock.
--
-- An adaptive lane whose rate a 429 lowered climbs back here while calls succeed: by 5% of its
-- configured rate per second up to 90% of the rate that drew the 429, then by 0.5% of that
-- rate per second up to 97% of it, and stays there: the limit found is respected. After a
-- minute without a 429 it forgets what it learned and climbs on, so a raised limit is found.
CREATE FUNCTION linkworker_take_slots(
    p_provider text, p_account text, p_wanted integer,
    OUT first_at double precision, OUT now_at double precision, OUT spacing_s double precision,
    OUT granted integer, OUT rate_per_s double precision)
LANGUAGE plpgsql AS $$
DECLARE
    lane linkworker_lanes%ROWTYPE;
    at timestamptz;
    rate double precision;
    learned double precision;
    quiet_s double precision;
    step double precision;
    start_at timestamptz;
BEGIN
    SELECT * INTO lane FROM linkworker_lanes AS l
     WHERE l.provider = p_provider AND l.account = p_account
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lane %/% has no row in linkworker_lanes', p_provider, p_account
              USING ERRCODE = 'no_data_found',
                    HINT = 'a worker configured for the lane writes it when it starts';
    END IF;
    at := clock_timestamp();  -- after the row lock: a wait for it must not date the slots
    -- not adaptive: the limit as it is now (an operator may have just lowered it)
    rate := CASE WHEN lane.adaptive THEN least(lane.current_per_s, lane.rate_per_s)
                 ELSE lane.rate_per_s END;
    learned := lane.learned_per_s;
    IF lane.adaptive AND at > lane.paused_until + interval '1 second' THEN
        IF learned IS NOT NULL AND at > lane.throttled_at + interval '60 seconds' THEN
            learned := NULL;
        END IF;
        -- seconds since the rate was last brought up to date, not counting a pause and the
        -- second after it
        quiet_s := extract(epoch FROM at - greatest(lane.rate_changed_at,
                                                    lane.paused_until + interval '1 second'));
        IF learned IS NULL THEN
            step := 0.05 * lane.rate_per_s * quiet_s;
            rate := least(lane.rate_per_s, rate + step);
        ELSIF rate < 0.97 * learned THEN
            step := CASE WHEN rate < 0.9 * learned THEN 0.05 * lane.rate_per_s
                         ELSE 0.005 * learned END * quiet_s;
            rate := least(0.97 * learned, lane.rate_per_s, rate + step);
        END IF;
        rate := least(greatest(rate, lane.current_per_s), lane.rate_per_s);
    END IF;
    spacing_s := linkworker_lane_spacing(rate, lane.burst, lane.rate_headroom);
    start_at := greatest(lane.next_slot_at,
                         at - make_interval(secs => linkworker_lane_credit(rate, lane.burst)
                                                    * spacing_s),
                         lane.paused_until);
    granted := greatest(p_wanted, 0);
    UPDATE linkworker_lanes AS l
       SET next_slot_at = start_at + make_interval(secs => granted * spacing_s),
           current_per_s = rate,
           learned_per_s = learned,
           -- adaptive: when the rate was last brought up to date (the next climb starts there)
           rate_changed_at = CASE WHEN lane.adaptive OR rate <> lane.current_per_s
                                  THEN at ELSE l.rate_changed_at END
     WHERE l.provider = p_provider AND l.account = p_account;
    first_at := extract(epoch FROM start_at);
    now_at := extract(epoch FROM at);
    rate_per_s := rate;
END;
$$;

-- A provider said 429: pause the lane for every worker, and tell them at once. In adaptive mode
-- the rate drops by a quarter and the rate that drew the 429 is kept as the limit found; once
-- per pause (the calls in flight when it began come back 429 too, and must not count again).
CREATE FUNCTION linkworker_lane_throttled(p_provider text, p_account text, p_pause_s double precision)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    lane linkworker_lanes%ROWTYPE;
    at timestamptz;
    rate double precision;
BEGIN
    SELECT * INTO lane FROM linkworker_lanes AS l
     WHERE l.provider = p_provider AND l.account = p_account
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    at := clock_timestamp();
    rate := lane.current_per_s;
    -- once per pause, and once a second at most (a Retry-After of 0 makes no pause)
    IF lane.adaptive AND at >= lane.paused_until
       AND at >= coalesce(lane.throttled_at, '-infinity') + interval '1 second' THEN
        rate := greatest(rate * 0.75, 0.01 * lane.rate_per_s);
    END IF;
    UPDATE linkworker_lanes AS l
       SET paused_until = greatest(l.paused_until,
                                   at + make_interval(secs => least(greatest(p_pause_s, 0), 3600))),
           throttled_at = at,
           throttles = l.throttles + 1,
           learned_per_s = CASE WHEN rate <> lane.current_per_s THEN lane.current_per_s
                                ELSE l.learned_per_s END,
           current_per_s = rate,
           rate_changed_at = CASE WHEN rate <> lane.current_per_s THEN at ELSE l.rate_changed_at END
     WHERE l.provider = p_provider AND l.account = p_account;
    PERFORM pg_notify('linkworker_lanes', p_provider || '/' || p_account);
    RETURN rate;
END;
$$;

-- Fair claims: within a lane, the highest priority first, and within it each batch in turn.
-- The claim walks the distinct batches of this index (a loose index scan), so it replaces the
-- plain (provider, account, priority, run_at, id) one.
DROP INDEX link_jobs_claim;
CREATE INDEX link_jobs_claim_fair ON link_jobs
    (provider, account, priority DESC, (coalesce(batch_id, '')), run_at, id)
    WHERE state = 'pending';
