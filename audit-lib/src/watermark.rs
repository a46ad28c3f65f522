//! The event-time watermark of an [`AuditedProducer`](crate::AuditedProducer): the promise,
//! carried by its progress records, that every message with an earlier event time that it
//! will ever have acknowledged has been counted in records sent before.
//!
//! Two kinds of message can still be counted later, and each bounds the watermark:
//! - messages sent but not acknowledged yet ([`InFlight`]): they will be counted in the
//!   bucket of their event time, so the watermark is at most the start of the oldest bucket
//!   with a message in flight;
//! - messages not sent yet: their event times are unknown, but a producer whose event times
//!   trail its clock (clock skew, a backfill) will go on doing so, so the watermark is at
//!   most now minus the event-time lag ([`EventLag`]): the largest (acknowledgement time -
//!   event time) among the messages acknowledged in the latest flush interval that had any.
//!
//! [`ProducerWatermarks`] combines both ([`watermark`]); the reporter asks it once per flush
//! (that call is what delimits the flush intervals of the lag) before draining the tracker.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::bucket::BucketWidth;
use crate::reporter::Watermarks;
use crate::tracker::lock_free_shard;

/// The watermark of a producer at `now_ms`: the start of the oldest bucket with a message
/// in flight (if any), and at most `now_ms - event_lag_ms` (a negative lag counts as 0).
pub fn watermark(oldest_in_flight_ms: Option<i64>, now_ms: i64, event_lag_ms: i64) -> i64 {
    let trailing = now_ms.saturating_sub(event_lag_ms.max(0));
    oldest_in_flight_ms.map_or(trailing, |b| b.min(trailing))
}

/// How far a producer's event times trail its clock: the largest (acknowledgement time -
/// event time) among the messages acknowledged during the latest flush interval that had
/// any. It is kept while the producer is idle, is 0 before the first acknowledgement, and a
/// message acknowledged "before" its event time (a clock running behind) counts as 0.
#[derive(Debug)]
pub struct EventLag {
    /// Largest lag in the interval under way; -1 while nothing was acknowledged in it.
    current: AtomicI64,
    /// The lag of the latest finished interval that had acknowledgements.
    last: AtomicI64,
}

impl Default for EventLag {
    fn default() -> Self {
        Self {
            current: AtomicI64::new(-1),
            last: AtomicI64::new(0),
        }
    }
}

impl EventLag {
    /// A message with event time `event_ms` was acknowledged at `ack_ms`.
    #[inline]
    pub fn observe(&self, event_ms: i64, ack_ms: i64) {
        let lag = ack_ms.saturating_sub(event_ms).max(0);
        // Acknowledgements arrive on librdkafka's polling thread; the load spares most of
        // them the read-modify-write.
        if lag > self.current.load(Ordering::Relaxed) {
            self.current.fetch_max(lag, Ordering::Relaxed);
        }
    }

    /// Ends the interval under way and returns the event-time lag: the one of this interval
    /// if it had acknowledgements, else the one of the latest interval that had.
    pub fn roll(&self) -> i64 {
        let lag = self.current.swap(-1, Ordering::Relaxed);
        if lag >= 0 {
            self.last.store(lag, Ordering::Relaxed);
            lag
        } else {
            self.last.load(Ordering::Relaxed)
        }
    }
}

/// Messages in flight for one (topic, event-time bucket) on one shard.
#[derive(Debug)]
struct FlightSlot {
    topic: Box<str>,
    start: i64,
    end: i64,
    n: i64,
}

#[derive(Debug, Default)]
struct FlightCells {
    slots: Vec<FlightSlot>,
    last: usize,
}

/// One shard on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct FlightShard(Mutex<FlightCells>);

/// Messages sent but not yet acknowledged, per topic and event-time bucket. Sharded like the
/// tracker: a message may start on one shard and finish on another, only the sums over
/// shards mean anything. A producer has few (topic, bucket) pairs in flight at once, so each
/// shard is a short list with a last-used cache.
#[derive(Debug)]
pub(crate) struct InFlight {
    width: BucketWidth,
    shards: Box<[FlightShard]>,
    mask: usize,
}

impl InFlight {
    /// Nothing in flight, counting in buckets of `width`.
    pub fn new(width: BucketWidth) -> Self {
        let n = (std::thread::available_parallelism().map_or(4, |n| n.get()) * 4)
            .clamp(8, 256)
            .next_power_of_two();
        Self {
            width,
            shards: (0..n).map(|_| FlightShard::default()).collect(),
            mask: n - 1,
        }
    }

