-- Chaperone collector: incidents and the webhook outbox.
--
-- Consecutive bad topic-level buckets of one (topic, edge, datacenter) form one incident: it
-- opens with the first bad bucket, collects every further bad bucket while it is open, and is
-- resolved once all of its buckets are complete again.
--
-- Delivery is two-staged, both stages transactional:
--  1. alert_events is the outbox: the reconciler inserts an event in the SAME transaction as
--     the verdict change that caused it.
--  2. The alert sender turns events into alert_deliveries (one per matching webhook; at most
--     one firing and one resolved per webhook and incident, enforced by a unique key), then
--     claims due deliveries with FOR UPDATE SKIP LOCKED, posts them and marks them sent.

CREATE TABLE alert_incidents (
    id                    bigserial   PRIMARY KEY,
    topic                 text        NOT NULL,
    edge                  text        NOT NULL,
    -- '' when the edge sums over datacenters.
    datacenter            text        NOT NULL,
    from_tier             text        NOT NULL,
    to_tier               text        NOT NULL,
    -- 'open' or 'resolved'.
    status                text        NOT NULL CHECK (status IN ('open', 'resolved')),
    bucket_width_ms       bigint      NOT NULL,
    -- Range of the buckets that joined the incident.
    first_bucket_start_ms bigint      NOT NULL,
    last_bucket_start_ms  bigint      NOT NULL,
    -- Buckets that joined, and how many of them are still bad.
    buckets               integer     NOT NULL DEFAULT 1,
    bad_buckets           integer     NOT NULL DEFAULT 1,
    -- Worst (largest) missing count of one bucket seen during the incident.
    max_missing           bigint      NOT NULL DEFAULT 0,
    opened_at             timestamptz NOT NULL,
    resolved_at           timestamptz
);
-- At most one open incident per topic, edge and datacenter.
CREATE UNIQUE INDEX alert_incidents_open
    ON alert_incidents (topic, edge, datacenter) WHERE status = 'open';
CREATE INDEX alert_incidents_opened_at ON alert_incidents (opened_at);

-- The outbox. kind 'bad_bucket': a bucket of the incident turned (or stayed, with other
-- numbers) bad; kind 'resolved': the incident resolved. payload is the JSON notification data.
CREATE TABLE alert_events (
    id            bigserial   PRIMARY KEY,
    incident_id   bigint      NOT NULL REFERENCES alert_incidents (id),
    kind          text        NOT NULL CHECK (kind IN ('bad_bucket', 'resolved')),
    payload       text        NOT NULL,
    created_at    timestamptz NOT NULL,
    -- Set when the sender has created the deliveries of this event.
    fanned_out_at timestamptz
);
CREATE INDEX alert_events_pending ON alert_events (id) WHERE fanned_out_at IS NULL;

-- One notification to one webhook. body is the exact bytes posted (signed at send time).
CREATE TABLE alert_deliveries (
    id              bigserial   PRIMARY KEY,
    webhook         text        NOT NULL,
    incident_id     bigint      NOT NULL REFERENCES alert_incidents (id),
    event_id        bigint      NOT NULL REFERENCES alert_events (id),
    -- 'firing' or 'resolved'.
    kind            text        NOT NULL CHECK (kind IN ('firing', 'resolved')),
    -- Sent as the Idempotency-Key header: the same on every retry.
    idempotency_key text        NOT NULL UNIQUE,
    content_type    text        NOT NULL,
    body            text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    UNIQUE (webhook, incident_id, kind)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at) WHERE sent_at IS NULL;
