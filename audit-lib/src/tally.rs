//! Single-threaded accumulation of messages into (topic, partition, bucket) cells.
//!
//! A [`Tally`] is what a producer's hop counts into between two flushes: audit-lib's
//! concurrent tracker keeps one per shard. Draining it yields [`Entry`] values that become
//! [`Counts`] records once the caller names the logical topic and the observer.
//! (chaperone-service keeps a tally of its own, with compact latencies and a memory limit.)

// Topic names and partition numbers come from the audited cluster, not from strangers, so a
// fast non-cryptographic hash is safe here; it is on the per-message path.
use foldhash::HashMap;

use crate::bucket::BucketWidth;
use crate::histogram::Latency;
use crate::record::{Counts, Observer};

/// What one hop has counted in one (topic, partition, bucket).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    /// Messages counted, including untimed and malformed ones.
    pub count: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Messages with no usable event time (bucketed by arrival time).
    pub no_timestamp: u64,
    /// Messages whose payload could not be parsed for an event time.
    pub malformed: u64,
    /// Earliest event time seen.
    pub min_event_ms: Option<i64>,
    /// Latest event time seen.
    pub max_event_ms: Option<i64>,
    /// Latency distribution of the timed messages.
    pub latency: Latency,
}

impl Cell {
    /// Adds one message with a known event time.
    #[inline]
    pub fn add_timed(&mut self, event_ms: i64, bytes: u64, seen_at_ms: i64) {
        self.count += 1;
        self.bytes += bytes;
        self.min_event_ms = Some(self.min_event_ms.map_or(event_ms, |m| m.min(event_ms)));
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        self.latency.record(seen_at_ms.saturating_sub(event_ms));
    }

    /// Adds one message without a usable event time; `malformed` when its payload could
    /// not be parsed.
    #[inline]
    pub fn add_untimed(&mut self, bytes: u64, malformed: bool) {
        self.count += 1;
        self.bytes += bytes;
        self.no_timestamp += 1;
        if malformed {
            self.malformed += 1;
        }
    }

    /// Adds everything counted in `other`.
    pub fn merge(&mut self, other: &Cell) {
        self.count += other.count;
        self.bytes += other.bytes;
        self.no_timestamp += other.no_timestamp;
        self.malformed += other.malformed;
        self.min_event_ms = match (self.min_event_ms, other.min_event_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max_event_ms = match (self.max_event_ms, other.max_event_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.latency.merge(&other.latency);
    }
}

/// One drained cell with its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Topic the messages were counted under (the physical topic for a cluster tier).
    pub topic: String,
    /// Partition, when known.
    pub partition: Option<i32>,
    /// Start of the event-time bucket.
    pub bucket_start_ms: i64,
    /// What was counted.
    pub cell: Cell,
}

impl Entry {
    /// Turns this entry into a counts record.
    pub fn into_counts(
        self,
        id: String,
        logical_topic: String,
        width: BucketWidth,
        observer: Observer,
        emitted_at_ms: i64,
    ) -> Counts {
        Counts {
            id,
            topic: logical_topic,
            physical_topic: self.topic,
            partition: self.partition,
            bucket_start_ms: self.bucket_start_ms,
            bucket_width: width,
            observer,
            count: self.cell.count,
            bytes: self.cell.bytes,
            no_timestamp: self.cell.no_timestamp,
            malformed: self.cell.malformed,
            min_event_ms: self.cell.min_event_ms,
            max_event_ms: self.cell.max_event_ms,
            latency: self.cell.latency,
            emitted_at_ms,
        }
    }
}

/// Cells keyed by (topic, partition, bucket start).
///
/// Consumers see messages in runs of one partition and bucket, so the cell of the previous
/// message is remembered and reached without hashing.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    width: BucketWidth,
    /// Topic name -> index into `names`; kept across drains (topics are few and recur).
    topics: HashMap<String, usize>,
    names: Vec<String>,
    /// (topic index, partition, bucket start) -> index into `cells`.
    slots: HashMap<(usize, Option<i32>, i64), usize>,
    cells: Vec<(Slot, Cell)>,
    last: Option<(Slot, usize)>,
}

/// (topic index, partition, bucket start).
type Slot = (usize, Option<i32>, i64);

impl Tally {
    /// An empty tally counting into buckets of `width`.
    pub fn new(width: BucketWidth) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// The bucket width.
    pub fn width(&self) -> BucketWidth {
        self.width
    }

