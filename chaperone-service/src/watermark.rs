//! Event-time watermarks of progress records.
//!
//! A progress record's `watermark_ms` promises that every message with an earlier event time
//! that is or will be in what this instance reads of the partition has been counted (and
//! committed in the same transaction). [`decide`] makes that claim for one partition from
//! what is known when a flush is prepared; [`Marks`] keeps what it needs between flushes.

use std::collections::HashMap;

use chaperone_audit::record::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use rdkafka::statistics::Statistics;

/// A partition: (physical topic, partition).
pub type Key = (String, i32);

/// End offsets of a partition, as client statistics reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    /// First offset still in the log.
    pub low: Option<i64>,
    /// High watermark.
    pub high: Option<i64>,
    /// Last stable offset (the end of what `read_committed` can read).
    pub stable: Option<i64>,
    /// Wall time (epoch ms) at which these were the broker's offsets.
    pub observed_ms: i64,
    /// The connection they came over has been up long enough that a fetch was surely
    /// answered on it: right after a broker restarted they may still be the offsets fetched
    /// before it went away, so a position at `high` does not prove the partition was read to
    /// its end (see [`FRESH_CONNECTION_US`]).
    pub settled: bool,
}

/// The group's committed offset of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Not looked up.
    Unknown,
    /// The group has no committed offset: the consumer starts where `auto.offset.reset` says.
    None,
    /// The next offset to read.
    At(i64),
}

/// What is known about one assigned partition when a flush is prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// The consumer's position: past the last message read since assignment or the last
    /// seek, `None` when nothing was read since.
    pub consumed: Option<i64>,
    /// The group's committed offset.
    pub committed: Committed,
    /// Whether a partition without a committed offset is read from its end.
    pub reset_to_end: bool,
    /// End offsets from client statistics, `None` until they arrived.
    pub ends: Option<Ends>,
    /// Highest event time counted in the partition since assignment, in committed batches
    /// and in the batch being prepared.
    pub seen_ms: Option<i64>,
    /// Whether the topic is a mirror of a topic of another cluster.
    pub mirrored: bool,
    /// The highest watermark this process committed for the partition.
    pub claimed_ms: Option<i64>,
}

/// What a progress record says about a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Next offset to read.
    pub position: Option<i64>,
    /// High watermark, never below `position`.
    pub high_watermark: Option<i64>,
    /// Messages between `position` and the last stable offset.
    pub lag: Option<i64>,
    /// Event-time watermark.
    pub watermark_ms: i64,
}

/// The watermark of one partition; see the module documentation for what it promises.
///
/// - The position is the consumer's, or, when nothing was read since assignment, the
///   committed offset, or without one the offset the consumer starts from (the log start;
///   unknown when it starts from the end).
/// - A non-mirrored partition whose position has reached the end offsets observed at time
///   `T` (the high watermark, so no open transaction can still commit records before it) is
///   caught up: every message in the log at `T` was counted, and the claim is `T`.
/// - Otherwise the claim is the highest event time read (never after `now_ms`): unknown end
///   offsets are unknown, not "no lag". A mirrored partition only ever claims that, since
///   having read a mirror to its end says nothing about what is still upstream of it.
/// - `lateness_ms` is subtracted, and the result never falls below what was claimed before.
pub fn decide(input: &Input, now_ms: i64, lateness_ms: i64) -> Decision {
    let ends = input.ends;
    let position = input.consumed.or(match input.committed {
        Committed::At(offset) => Some(offset),
        Committed::None if !input.reset_to_end => ends.and_then(|e| e.low),
        Committed::None | Committed::Unknown => None,
    });
    let high = ends
        .and_then(|e| e.high)
        .map(|h| position.map_or(h, |p| h.max(p)));
    let lag = match (ends.and_then(|e| e.stable), position) {
        (Some(s), Some(p)) => Some((s - p).max(0)),
        _ => None,
    };
    let caught_up = match (ends, position) {
        (Some(e), Some(p)) if !input.mirrored && e.settled && e.high.is_some_and(|h| p >= h) => {
            Some(e.observed_ms.min(now_ms))
        }
        _ => None,
    };
    let seen = input.seen_ms.map(|s| s.min(now_ms));
    let claim = caught_up.max(seen).map(|w| w.saturating_sub(lateness_ms));
    let watermark = claim.max(input.claimed_ms).unwrap_or(MIN_TIMESTAMP_MS);
    Decision {
        position,
        high_watermark: high,
        lag,
        watermark_ms: watermark.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
    }
}

