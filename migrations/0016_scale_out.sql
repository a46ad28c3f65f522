-- Chaperone collector: several collectors on one database.
--
-- Ingest transactions no longer take one global lock: each collector writes the audit
-- partitions the consumer group gives it, fenced by the stored offsets (see
-- collector/src/store/write.rs). Their change numbers therefore no longer become visible in
-- increasing order, so the reconciler stops reading `audit_count_changes` past a cursor and
-- takes (deletes) the changes it has queued instead. Changes already queued go now.

DELETE FROM audit_count_changes
 WHERE change_seq <= (SELECT change_seq FROM reconcile_cursor WHERE id = 1);

DROP TABLE reconcile_cursor;