    /// Adds `delta` messages with event time `event_ms` on `topic` (+1 when sent, -1 when
    /// acknowledged, failed or given up). Returns whether a (topic, bucket) slot was created
    /// on the way (the rare path).
    #[inline]
    pub fn add(&self, topic: &str, event_ms: i64, delta: i64) -> bool {
        let mut cells = lock_free_shard(&self.shards, self.mask, |s| &s.0);
        let last = cells.last;
        if let Some(slot) = cells.slots.get_mut(last)
            && event_ms >= slot.start
            && event_ms < slot.end
            && &*slot.topic == topic
        {
            slot.n += delta;
            return false;
        }
        let start = self.width.start_of(event_ms);
        let (i, created) = match cells
            .slots
            .iter()
            .position(|s| s.start == start && &*s.topic == topic)
        {
            Some(i) => (i, false),
            None => {
                cells.slots.push(FlightSlot {
                    topic: topic.into(),
                    start,
                    end: self.width.end_of(start),
                    n: 0,
                });
                (cells.slots.len() - 1, true)
            }
        };
        cells.slots[i].n += delta;
        cells.last = i;
        created
    }

    /// For each topic with messages in flight, the start of the oldest bucket among them.
    pub fn oldest(&self) -> BTreeMap<Box<str>, i64> {
        let mut guards: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let mut totals: BTreeMap<(Box<str>, i64), i64> = BTreeMap::new();
        for g in &guards {
            for s in &g.slots {
                *totals.entry((s.topic.clone(), s.start)).or_insert(0) += s.n;
            }
        }
        // (topic, bucket) pairs with nothing in flight any more are forgotten everywhere.
        for g in &mut guards {
            g.slots.retain(|s| {
                totals
                    .get(&(s.topic.clone(), s.start))
                    .is_some_and(|n| *n != 0)
            });
            g.last = usize::MAX;
        }
        let mut oldest: BTreeMap<Box<str>, i64> = BTreeMap::new();
        // In (topic, bucket) order: the first bucket of a topic is its oldest.
        for ((topic, start), n) in totals {
            if n > 0 && !oldest.contains_key(&topic) {
                oldest.insert(topic, start);
            }
        }
        oldest
    }
}

/// The watermark source of an [`AuditedProducer`](crate::AuditedProducer): its messages in
/// flight and its event-time lag. See the module documentation.
#[derive(Debug)]
pub struct ProducerWatermarks {
    in_flight: InFlight,
    lag: EventLag,
    /// Every topic sent to, and those not yet handed to the reporter.
    topics: Mutex<(HashSet<Box<str>>, Vec<String>)>,
    new_topic: Arc<Notify>,
}

impl ProducerWatermarks {
    /// Nothing sent yet, counting in buckets of `width`.
    pub fn new(width: BucketWidth) -> Self {
        Self {
            in_flight: InFlight::new(width),
            lag: EventLag::default(),
            topics: Mutex::default(),
            new_topic: Arc::new(Notify::new()),
        }
    }

    /// A message with event time `event_ms` is about to be sent to `topic`.
    #[inline]
    pub fn sent(&self, topic: &str, event_ms: i64) {
        if self.in_flight.add(topic, event_ms, 1) {
            // A new (topic, bucket) slot: rare enough to check for a topic never sent to.
            let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            if !topics.0.contains(topic) {
                topics.0.insert(topic.into());
                topics.1.push(topic.to_owned());
                self.new_topic.notify_one();
            }
        }
    }

    /// A message sent with [`ProducerWatermarks::sent`] will not be counted: its delivery
    /// failed, or it was never enqueued.
    #[inline]
    pub fn not_delivered(&self, topic: &str, event_ms: i64) {
        self.in_flight.add(topic, event_ms, -1);
    }

    /// A message sent with [`ProducerWatermarks::sent`] was acknowledged at `ack_ms` (and
    /// counted). `timed` says whether `event_ms` is a usable event time: an event time the
    /// audit contract cannot carry says nothing about the lag.
    #[inline]
    pub fn acknowledged(&self, topic: &str, event_ms: i64, ack_ms: i64, timed: bool) {
        self.in_flight.add(topic, event_ms, -1);
        if timed {
            self.lag.observe(event_ms, ack_ms);
        }
    }
}

impl Watermarks for ProducerWatermarks {
    fn watermarks_ms(&self, topics: &[&str], now_ms: i64) -> Vec<i64> {
        let lag = self.lag.roll();
        let oldest = self.in_flight.oldest();
        topics
            .iter()
            .map(|t| watermark(oldest.get(*t).copied(), now_ms, lag))
            .collect()
    }

    fn new_topics(&self) -> Vec<String> {
        std::mem::take(&mut self.topics.lock().unwrap_or_else(PoisonError::into_inner).1)
    }