/// How long a broker connection must have been in its state before the end offsets of the
/// partitions fetched over it are trusted, µs: several fetch round trips.
const FRESH_CONNECTION_US: i64 = 5_000_000;

/// The end offsets in client statistics that are fresh: of partitions being fetched from a
/// broker connection that is up. `observed_ms` is when the statistics were made (`now_ms`
/// at the latest) minus the time since that connection last received anything, so it is
/// never later than the fetch response the offsets came from.
pub fn ends_from_stats(stats: &Statistics, now_ms: i64) -> Vec<(Key, Ends)> {
    let made_ms = if stats.time > 0 {
        stats.time.saturating_mul(1000).min(now_ms)
    } else {
        now_ms
    };
    let known = |o: i64| Some(o).filter(|o| *o >= 0);
    let mut out = Vec::new();
    for (topic, t) in &stats.topics {
        for (p, s) in &t.partitions {
            if *p < 0 || s.fetch_state != "active" || s.broker < 0 || known(s.hi_offset).is_none() {
                continue;
            }
            let Some(b) = stats.brokers.values().find(|b| b.nodeid == s.broker) else {
                continue;
            };
            if b.rxidle < 0 {
                continue;
            }
            let rx_idle_us = b.rxidle;
            out.push((
                (topic.clone(), *p),
                Ends {
                    low: known(s.lo_offset),
                    high: known(s.hi_offset),
                    stable: known(s.ls_offset),
                    observed_ms: made_ms - (rx_idle_us + 999) / 1000,
                    // A connection that came up a moment ago (a broker restarted) has received
                    // something, but the end offsets may be the ones fetched before.
                    settled: b.stateage >= FRESH_CONNECTION_US,
                },
            ));
        }
    }
    out
}

/// Per-partition state behind the watermarks, as of the last committed batch plus what the
/// batch being prepared adds. A batch's additions are kept once it commits and dropped when
/// it aborts (its messages are then counted again).
#[derive(Debug, Default)]
pub struct Marks {
    seen: HashMap<Key, i64>,
    claimed: HashMap<Key, i64>,
    committed: HashMap<Key, Committed>,
    staged_seen: HashMap<Key, i64>,
    staged_claims: HashMap<Key, i64>,
    staged_offsets: HashMap<Key, i64>,
}

fn raise(map: &mut HashMap<Key, i64>, key: &Key, value: i64) {
    match map.get_mut(key) {
        Some(v) => *v = (*v).max(value),
        None => {
            map.insert(key.clone(), value);
        }
    }
}

impl Marks {
    /// Notes an event time counted in the batch being prepared.
    pub fn see(&mut self, key: &Key, event_ms: i64) {
        raise(&mut self.staged_seen, key, event_ms);
    }

    /// Highest event time counted in the partition since assignment, in committed batches
    /// and the batch being prepared.
    pub fn seen(&self, key: &Key) -> Option<i64> {
        self.seen
            .get(key)
            .copied()
            .max(self.staged_seen.get(key).copied())
    }

    /// The highest watermark committed for the partition.
    pub fn claimed(&self, key: &Key) -> Option<i64> {
        self.claimed.get(key).copied()
    }

    /// Notes the watermark of the batch being prepared.
    pub fn claim(&mut self, key: &Key, watermark_ms: i64) {
        raise(&mut self.staged_claims, key, watermark_ms);
    }

