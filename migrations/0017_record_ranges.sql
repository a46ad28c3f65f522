-- Chaperone collector: applied counts records remembered as ranges of sequence numbers.
--
-- audit-lib and chaperone-service number their counts records: the id is a version 8 UUID
-- naming a stream (one per process and logical topic) and the record's number in it (see
-- audit-lib/src/sequence.rs). For those records ingest keeps, per topic and stream, the set
-- of numbers applied so far, which is nearly always one range, instead of one
-- `audit_record_seen` row per record (collector/src/store/sequence.rs). Records with any
-- other id still go through `audit_record_seen`. Retention deletes a stream's row once it has
-- not changed for the retention period, like the ids.
-- Every batch rewrites the rows of its streams: no index but the key, and room on each page,
-- keep those updates HOT (no index entries written). Retention scans the table, which holds
-- one small row per stream.
CREATE TABLE audit_record_ranges (
    topic      text           NOT NULL,
    stream     bigint         NOT NULL,
    ranges     int8multirange NOT NULL,
    updated_at timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, stream)
) WITH (fillfactor = 50);
