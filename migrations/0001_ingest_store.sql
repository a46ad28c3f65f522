-- Chaperone collector: the ingest store.
--
-- The collector consumes audit records (chaperone-audit wire format version 1) from the audit
-- topic of every configured cluster and writes them here, exactly once: every batch is ONE
-- transaction that inserts the record ids, adds the counts, raises the progress marks and moves
-- the consumed offsets. A record whose id is already present is ignored entirely.
--
-- Conventions used by every table below:
--   * Times that come from audit records are epoch milliseconds (bigint, UTC), exactly as on
--     the wire, so bucket arithmetic stays `bucket_start_ms + bucket_width_ms`.
--   * Times stamped by the collector itself are timestamptz (`now()` of the writing
--     transaction).
--   * `partition` is -1 when the observing hop does not know the partition (producers that
--     count per topic only).
--   * Ingest transactions take `pg_advisory_xact_lock(hashtext('chaperone-ingest'))`, so
--     `change_seq` values become visible in increasing order: a reader that remembers the
--     highest `change_seq` it processed can poll `WHERE change_seq > $last` and never miss a
--     row, including buckets re-opened by late records.

-- Monotonic change counter shared by audit_counts and audit_progress.
CREATE SEQUENCE audit_change_seq AS bigint;

-- Ids of every audit record applied (counts and progress). The primary key is the duplicate
-- filter: a batch inserts its ids with ON CONFLICT DO NOTHING and applies only the records whose
-- ids were newly inserted. Rows older than the retention period are deleted by the retention job.
CREATE TABLE audit_record_ids (
    id          text        PRIMARY KEY,
    -- 'counts' or 'progress'.
    kind        text        NOT NULL,
    -- When the collector applied the record.
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_record_ids_ingested_at ON audit_record_ids (ingested_at);

-- Message counts per hop, summed over every host and instance of that hop: one row per
-- (topic, bucket, tier, datacenter, cluster, partition). The sum of a column over the rows of one
-- tier is what that tier saw.
CREATE TABLE audit_counts (
    -- Logical topic (after topic mapping; `orders` also for `regional.orders` on aggregate).
    topic           text        NOT NULL,
    -- Start of the event-time bucket, epoch ms, aligned to bucket_width_ms.
    bucket_start_ms bigint      NOT NULL,
    -- Bucket width in ms (whole seconds, 1 s ..= 1 day; default 60000).
    bucket_width_ms bigint      NOT NULL,
    -- Hop: 'producer', 'regional', 'aggregate' or a user-defined tier name.
    tier            text        NOT NULL,
    -- Datacenter the messages originated in.
    datacenter      text        NOT NULL,
    -- Alias of the Kafka cluster the messages were seen on (as reported by the hop).
    cluster         text        NOT NULL,
    -- Partition, or -1 when unknown.
    partition       integer     NOT NULL,
    -- Messages counted (including no_timestamp and malformed ones).
    count           bigint      NOT NULL DEFAULT 0,
    -- Payload bytes of the counted messages.
    bytes           bigint      NOT NULL DEFAULT 0,
    -- Messages without usable event time (counted in the bucket of their arrival time).
    no_timestamp    bigint      NOT NULL DEFAULT 0,
    -- Messages whose payload could not be parsed for an event time.
    malformed       bigint      NOT NULL DEFAULT 0,
    -- Earliest / latest event time seen in this row, epoch ms; NULL while no message had one.
    min_event_ms    bigint,
    max_event_ms    bigint,
    -- Latency distribution (time seen at the hop - event time, ms): an HdrHistogram serialized
    -- in the V2 format (raw bytes, not base64), the exact sum of every applied record's
    -- histogram. Histograms of several rows merge exactly (HdrHistogram add).
    latency         bytea       NOT NULL,
    -- Number of audit records applied to this row.
    records         bigint      NOT NULL DEFAULT 0,
    -- First / last time the collector changed this row.
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Value of audit_change_seq at the last change (see the header).
    change_seq      bigint      NOT NULL DEFAULT nextval('audit_change_seq'),
    PRIMARY KEY (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition)
);
-- Retention deletes by bucket start across all topics.
CREATE INDEX audit_counts_bucket_start ON audit_counts (bucket_start_ms);
-- Readers that poll for changed buckets.
CREATE INDEX audit_counts_change_seq ON audit_counts (change_seq);

-- How far each hop has got, one row per (tier, cluster, datacenter, topic, physical_topic,
-- partition), built from progress records. Marks only move forward: each column keeps the
-- largest value seen, whatever order the records arrive in.
CREATE TABLE audit_progress (
    tier              text        NOT NULL,
    cluster           text        NOT NULL,
    datacenter        text        NOT NULL,
    -- Logical topic.
    topic             text        NOT NULL,
    -- Topic actually consumed or produced to (for example `regional.orders` on aggregate).
    physical_topic    text        NOT NULL,
    -- Partition, or -1 when unknown.
    partition         integer     NOT NULL,
    -- Event-time watermark, epoch ms: every message of this hop with an earlier event time has
    -- been counted, so buckets ending at or before it are final for this hop.
    watermark_ms      bigint      NOT NULL,
    -- Next offset the hop will read, if reported.
    position          bigint,
    -- Partition high watermark when reported, if reported.
    high_watermark    bigint,
    -- Bucket width the hop counts in, ms (from the latest record).
    bucket_width_ms   bigint      NOT NULL,
    -- Latest emitted_at_ms of a progress record for this row, epoch ms (the hop's clock).
    last_emitted_ms   bigint      NOT NULL,
    -- Host and instance of the latest record (informational).
    host              text        NOT NULL,
    instance          text        NOT NULL,
    -- When the collector last applied a progress record for this row (the collector's clock):
    -- a tier that stops reporting shows here.
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    -- Value of audit_change_seq at the last change (see the header).
    change_seq        bigint      NOT NULL DEFAULT nextval('audit_change_seq'),
    PRIMARY KEY (tier, cluster, datacenter, topic, physical_topic, partition)
);
CREATE INDEX audit_progress_topic ON audit_progress (topic, tier);
CREATE INDEX audit_progress_change_seq ON audit_progress (change_seq);

-- Every logical topic the collector has seen counts or progress for.
CREATE TABLE audit_topics (
    topic         text        PRIMARY KEY,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

-- Consumed positions of the audit topics: the next offset to read per (cluster alias from the
-- collector's config, audit topic, partition). Written in the same transaction as the effects of
-- the records before that offset; the collector seeks here when it assigns a partition.
CREATE TABLE ingest_offsets (
    cluster     text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, topic, partition)
);
