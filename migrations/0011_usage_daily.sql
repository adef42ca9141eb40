-- Usage rolled up from the gateways' Redis counters (README "Usage and quota").
-- `requests` is the day's durable total; `counter` is the gateway counter it last
-- accounted for. The counters are absolute per day, so re-reading one adds nothing
-- (counter - counter = 0): the rollup is idempotent whatever crashes or overlaps. A
-- counter of a hash with another `counter_epoch` (the gateway's creation time of the
-- hash, platform-contract usage::EPOCH_FIELD), or a smaller one, means Redis lost the
-- hash (a flush): the new counter is added whole, so the loss is at most what was
-- counted between the previous rollup and the flush.
CREATE TABLE usage_daily (
    customer_id uuid NOT NULL,
    key_id uuid NOT NULL,
    api text NOT NULL,
    day date NOT NULL,
    requests bigint NOT NULL CHECK (requests >= 0),
    counter bigint NOT NULL CHECK (counter >= 0),
    counter_epoch bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, key_id, api, day)
);
-- Fleet exports by period: `m3o-operator usage --all --period`.
CREATE INDEX usage_daily_day ON usage_daily (day);

-- One row per customer, period and threshold reached: the QuotaThresholdReached event
-- is queued in the transaction that inserts it, so it is sent once.
CREATE TABLE usage_thresholds (
    customer_id uuid NOT NULL,
    period text NOT NULL,
    percent smallint NOT NULL,
    requests bigint NOT NULL,
    monthly_requests bigint NOT NULL,
    reached_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, period, percent)
);

-- Behind the writer fence like every other table (0005): a deposed leader's rollup
-- cannot overlap the new one's.
ALTER TABLE usage_daily ADD COLUMN writer_epoch bigint;
ALTER TABLE usage_thresholds ADD COLUMN writer_epoch bigint;
CREATE TRIGGER usage_daily_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON usage_daily
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();
CREATE TRIGGER usage_thresholds_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON usage_thresholds
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();

-- The newest day the rollup of a writer (fence name) has committed and confirmed in
-- full: the next rollup reads every day after it, so days an outage skipped are not lost.
CREATE TABLE usage_watermark (
    fence text PRIMARY KEY,
    confirmed_through date NOT NULL,
    writer_epoch bigint
);
CREATE TRIGGER usage_watermark_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON usage_watermark
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();
