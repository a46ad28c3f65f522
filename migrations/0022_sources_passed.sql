-- Chaperone collector: when the producers of each datacenter passed a bucket.
--
-- A consumer tier's progress mark is a time (a service read everything written up to then) or
-- an event time it read up to (a mirror's reader). A message can reach the log long after its
-- event time (a producer stalled, a request retried), behind later messages of other
-- producers; every message of a bucket is in the log once every producer instance passed the
-- bucket (they pass only what was acknowledged). So a consumer tier proves it read a bucket only
-- with a mark at or past the time the reconciler first saw the producers pass it, kept here
-- (on the reconciler's clock) for as long as the bucket may be judged again.
CREATE TABLE reconcile_sources_passed (
    topic text NOT NULL,
    bucket_start_ms bigint NOT NULL,
    bucket_width_ms bigint NOT NULL,
    datacenter text NOT NULL,
    passed_at_ms bigint NOT NULL,
    PRIMARY KEY (topic, bucket_start_ms, bucket_width_ms, datacenter)
);

-- Rows past the reconciler's lookback are deleted by bucket end.
CREATE INDEX reconcile_sources_passed_by_start ON reconcile_sources_passed (bucket_start_ms);
