-- Chaperone collector: records the dead-letter topic would not take, parked in PostgreSQL.
--
-- Ingest sends every record it cannot apply (invalid, or refused by PostgreSQL because of its
-- content) to the cluster's dead-letter topic before its offset moves. When the dead-letter
-- topic refuses it (too large, no topic, no ACL) or does not acknowledge it within
-- `ingest.dlq_timeout`, the record is parked here instead, with why it was rejected and why
-- the dead-letter topic did not take it, so that ingest goes on and nothing is lost silently.
-- Key and payload are kept up to 64 KiB each (`key_len`, `payload_len` give the whole
-- lengths). A record read twice (after a restart) is parked once. Retention deletes rows
-- older than `retention.days`.
CREATE TABLE ingest_parked (
    cluster     text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    reason      text        NOT NULL,
    error       text        NOT NULL,
    dlq_error   text        NOT NULL,
    key         bytea,
    key_len     integer,
    payload     bytea,
    payload_len integer,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, topic, partition, "offset")
);

CREATE INDEX ingest_parked_parked_at ON ingest_parked (parked_at);
