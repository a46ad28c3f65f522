//! Progress watermarks against the real stack (`dev/stack up`): a watermark never claims event
//! times of messages the service has not read yet, and a partition that holds nothing to read
//! is caught up. Each test uses its own random topics, group and audit topic.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaperone_audit::Progress;
use common::*;
use rand::Rng as _;

const HOUR_MS: i64 = 3_600_000;

/// `per_partition` messages in each of `partitions`, with CreateTimes between two hours and
/// one hour before `base`: far from any "now" a watermark could wrongly claim.
fn backlog(per_partition: usize, partitions: i32, base: i64) -> Vec<Msg> {
    let mut rng = rand::rng();
    (0..partitions)
        .flat_map(|p| (0..per_partition).map(move |i| (p, i)))
        .map(|(partition, i)| Msg {
            partition,
            timestamp: base - 2 * HOUR_MS + rng.random_range(0..HOUR_MS),
            payload: format!("{{\"n\":{i}}}").into_bytes(),
        })
        .collect()
}

/// Highest event time per partition.
fn max_event(msgs: &[Msg]) -> HashMap<i32, i64> {
    msgs.iter().fold(HashMap::new(), |mut m, msg| {
        let e = m.entry(msg.partition).or_insert(msg.timestamp);
        *e = (*e).max(msg.timestamp);
        m
    })
}

/// Fails when a progress record of a partition that still has unread messages (position
/// unknown or before `end`) claims event times later than the latest one in the partition.
fn check_unread_claims(p: &Progress, end: i64, max_event: i64) -> bool {
    let unread = p.position.is_none_or(|pos| pos < end);
    if unread {
        assert!(
            p.watermark_ms <= max_event,
            "partition {:?} at position {:?} of {end} claims watermark {} past its latest \
             event time {max_event} ({} ms ahead) before its backlog was read",
            p.partition,
            p.position,
            p.watermark_ms,
            p.watermark_ms - max_event
        );
    }
    unread
}

/// Without client statistics the end offsets stay unknown: the watermark of a partition is
/// what was read in it, never the flush time, even once its backlog is read (the position
/// has then reached the end, but the service cannot know it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_end_offsets_claim_only_what_was_read() {
    const PARTITIONS: i32 = 2;
    let (prefix, audit, topic, bootstrap) =
        regional_topic("svc-wm-unknown", "events", PARTITIONS).await;
    let msgs = backlog(2_000, PARTITIONS, now_ms());
    produce(&producer(&bootstrap), &topic, &msgs);
    let max_event = max_event(&msgs);
    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);

    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic)
        .flush_interval("200ms")
        .kafka_consumer("statistics.interval.ms", "0");
    let service = InProcess::start(cfg.parse("0")).await;

    let topics = vec![topic.clone()];
    let reader = tokio::task::spawn_blocking({
        let max_event = max_event.clone();
        move || {
            let mut reader = AuditReader::new(&bootstrap, &audit, 3, &topics);
            let mut checked = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                reader.poll_for(Duration::from_millis(500));
                for p in &reader.progress[checked..] {
                    let part = p.partition.expect("partition");
                    check_unread_claims(
                        p,
                        ends[&(p.physical_topic.clone(), part)],
                        max_event[&part],
                    );
                }
                checked = reader.progress.len();
                let done = (0..PARTITIONS).all(|part| {
                    reader
                        .progress
                        .iter()
                        .rev()
                        .find(|p| p.partition == Some(part))
                        .is_some_and(|p| {
                            p.position == Some(ends[&(p.physical_topic.clone(), part)])
                        })
                });
                if done {
                    break reader;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out: positions {:?} of {ends:?}",
                    reader.positions
                );
            }
        }
    })
    .await
    .expect("reader");
    service.stop().await;

    for part in 0..PARTITIONS {
        let last = reader
            .progress
            .iter()
            .rev()
            .find(|p| p.partition == Some(part))
            .expect("a progress record");
        assert_eq!(last.high_watermark, None, "end offsets unknown: {last:?}");
        assert_eq!(
            last.watermark_ms,
            max_event[&part],
            "read to the end without knowing it: the watermark is the latest event time read \
             ({} ms off)",
            last.watermark_ms - max_event[&part]
        );
    }
    assert_eq!(reader.total(), msgs.len() as u64);
}

