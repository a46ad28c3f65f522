-- Chaperone collector: a cheaper ingest write path.
--
-- 1. Record ids become 128-bit keys (`uuid`) in `audit_record_seen`, replacing the text ids of
--    `audit_record_ids`. An id in the canonical lowercase UUID form (what audit-lib and
--    chaperone-service send) is stored as that UUID; any other id string as the first 16 bytes
--    of its SHA-256. Only `counts` records are kept: applying a `progress` record twice changes
--    nothing (every mark keeps its maximum), so they need no duplicate filter. Ingest probes the
--    key and inserts only new ids, under the ingest lock, instead of ON CONFLICT DO NOTHING.
--    Retention deletes by `ingested_at` through a BRIN index (rows arrive in that order).
--
-- 2. Readers find changed buckets in `audit_count_changes`, one row per (topic, bucket, tier)
--    changed by an ingest batch, instead of an index on `audit_counts.change_seq`. Without that
--    index and the one on `bucket_start_ms`, and with free space left in every page, an update
--    of a count row is a HOT update: no index is touched. Retention of `audit_counts` scans the
--    table (it runs rarely and deletes in small batches). The same holds for `audit_progress`.

CREATE TABLE audit_record_seen (
    id          uuid        PRIMARY KEY,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_record_seen_ingested_at ON audit_record_seen USING brin (ingested_at);

INSERT INTO audit_record_seen (id, ingested_at)
SELECT CASE
           WHEN id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN id::uuid
           ELSE encode(substring(sha256(convert_to(id, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid
       END,
       ingested_at
  FROM audit_record_ids
 WHERE kind = 'counts'
ON CONFLICT (id) DO NOTHING;

DROP TABLE audit_record_ids;

-- One row per (topic, bucket, tier) an ingest batch changed. Ingest transactions hold the
-- ingest lock, so change_seq values become visible in increasing order (see 0001).
CREATE TABLE audit_count_changes (
    change_seq      bigint      PRIMARY KEY DEFAULT nextval('audit_change_seq'),
    topic           text        NOT NULL,
    bucket_start_ms bigint      NOT NULL,
    bucket_width_ms bigint      NOT NULL,
    tier            text        NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_count_changes_changed_at ON audit_count_changes USING brin (changed_at);

-- Changes the reconciler has not queued yet.
INSERT INTO audit_count_changes (change_seq, topic, bucket_start_ms, bucket_width_ms, tier)
SELECT c.change_seq, c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier
  FROM audit_counts c
 WHERE c.change_seq > (SELECT change_seq FROM reconcile_cursor WHERE id = 1);

DROP INDEX audit_counts_change_seq;
DROP INDEX audit_counts_bucket_start;
ALTER TABLE audit_counts SET (fillfactor = 50);

-- Nothing reads progress rows by change_seq; without the index their updates are HOT too.
DROP INDEX audit_progress_change_seq;
ALTER TABLE audit_progress SET (fillfactor = 50);