    fn new_topic_signal(&self) -> Option<Arc<Notify>> {
        Some(Arc::clone(&self.new_topic))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn a_topic_first_sent_to_is_announced_once() {
        let w = ProducerWatermarks::new(BucketWidth::default());
        let signal = w.new_topic_signal().expect("a producer announces topics");
        assert!(w.new_topics().is_empty());
        w.sent("orders", 10 * MIN);
        w.sent("orders", 10 * MIN + 1);
        w.sent("orders", 11 * MIN);
        w.sent("payments", 10 * MIN);
        assert_eq!(w.new_topics(), ["orders", "payments"]);
        assert!(w.new_topics().is_empty(), "handed over once");
        w.sent("orders", 12 * MIN);
        assert!(
            w.new_topics().is_empty(),
            "a new bucket of a known topic is not news"
        );
        // The permit stored while nobody waited is there for the reporter.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), signal.notified())
                .await
                .expect("signalled");
        });
    }

    #[test]
    fn watermark_is_the_earlier_of_the_oldest_bucket_in_flight_and_now_minus_the_lag() {
        let now = 100 * MIN + 5;
        assert_eq!(watermark(None, now, 0), now);
        assert_eq!(watermark(None, now, 90_000), now - 90_000);
        assert_eq!(watermark(Some(99 * MIN), now, 0), 99 * MIN);
        assert_eq!(watermark(Some(99 * MIN), now, 90_000), now - 90_000);
        assert_eq!(watermark(Some(90 * MIN), now, 90_000), 90 * MIN);
        // A bucket in flight in the future never pushes the watermark past now.
        assert_eq!(watermark(Some(200 * MIN), now, 0), now);
        assert_eq!(
            watermark(None, now, -5_000),
            now,
            "a negative lag counts as 0"
        );
        assert_eq!(watermark(None, i64::MIN + 1, i64::MAX), i64::MIN);
    }

    #[test]
    fn event_lag_is_the_largest_of_the_latest_interval_with_acknowledgements() {
        let lag = EventLag::default();
        assert_eq!(lag.roll(), 0, "0 before any message");
        lag.observe(1_000, 1_050);
        lag.observe(1_000, 91_000);
        lag.observe(2_000, 2_010);
        assert_eq!(lag.roll(), 90_000, "the largest of the interval");
        assert_eq!(lag.roll(), 90_000, "kept while idle");
        assert_eq!(lag.roll(), 90_000, "kept while idle");
        // A later interval with acknowledgements replaces it, even with a smaller lag.
        lag.observe(5_000, 5_020);
        assert_eq!(lag.roll(), 20);
        // Event times ahead of the acknowledgement (a clock running behind) count as 0.
        lag.observe(10_000, 9_000);
        assert_eq!(lag.roll(), 0);
        // Acknowledgements from other threads count in the interval under way.
        let lag = Arc::new(lag);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let lag = Arc::clone(&lag);
                std::thread::spawn(move || {
                    for k in 0..1_000 {
                        lag.observe(0, i * 1_000 + k);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(lag.roll(), 3_999);
    }

    #[test]
    fn in_flight_gives_the_oldest_bucket_per_topic() {
        let f = Arc::new(InFlight::new(BucketWidth::default()));
        assert!(f.oldest().is_empty(), "nothing in flight");
        f.add("t", 2 * MIN + 7, 1);
        f.add("t", 5 * MIN, 1);
        f.add("u", MIN, 1);
        assert_eq!(
            f.oldest(),
            BTreeMap::from([("t".into(), 2 * MIN), ("u".into(), MIN)])
        );
        // The acknowledgement arrives on another thread (another shard).
        let g = Arc::clone(&f);
        std::thread::spawn(move || g.add("t", 2 * MIN + 7, -1))
            .join()
            .expect("thread");
        assert_eq!(f.oldest().get("t"), Some(&(5 * MIN)));
        f.add("t", 5 * MIN + 1, -1);
        assert_eq!(f.oldest().get("t"), None);
        assert_eq!(f.oldest().get("u"), Some(&MIN));
    }

    #[test]
    fn a_producer_whose_event_times_trail_its_clock_says_so() {
        let w = ProducerWatermarks::new(BucketWidth::default());
        let mut now = 1_000 * MIN;
        // Before any message: nothing in flight, no lag.
        assert_eq!(w.watermarks_ms(&["orders"], now), vec![now]);
        // Event times 90 s behind the clock, acknowledged 20 ms after sending.
        for i in 0..10 {
            let event = now - 90_000 + i;
            w.sent("orders", event);
            w.acknowledged("orders", event, now + 20, true);
        }
        now += 10_000;
        assert_eq!(
            w.watermarks_ms(&["orders", "idle"], now),
            vec![now - 90_020, now - 90_020],
            "the lag is the producer's, for every topic"
        );
        // Idle for a while: the lag is kept.
        now += 10_000;
        assert_eq!(w.watermarks_ms(&["orders"], now), vec![now - 90_020]);
        // A message in flight from an older bucket holds the watermark further back.
        let old = now - 10 * MIN;
        w.sent("orders", old);
        now += 10_000;
        assert_eq!(
            w.watermarks_ms(&["orders", "idle"], now),
            vec![BucketWidth::default().start_of(old), now - 90_020]
        );
        // It fails; the producer catches up with its clock.
        w.not_delivered("orders", old);
        w.sent("orders", now);
        w.acknowledged("orders", now, now + 5, true);
        now += 10_000;
        assert_eq!(w.watermarks_ms(&["orders"], now), vec![now - 5]);
        // Unusable event times do not count towards the lag.
        w.sent("orders", 0);
        w.acknowledged("orders", 0, now, false);
        now += 10_000;
        assert_eq!(w.watermarks_ms(&["orders"], now), vec![now - 5]);
    }
}
