-- Who a bucket judged at `max_wait` (or `loss_after`) was still waiting for: the live
-- observers of either tier that had not passed it, as `tier:host/instance`, or
-- `tier:host/instance partition N` for a consumer partition (its furthest owner), or
-- `tier:partition N` for a partition with counts and no progress at all. Empty for buckets
-- final by progress. A verdict reached by waiting names what held it back.
ALTER TABLE reconcile_verdicts ADD COLUMN waiting_on text[] NOT NULL DEFAULT '{}';
ALTER TABLE reconcile_verdict_history ADD COLUMN waiting_on text[] NOT NULL DEFAULT '{}';

-- Every reconcile pass counts the topic-level `lagging` verdicts for its gauge.
CREATE INDEX reconcile_verdicts_lagging ON reconcile_verdicts (topic)
    WHERE status = 'lagging' AND partition = -1;
