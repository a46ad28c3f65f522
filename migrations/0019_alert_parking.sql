-- Chaperone collector: parked webhook deliveries.
--
-- A delivery the receiver refuses (a 4xx answer other than 408 and 429) alerts.max_attempts
-- times, or one still failing alerts.max_age after it was created, is parked: parked_at is set
-- and it is never tried again. It stays visible (API, incident page, metrics) with why:
-- last_status (the HTTP status of the last answer, null when there was none: a connection
-- error or a timeout) and last_error (the answer's first bytes or the request's error).
--
-- A delivery is in exactly one state: pending (sent_at and parked_at null), sent (sent_at set)
-- or parked (parked_at set).

ALTER TABLE alert_deliveries
    ADD COLUMN refusals    integer     NOT NULL DEFAULT 0,
    ADD COLUMN last_status integer,
    ADD COLUMN parked_at   timestamptz,
    ADD CONSTRAINT alert_deliveries_sent_or_parked CHECK (sent_at IS NULL OR parked_at IS NULL);

-- Due deliveries are the pending ones; parked ones leave this index.
DROP INDEX alert_deliveries_due;
CREATE INDEX alert_deliveries_due ON alert_deliveries (webhook, next_attempt_at)
    WHERE sent_at IS NULL AND parked_at IS NULL;
CREATE INDEX alert_deliveries_parked ON alert_deliveries (parked_at) WHERE parked_at IS NOT NULL;
