-- Poison-row isolation for the outbox relay: a row whose publish fails repeatedly is
-- parked (parked_at set) so later rows flow past it; last_error says why. Parked rows
-- are re-driven by `m3o-operator outbox redrive`, which clears parked_at.
ALTER TABLE outbox ADD COLUMN parked_at timestamptz;
ALTER TABLE outbox ADD COLUMN last_error text;

-- The relay's queue: unpublished, not parked, in seq order.
DROP INDEX outbox_unpublished;
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX outbox_parked ON outbox (seq) WHERE parked_at IS NOT NULL;
-- Retention of published rows deletes by age.
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