/// A backlog read in small fetches over many flushes: no progress record of a partition with
/// unread messages claims more than the event times read; once read, the partition is caught
/// up and its watermark comes near the wall clock. A partition never written to is caught up
/// from the start, although nothing is ever read from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogs_claim_what_was_read_and_empty_partitions_are_caught_up() {
    const PARTITIONS: i32 = 3;
    const EMPTY: i32 = 2;
    let (prefix, audit, topic, bootstrap) =
        regional_topic("svc-wm-backlog", "events", PARTITIONS).await;
    // Partitions 0 and 1 hold the backlog, in batches of 20 messages; partition 2 stays empty.
    let msgs = backlog(10_000, EMPTY, now_ms());
    produce(
        &producer_with(&bootstrap, &[("batch.num.messages", "20")]),
        &topic,
        &msgs,
    );
    let max_event = max_event(&msgs);
    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);
    assert_eq!(ends[&(topic.clone(), EMPTY)], 0);

    // One record batch per fetch: the backlog takes many fetches and flushes to read.
    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic)
        .flush_interval("100ms")
        .kafka_consumer("message.max.bytes", "1000")
        .kafka_consumer("fetch.max.bytes", "1000")
        .kafka_consumer("max.partition.fetch.bytes", "1000");
    let started = now_ms();
    let service = InProcess::start(cfg.parse("0")).await;

    let topics = vec![topic.clone()];
    let reader = tokio::task::spawn_blocking(move || {
        let mut reader = AuditReader::new(&bootstrap, &audit, 3, &topics);
        let mut checked = 0;
        let mut unread_records = 0;
        // Per partition: caught up with a watermark after the service started.
        let mut caught_up: HashMap<i32, Progress> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            reader.poll_for(Duration::from_millis(500));
            for p in &reader.progress[checked..] {
                let part = p.partition.expect("partition");
                let end = ends[&(p.physical_topic.clone(), part)];
                if part == EMPTY {
                    assert!(p.position.is_none_or(|pos| pos == 0), "{p:?}");
                } else if check_unread_claims(p, end, max_event[&part]) {
                    unread_records += 1;
                }
                assert!(p.watermark_ms <= p.emitted_at_ms, "{p:?}");
                if p.position == Some(end) && p.watermark_ms >= started {
                    caught_up.entry(part).or_insert_with(|| p.clone());
                }
            }
            checked = reader.progress.len();
            if caught_up.len() == PARTITIONS as usize {
                break (reader, unread_records, caught_up);
            }
            assert!(
                Instant::now() < deadline,
                "timed out: caught up {:?}; last progress per partition: {:?}",
                caught_up.keys().collect::<Vec<_>>(),
                (0..PARTITIONS)
                    .filter_map(|part| reader
                        .progress
                        .iter()
                        .rev()
                        .find(|p| p.partition == Some(part)))
                    .map(|p| (p.partition, p.position, p.high_watermark, p.watermark_ms))
                    .collect::<Vec<_>>()
            );
        }
    })
    .await
    .expect("reader");
    let (reader, unread_records, caught_up) = reader;
    service.stop().await;

    eprintln!(
        "{unread_records} progress records of partitions with unread messages, {} in all",
        reader.progress.len()
    );
    assert!(
        unread_records > 0,
        "the backlog was read before any flush: nothing was checked"
    );
    for (part, p) in &caught_up {
        assert!(
            p.high_watermark == p.position,
            "partition {part} caught up: {p:?}"
        );
    }
    let empty = &caught_up[&EMPTY];
    assert_eq!(empty.position, Some(0));
    assert!(
        empty.emitted_at_ms - empty.watermark_ms < 30_000,
        "the empty partition's watermark trails its record by {} ms",
        empty.emitted_at_ms - empty.watermark_ms
    );
    assert_eq!(reader.total(), msgs.len() as u64);
}
