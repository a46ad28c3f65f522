-- Finality that a tier can prove (see docs/verdicts.md).
--
-- 1. Progress is kept per observing instance. A consumer tier (rows with a `position`) hands a
--    partition from one instance to the next through committed offsets, so the reconciler takes
--    the furthest mark of a partition over its instances; a producer instance has no such
--    hand-over, so every live producer instance must have passed a bucket on its own.
-- 2. `closing`: the instance shut down cleanly and sent every count before saying so; the
--    reconciler stops waiting for it.
-- 3. `reconcile_pending.queued_at` is the time of the latest count change of the bucket (it is
--    refreshed on every change): a judged bucket is re-judged only once it has been quiet for
--    `reconcile.settle`.
--    `first_queued_at` is when the bucket entered the queue: `max_wait` and `loss_after` count
--    from the later of the bucket end and this time, so that counts that arrive late as a
--    whole (a backfill, a producer whose clock runs behind) are waited for like on-time ones.
-- 4. New verdicts: `lagging` (the downstream tier has not shown it read past the bucket by
--    `max_wait`; how far behind is in `lag_ms`) and `upstream_incomplete` (the downstream saw
--    more than the upstream counted while an upstream instance that stopped without a clean
--    shutdown may have lost counts of the bucket: `stale_instances` names them).

ALTER TABLE audit_progress DROP CONSTRAINT audit_progress_pkey;
ALTER TABLE audit_progress
    ADD PRIMARY KEY (tier, cluster, datacenter, topic, physical_topic, partition, host, instance);
ALTER TABLE audit_progress ADD COLUMN closing boolean NOT NULL DEFAULT false;
-- Tiers whose observers consume with committed offsets: those that ever reported a position
-- (a partition that has read nothing yet may report none).
CREATE VIEW consumer_tiers AS
    SELECT DISTINCT tier FROM audit_progress WHERE position IS NOT NULL;

ALTER TABLE reconcile_pending ADD COLUMN first_queued_at timestamptz;
UPDATE reconcile_pending SET first_queued_at = queued_at;
ALTER TABLE reconcile_pending ALTER COLUMN first_queued_at SET NOT NULL;
ALTER TABLE reconcile_pending ALTER COLUMN first_queued_at SET DEFAULT now();

ALTER TABLE reconcile_verdicts DROP CONSTRAINT reconcile_verdicts_status_check;
ALTER TABLE reconcile_verdicts ADD CONSTRAINT reconcile_verdicts_status_check
    CHECK (status IN ('complete', 'missing', 'duplicated', 'tier_silent', 'lagging',
                      'upstream_incomplete'));
-- For `lagging`: how far the least advanced downstream observer was behind the reconciler's
-- clock when judged, ms.
ALTER TABLE reconcile_verdicts ADD COLUMN lag_ms bigint;
-- Upstream instances that stopped reporting without a clean shutdown before passing the
-- bucket, as `host/instance`: their counts of this bucket may be incomplete.
ALTER TABLE reconcile_verdicts ADD COLUMN stale_instances text[] NOT NULL DEFAULT '{}';

ALTER TABLE reconcile_verdict_history ADD COLUMN lag_ms bigint;
ALTER TABLE reconcile_verdict_history ADD COLUMN stale_instances text[] NOT NULL DEFAULT '{}';

-- 5. An open incident is `superseded` by a new one when a much worse loss of its topic arrives
--    (`reconcile.escalate_factor`) or a loss comes long after its last bad bucket
--    (`reconcile.incident_gap`): the new incident notifies, so an unhealed loss never mutes its
--    topic. A superseded incident still gets its `resolved` notification when its buckets heal.
ALTER TABLE alert_incidents DROP CONSTRAINT alert_incidents_status_check;
ALTER TABLE alert_incidents ADD CONSTRAINT alert_incidents_status_check
    CHECK (status IN ('open', 'resolved', 'superseded'));