    /// The group's committed offset, as far as this instance knows it.
    pub fn committed(&self, key: &Key) -> Committed {
        self.committed
            .get(key)
            .copied()
            .unwrap_or(Committed::Unknown)
    }

    /// Notes the committed offset read from the broker.
    pub fn set_committed(&mut self, key: &Key, committed: Committed) {
        self.committed.insert(key.clone(), committed);
    }

    /// Notes an offset the batch being prepared commits.
    pub fn stage_offset(&mut self, key: &Key, offset: i64) {
        self.staged_offsets.insert(key.clone(), offset);
    }

    /// The batch being prepared committed.
    pub fn commit(&mut self) {
        for (key, v) in self.staged_seen.drain() {
            raise(&mut self.seen, &key, v);
        }
        for (key, v) in self.staged_claims.drain() {
            raise(&mut self.claimed, &key, v);
        }
        for (key, offset) in self.staged_offsets.drain() {
            self.committed.insert(key, Committed::At(offset));
        }
    }

    /// The batch being prepared aborted.
    pub fn abort(&mut self) {
        self.staged_seen.clear();
        self.staged_claims.clear();
        self.staged_offsets.clear();
    }

    /// The partition was assigned: another instance may have committed it meanwhile.
    pub fn assign(&mut self, key: &Key) {
        self.committed.remove(key);
    }

