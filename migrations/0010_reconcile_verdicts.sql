-- Chaperone collector: reconciliation verdicts.
--
-- The reconciler compares what an upstream tier counted with what a downstream tier counted,
-- per edge of the configured topology (for example producer -> regional per datacenter, and
-- regional summed over datacenters -> aggregate), topic, scope and event-time bucket.
--
-- Conventions (as in 0001): bucket times are epoch ms; collector times are timestamptz, taken
-- from the reconciler's clock. `datacenter` is '' for edges summed over datacenters and
-- `partition` is -1 for topic-level verdicts. Every writer takes
-- pg_advisory_xact_lock(hashtext('chaperone-reconcile')), so one reconciler writes at a time.

-- Highest audit_counts.change_seq already queued in reconcile_pending (single row).
CREATE TABLE reconcile_cursor (
    id         smallint PRIMARY KEY CHECK (id = 1),
    change_seq bigint   NOT NULL
);
INSERT INTO reconcile_cursor (id, change_seq) VALUES (1, 0);

-- Buckets whose counts changed and which still need a (new) verdict on some edge. A bucket
-- leaves the queue once every edge and scope of it is final and judged; a late record puts it
-- back (through audit_counts.change_seq).
CREATE TABLE reconcile_pending (
    topic           text        NOT NULL,
    bucket_start_ms bigint      NOT NULL,
    bucket_width_ms bigint      NOT NULL,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, bucket_start_ms, bucket_width_ms)
);

-- Current verdict per (edge, topic, datacenter, partition, bucket).
CREATE TABLE reconcile_verdicts (
    edge               text        NOT NULL,
    topic              text        NOT NULL,
    -- Datacenter compared, or '' when the edge sums over datacenters.
    datacenter         text        NOT NULL,
    -- Partition compared, or -1 for the whole topic.
    partition          integer     NOT NULL,
    bucket_start_ms    bigint      NOT NULL,
    bucket_width_ms    bigint      NOT NULL,
    -- Upstream and downstream tier names of the edge.
    from_tier          text        NOT NULL,
    to_tier            text        NOT NULL,
    status             text        NOT NULL
        CHECK (status IN ('complete', 'missing', 'duplicated', 'tier_silent')),
    -- Messages counted upstream (expected) and downstream (actual); difference = actual - expected.
    expected           bigint      NOT NULL,
    actual             bigint      NOT NULL,
    difference         bigint      NOT NULL,
    -- Messages missing downstream: greatest(expected - actual, 0).
    missing            bigint      NOT NULL,
    -- For tier_silent: the tier that did not report progress past the bucket.
    silent_tier        text,
    -- Why the bucket was final when last judged: 'progress' or 'max_wait'.
    final_reason       text        NOT NULL,
    -- Incident this bucket belongs (or belonged) to; only topic-level verdicts of alerting edges.
    incident_id        bigint,
    -- How many times the verdict changed after its first judgement.
    revisions          integer     NOT NULL DEFAULT 0,
    first_judged_at    timestamptz NOT NULL,
    changed_at         timestamptz NOT NULL,
    PRIMARY KEY (edge, topic, datacenter, partition, bucket_start_ms, bucket_width_ms)
);
-- Queries by time range and status (the API's /verdicts, retention).
CREATE INDEX reconcile_verdicts_bucket_start ON reconcile_verdicts (bucket_start_ms);
CREATE INDEX reconcile_verdicts_bad ON reconcile_verdicts (status, bucket_start_ms)
    WHERE status <> 'complete';
-- Latest verdict per topic and edge.
CREATE INDEX reconcile_verdicts_latest
    ON reconcile_verdicts (topic, edge, datacenter, bucket_start_ms DESC)
    WHERE partition = -1;
CREATE INDEX reconcile_verdicts_incident ON reconcile_verdicts (incident_id)
    WHERE incident_id IS NOT NULL;

-- Every judgement and every change of a verdict, oldest first (old_status NULL: first verdict).
CREATE TABLE reconcile_verdict_history (
    id              bigserial   PRIMARY KEY,
    edge            text        NOT NULL,
    topic           text        NOT NULL,
    datacenter      text        NOT NULL,
    partition       integer     NOT NULL,
    bucket_start_ms bigint      NOT NULL,
    bucket_width_ms bigint      NOT NULL,
    old_status      text,
    status          text        NOT NULL,
    expected        bigint      NOT NULL,
    actual          bigint      NOT NULL,
    difference      bigint      NOT NULL,
    silent_tier     text,
    final_reason    text        NOT NULL,
    changed_at      timestamptz NOT NULL
);
CREATE INDEX reconcile_verdict_history_key
    ON reconcile_verdict_history (topic, edge, bucket_start_ms);
CREATE INDEX reconcile_verdict_history_changed_at ON reconcile_verdict_history (changed_at);