    /// Number of open cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell is open.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Whether the cell for this key already exists (recording into it opens no new cell).
    pub fn contains(&self, topic: &str, partition: Option<i32>, bucket_start_ms: i64) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|&t| self.slots.contains_key(&(t, partition, bucket_start_ms)))
    }

    /// The cell for (topic, partition, bucket), created when missing. Looks the topic up by
    /// `&str`, so no allocation happens once the topic is known.
    #[inline]
    pub fn cell(&mut self, topic: &str, partition: Option<i32>, bucket_start_ms: i64) -> &mut Cell {
        if let Some(((t, p, b), i)) = self.last
            && p == partition
            && b == bucket_start_ms
            && self.names[t] == topic
        {
            return &mut self.cells[i].1;
        }
        let t = match self.topics.get(topic) {
            Some(&t) => t,
            None => {
                self.names.push(topic.to_owned());
                self.topics.insert(topic.to_owned(), self.names.len() - 1);
                self.names.len() - 1
            }
        };
        let slot = (t, partition, bucket_start_ms);
        let cells = &mut self.cells;
        let i = *self.slots.entry(slot).or_insert_with(|| {
            cells.push((slot, Cell::default()));
            cells.len() - 1
        });
        self.last = Some((slot, i));
        &mut self.cells[i].1
    }

    /// The cell for (topic, partition, bucket) if it is open, or opened when fewer than
    /// `max_cells` are: `None` when opening it would pass that cap.
    #[inline]
    pub fn cell_within(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        bucket_start_ms: i64,
        max_cells: usize,
    ) -> Option<&mut Cell> {
        if self.cells.len() >= max_cells && !self.contains(topic, partition, bucket_start_ms) {
            return None;
        }
        Some(self.cell(topic, partition, bucket_start_ms))
    }

    /// Counts one message with a known event time.
    #[inline]
    pub fn record(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        event_ms: i64,
        bytes: u64,
        seen_at_ms: i64,
    ) {
        let start = self.width.start_of(event_ms);
        self.cell(topic, partition, start)
            .add_timed(event_ms, bytes, seen_at_ms);
    }

    /// Counts one message without a usable event time, in the bucket of its arrival.
    #[inline]
    pub fn record_untimed(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        bytes: u64,
        seen_at_ms: i64,
        malformed: bool,
    ) {
        let start = self.width.start_of(seen_at_ms);
        self.cell(topic, partition, start)
            .add_untimed(bytes, malformed);
    }

    /// Adds every cell of `other` (which must use the same width) into `self`.
    pub fn merge(&mut self, other: Tally) {
        debug_assert_eq!(self.width, other.width);
        for ((t, partition, start), cell) in other.cells {
            self.cell(&other.names[t], partition, start).merge(&cell);
        }
    }

    /// Removes and returns every cell, sorted by topic, partition and bucket.
    pub fn drain(&mut self) -> Vec<Entry> {
        self.slots.clear();
        self.last = None;
        let names = &self.names;
        let mut out: Vec<Entry> = self
            .cells
            .drain(..)
            .map(|((t, partition, bucket_start_ms), cell)| Entry {
                topic: names[t].clone(),
                partition,
                bucket_start_ms,
                cell,
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.topic, a.partition, a.bucket_start_ms).cmp(&(
                &b.topic,
                b.partition,
                b.bucket_start_ms,
            ))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_into_buckets_and_drains() {
        let mut t = Tally::new(BucketWidth::default());
        t.record("orders", Some(0), 60_000, 10, 60_500);
        t.record("orders", Some(0), 119_999, 10, 120_000);
        t.record("orders", Some(0), 120_000, 5, 120_001);
        t.record_untimed("orders", Some(1), 7, 61_000, true);
        assert_eq!(t.len(), 3);
        let drained = t.drain();
        assert!(t.is_empty());
        assert_eq!(drained.len(), 3);
        let first = &drained[0];
        assert_eq!((first.partition, first.bucket_start_ms), (Some(0), 60_000));
        assert_eq!(first.cell.count, 2);
        assert_eq!(first.cell.bytes, 20);
        assert_eq!(first.cell.min_event_ms, Some(60_000));
        assert_eq!(first.cell.max_event_ms, Some(119_999));
        assert_eq!(first.cell.latency.len(), 2);
        let untimed = &drained[2];
        assert_eq!(
            (untimed.partition, untimed.bucket_start_ms),
            (Some(1), 60_000)
        );
        assert_eq!((untimed.cell.no_timestamp, untimed.cell.malformed), (1, 1));
        assert!(untimed.cell.latency.is_empty());
    }

    #[test]
    fn runs_and_switches_between_cells_count_into_the_right_cell() {
        let mut t = Tally::new(BucketWidth::default());
        let keys = [
            ("a", Some(0), 1_000),
            ("a", Some(0), 1_000),
            ("b", Some(0), 1_000),
            ("a", Some(0), 1_000),
            ("a", Some(1), 1_000),
            ("a", Some(1), 700_000),
            ("a", Some(0), 1_000),
        ];
        for (topic, partition, event) in keys {
            t.record(topic, partition, event, 1, event);
        }
        t.drain();
        // Cells and the remembered cell start afresh after a drain.
        for (topic, partition, event) in keys {
            t.record(topic, partition, event, 1, event);
        }
        let d = t.drain();
        let got: Vec<(&str, Option<i32>, i64, u64)> = d
            .iter()
            .map(|e| {
                (
                    e.topic.as_str(),
                    e.partition,
                    e.bucket_start_ms,
                    e.cell.count,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Some(0), 0, 4),
                ("a", Some(1), 0, 1),
                ("a", Some(1), 660_000, 1),
                ("b", Some(0), 0, 1),
            ]
        );
    }

    #[test]
    fn merge_adds_cells() {
        let mut a = Tally::new(BucketWidth::default());
        let mut b = Tally::new(BucketWidth::default());
        a.record("t", None, 1_000, 1, 2_000);
        b.record("t", None, 2_000, 2, 2_500);
        b.record("u", None, 2_000, 2, 2_500);
        a.merge(b);
        assert_eq!(a.len(), 2);
        let d = a.drain();
        assert_eq!(d[0].cell.count, 2);
        assert_eq!(d[0].cell.bytes, 3);
        assert_eq!(d[0].cell.min_event_ms, Some(1_000));
        assert_eq!(d[0].cell.max_event_ms, Some(2_000));
    }
}
