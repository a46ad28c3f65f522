-- Chaperone collector: consumer groups whose counts are at-least-once.
--
-- A consumer in at-least-once mode (audit-lib's AuditedConsumer without `transactional`) sends
-- its counts, then commits its offsets: a member killed between the two has the same messages
-- processed, and counted, again by the next owner of the partition. Its progress records say so
-- (`"at_least_once": true`), and a downstream tier that counted more than its upstream is then
-- `redelivered` (stored and served, not notified) rather than `duplicated`.
ALTER TABLE audit_progress ADD COLUMN at_least_once boolean NOT NULL DEFAULT false;

ALTER TABLE reconcile_verdicts DROP CONSTRAINT reconcile_verdicts_status_check;
ALTER TABLE reconcile_verdicts ADD CONSTRAINT reconcile_verdicts_status_check
    CHECK (status IN ('complete', 'missing', 'duplicated', 'tier_silent', 'lagging',
                      'upstream_incomplete', 'redelivered'));