    /// The partition was revoked: what was seen in it says nothing about what this instance
    /// reads of it later. What it claimed stays claimed.
    pub fn revoke(&mut self, key: &Key) {
        self.seen.remove(key);
        self.staged_seen.remove(key);
        self.committed.remove(key);
        self.staged_offsets.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;
    const LATENESS: i64 = 5_000;

    fn key(p: i32) -> Key {
        ("orders".to_owned(), p)
    }

    fn ends(low: i64, stable: i64, high: i64, observed_ms: i64) -> Option<Ends> {
        Some(Ends {
            low: Some(low),
            high: Some(high),
            stable: Some(stable),
            observed_ms,
            settled: true,
        })
    }

    fn input() -> Input {
        Input {
            consumed: None,
            committed: Committed::Unknown,
            reset_to_end: false,
            ends: None,
            seen_ms: None,
            mirrored: false,
            claimed_ms: None,
        }
    }

    /// Bug 1: before statistics arrived, a partition being read was taken for caught up.
    #[test]
    fn unknown_end_offsets_claim_only_what_was_seen() {
        let seen = NOW - 3_600_000;
        let d = decide(
            &Input {
                consumed: Some(10),
                seen_ms: Some(seen),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.lag, None, "unknown end offsets mean unknown lag");
        assert_eq!(d.high_watermark, None);
        assert_eq!(d.position, Some(10));
        assert_eq!(d.watermark_ms, seen - LATENESS);

        // Nothing seen either: no advance.
        let d = decide(
            &Input {
                consumed: Some(10),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);
    }

    /// Bug 2: a caught-up partition claimed the flush time instead of the time its end
    /// offsets were known.
    #[test]
    fn caught_up_claims_the_time_end_offsets_were_observed() {
        let observed = NOW - 20_000;
        let d = decide(
            &Input {
                consumed: Some(100),
                ends: ends(0, 100, 100, observed),
                seen_ms: Some(NOW - 3_600_000),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.lag, Some(0));
        assert_eq!(d.high_watermark, Some(100));
        assert_eq!(d.watermark_ms, observed - LATENESS);
        // Over a connection that just came up, the same offsets prove nothing: only what was
        // seen is claimed.
        let unsettled = ends(0, 100, 100, observed).map(|e| Ends {
            settled: false,
            ..e
        });
        let d = decide(
            &Input {
                consumed: Some(100),
                ends: unsettled,
                seen_ms: Some(NOW - 3_600_000),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.watermark_ms, NOW - 3_600_000 - LATENESS);
    }

    /// Behind the end offsets: only what was seen.
    #[test]
    fn lagging_partition_claims_what_was_seen() {
        let seen = NOW - 3_600_000;
        let d = decide(
            &Input {
                consumed: Some(40),
                ends: ends(0, 100, 100, NOW - 1_000),
                seen_ms: Some(seen),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.lag, Some(60));
        assert_eq!(d.watermark_ms, seen - LATENESS);
        // Event times from a clock ahead of ours claim no more than now.
        let d = decide(
            &Input {
                consumed: Some(40),
                ends: ends(0, 100, 100, NOW - 1_000),
                seen_ms: Some(NOW + 3_600_000),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.watermark_ms, NOW - LATENESS);
    }

    /// Records of an open transaction lie between the last stable offset and the high
    /// watermark and may commit later with earlier event times: reaching the stable offset
    /// is then not caught up.
    #[test]
    fn open_transaction_is_not_caught_up() {
        let seen = NOW - 3_600_000;
        let d = decide(
            &Input {
                consumed: Some(100),
                ends: ends(0, 100, 120, NOW - 1_000),
                seen_ms: Some(seen),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.lag, Some(0));
        assert_eq!(d.high_watermark, Some(120));
        assert_eq!(d.watermark_ms, seen - LATENESS);
    }

    /// Bug 3: a mirror read to its end says nothing about what is still upstream of the
    /// mirror maker.
    #[test]
    fn mirrored_partitions_claim_only_what_was_seen() {
        let seen = NOW - 3_600_000;
        let caught_up = Input {
            consumed: Some(100),
            ends: ends(0, 100, 100, NOW - 1_000),
            seen_ms: Some(seen),
            mirrored: true,
            ..input()
        };
        let d = decide(&caught_up, NOW, LATENESS);
        assert_eq!(d.lag, Some(0));
        assert_eq!(d.watermark_ms, seen - LATENESS);
        // Nothing read since assignment: nothing claimed, even on an empty partition.
        let d = decide(
            &Input {
                consumed: None,
                committed: Committed::At(100),
                seen_ms: None,
                ..caught_up
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, Some(100));
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);
    }

    /// Bug 4: a partition with nothing read since assignment had no position and the
    /// 2000-01-01 watermark even when it held nothing to read.
    #[test]
    fn nothing_read_uses_the_committed_offset() {
        let observed = NOW - 2_000;
        let at_end = Input {
            committed: Committed::At(100),
            ends: ends(0, 100, 100, observed),
            ..input()
        };
        let d = decide(&at_end, NOW, LATENESS);
        assert_eq!(d.position, Some(100));
        assert_eq!(d.lag, Some(0));
        assert_eq!(d.watermark_ms, observed - LATENESS);

        // A backlog past the committed offset: not caught up, nothing seen.
        let d = decide(
            &Input {
                committed: Committed::At(60),
                ..at_end
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, Some(60));
        assert_eq!(d.lag, Some(40));
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);

        // End offsets unknown: unknown.
        let d = decide(
            &Input {
                ends: None,
                ..at_end
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, Some(100));
        assert_eq!(d.lag, None);
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);

        // The committed offset not looked up: no position.
        let d = decide(
            &Input {
                committed: Committed::Unknown,
                ..at_end
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, None);
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);
    }

    /// Bug 4: without a committed offset the consumer starts at the log start (or the end).
    #[test]
    fn nothing_read_nor_committed_uses_the_start_offset() {
        let observed = NOW - 2_000;
        // Never written: the log start is its end.
        let empty = Input {
            committed: Committed::None,
            ends: ends(0, 0, 0, observed),
            ..input()
        };
        let d = decide(&empty, NOW, LATENESS);
        assert_eq!(d.position, Some(0));
        assert_eq!(d.watermark_ms, observed - LATENESS);

        // Everything deleted by retention before it was read: nothing left to read.
        let d = decide(
            &Input {
                ends: ends(500, 500, 500, observed),
                ..empty
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, Some(500));
        assert_eq!(d.watermark_ms, observed - LATENESS);

        // A backlog from the log start.
        let d = decide(
            &Input {
                ends: ends(0, 70, 70, observed),
                ..empty
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, Some(0));
        assert_eq!(d.lag, Some(70));
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);

        // Read from the end: where it starts is not known until it read something.
        let d = decide(
            &Input {
                reset_to_end: true,
                ..empty
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.position, None);
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);
    }

    /// Bug 4: the watermark never falls below what this process already claimed.
    #[test]
    fn watermark_never_regresses_below_the_claim() {
        let claimed = NOW - 60_000;
        for i in [
            Input {
                claimed_ms: Some(claimed),
                ..input()
            },
            Input {
                committed: Committed::At(60),
                ends: ends(0, 100, 100, NOW - 1_000),
                claimed_ms: Some(claimed),
                ..input()
            },
            Input {
                consumed: Some(100),
                ends: ends(0, 100, 100, NOW - 1_000),
                seen_ms: Some(NOW - 3_600_000),
                mirrored: true,
                claimed_ms: Some(claimed),
                ..input()
            },
        ] {
            assert_eq!(decide(&i, NOW, LATENESS).watermark_ms, claimed, "{i:?}");
        }
        // A newer claim replaces it.
        let d = decide(
            &Input {
                consumed: Some(100),
                ends: ends(0, 100, 100, NOW - 1_000),
                claimed_ms: Some(claimed),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.watermark_ms, NOW - 1_000 - LATENESS);
    }

    #[test]
    fn watermarks_stay_in_the_record_range() {
        let d = decide(
            &Input {
                consumed: Some(1),
                seen_ms: Some(MIN_TIMESTAMP_MS + 10),
                ..input()
            },
            NOW,
            LATENESS,
        );
        assert_eq!(d.watermark_ms, MIN_TIMESTAMP_MS);
    }

    /// Bug 5: the event times of a batch that aborted were kept, so the watermarks of its
    /// recount started from event times nothing committed.
    #[test]
    fn aborted_batches_leave_the_committed_event_times() {
        let mut m = Marks::default();
        m.see(&key(0), 1_000);
        m.commit();
        assert_eq!(m.seen(&key(0)), Some(1_000));

        m.see(&key(0), 5_000);
        m.see(&key(1), 4_000);
        assert_eq!(
            m.seen(&key(0)),
            Some(5_000),
            "the batch being prepared counts"
        );
        m.abort();
        assert_eq!(m.seen(&key(0)), Some(1_000));
        assert_eq!(m.seen(&key(1)), None);

        m.see(&key(0), 3_000);
        m.commit();
        assert_eq!(m.seen(&key(0)), Some(3_000));
    }

    /// Claims count once their batch committed, and never go back.
    #[test]
    fn claims_count_once_committed() {
        let mut m = Marks::default();
        m.claim(&key(0), 900);
        assert_eq!(m.claimed(&key(0)), None);
        m.commit();
        assert_eq!(m.claimed(&key(0)), Some(900));
        m.claim(&key(0), 4_900);
        m.claim(&key(1), 3_900);
        m.abort();
        assert_eq!(m.claimed(&key(0)), Some(900));
        assert_eq!(m.claimed(&key(1)), None);
        m.claim(&key(0), 100);
        m.commit();
        assert_eq!(m.claimed(&key(0)), Some(900));
    }

    /// Revoking a partition forgets what was seen in it, not what was claimed.
    #[test]
    fn revocation_forgets_what_was_seen() {
        let mut m = Marks::default();
        m.see(&key(0), 1_000);
        m.claim(&key(0), 900);
        m.commit();
        m.revoke(&key(0));
        assert_eq!(m.seen(&key(0)), None);
        assert_eq!(m.claimed(&key(0)), Some(900));
    }

    /// Committed offsets: looked up, then moved by committed batches only.
    #[test]
    fn committed_offsets_follow_committed_batches() {
        let mut m = Marks::default();
        assert_eq!(m.committed(&key(0)), Committed::Unknown);
        m.set_committed(&key(0), Committed::None);
        m.stage_offset(&key(0), 10);
        m.abort();
        assert_eq!(m.committed(&key(0)), Committed::None);
        m.stage_offset(&key(0), 10);
        m.commit();
        assert_eq!(m.committed(&key(0)), Committed::At(10));
        m.assign(&key(0));
        assert_eq!(m.committed(&key(0)), Committed::Unknown);
        m.set_committed(&key(0), Committed::At(20));
        m.revoke(&key(0));
        assert_eq!(m.committed(&key(0)), Committed::Unknown);
    }

    fn stats(time_s: i64, rxidle_us: i64, fetch_state: &str, broker: i32) -> Statistics {
        use rdkafka::statistics::{Broker, Partition, Topic};
        let partition = |p: i32| Partition {
            partition: p,
            broker,
            leader: 1,
            fetch_state: fetch_state.to_owned(),
            lo_offset: 5,
            hi_offset: 100,
            ls_offset: 90,
            ..Partition::default()
        };
        Statistics {
            time: time_s,
            brokers: HashMap::from([(
                "127.0.0.1:19092/1".to_owned(),
                Broker {
                    nodeid: 1,
                    rxidle: rxidle_us,
                    stateage: 60_000_000,
                    ..Broker::default()
                },
            )]),
            topics: HashMap::from([(
                "orders".to_owned(),
                Topic {
                    topic: "orders".to_owned(),
                    // -1 is librdkafka's unassigned-partition entry.
                    partitions: HashMap::from([(0, partition(0)), (-1, partition(-1))]),
                    ..Topic::default()
                },
            )]),
            ..Statistics::default()
        }
    }

    /// Bug 2: end offsets are as old as the fetch response they came in, not the time the
    /// statistics were read.
    #[test]
    fn end_offsets_are_dated_by_their_fetch_response() {
        let made_s = NOW / 1000 - 3;
        let got = ends_from_stats(&stats(made_s, 250_500, "active", 1), NOW);
        assert_eq!(
            got,
            vec![(
                key(0),
                Ends {
                    low: Some(5),
                    high: Some(100),
                    stable: Some(90),
                    observed_ms: made_s * 1000 - 251,
                    settled: true,
                }
            )]
        );
        // Never after the clock reading them.
        let got = ends_from_stats(&stats(NOW / 1000 + 60, 0, "active", 1), NOW);
        assert_eq!(got[0].1.observed_ms, NOW);
    }

    /// Offsets of partitions not being fetched, or fetched over a connection that is down,
    /// are stale: they are not refreshed.
    #[test]
    fn stale_end_offsets_are_ignored() {
        let t = NOW / 1000;
        assert!(ends_from_stats(&stats(t, 1_000, "stopped", 1), NOW).is_empty());
        // A connection that just came up (the broker restarted): the end offsets may be the
        // ones fetched before.
        let mut fresh = stats(t, 1_000, "active", 1);
        for b in fresh.brokers.values_mut() {
            b.stateage = 1_000_000;
        }
        let got = ends_from_stats(&fresh, NOW);
        assert!(got.len() == 1 && !got[0].1.settled, "{got:?}");
        assert!(ends_from_stats(&stats(t, 1_000, "offset-query", 1), NOW).is_empty());
        assert!(ends_from_stats(&stats(t, -1, "active", 1), NOW).is_empty());
        assert!(ends_from_stats(&stats(t, 1_000, "active", -1), NOW).is_empty());
        assert!(ends_from_stats(&stats(t, 1_000, "active", 2), NOW).is_empty());
    }
}
