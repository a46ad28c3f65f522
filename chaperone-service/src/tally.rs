//! The open cells of the consume loop: what was counted per (topic, partition, event-time
//! bucket) since the last flush, and an estimate of the memory they take.
//!
//! Any producer can write any CreateTime from 2000 to 2200, so the number of cells between
//! two flushes is set by the producers, not by the service. Two things keep it bounded:
//!
//! - each cell is small until it has seen many messages: its latency starts sparse
//!   ([`crate::latency`]), about 120 bytes a cell instead of the 24 KiB of a full histogram;
//! - the tally keeps [`Tally::estimated_bytes`] up to date, and the consume loop commits the
//!   open cells early once it reaches `open_cells_max_bytes` (see [`crate::pipeline`]).
//!
//! Draining turns each cell into a [`chaperone_audit::Entry`] one at a time
//! ([`Entry::into_audit`]), so at most one full histogram per sparse cell exists at once.

// Topic names and partition numbers come from the audited cluster, and bucket starts are
// multiples of the bucket width, so a fast non-cryptographic hash is safe here; it is on the
// per-message path.
use foldhash::HashMap;

use chaperone_audit::BucketWidth;

use crate::latency::CellLatency;

/// What was counted in one (topic, partition, bucket).
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
    pub latency: CellLatency,
}

impl Cell {
    /// Adds one message with a known event time. Returns the heap bytes the cell grew by.
    #[inline]
    fn add_timed(&mut self, event_ms: i64, bytes: u64, seen_at_ms: i64) -> usize {
        self.count += 1;
        self.bytes += bytes;
        self.min_event_ms = Some(self.min_event_ms.map_or(event_ms, |m| m.min(event_ms)));
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        self.latency.record(seen_at_ms.saturating_sub(event_ms))
    }

    /// Adds one message without a usable event time.
    #[inline]
    fn add_untimed(&mut self, bytes: u64, malformed: bool) {
        self.count += 1;
        self.bytes += bytes;
        self.no_timestamp += 1;
        if malformed {
            self.malformed += 1;
        }
    }
}

/// One drained cell with its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Physical topic the messages were read from.
    pub topic: String,
    /// Partition, when known.
    pub partition: Option<i32>,
    /// Start of the event-time bucket.
    pub bucket_start_ms: i64,
    /// What was counted.
    pub cell: Cell,
}

impl Entry {
    /// The entry with its latency as a full histogram, ready to become a counts record.
    pub fn into_audit(self) -> chaperone_audit::Entry {
        let c = self.cell;
        chaperone_audit::Entry {
            topic: self.topic,
            partition: self.partition,
            bucket_start_ms: self.bucket_start_ms,
            cell: chaperone_audit::Cell {
                count: c.count,
                bytes: c.bytes,
                no_timestamp: c.no_timestamp,
                malformed: c.malformed,
                min_event_ms: c.min_event_ms,
                max_event_ms: c.max_event_ms,
                latency: c.latency.into_latency(),
            },
        }
    }
}

/// (topic index, partition, bucket start).
type Slot = (usize, Option<i32>, i64);

/// Bytes reckoned for each open cell besides its latency's heap: the cell and its hash slot,
/// twice over for the spare capacity of a growing `Vec` and hash table, plus the counts
/// record (about 500 bytes encoded) it becomes in the batch being committed.
pub const CELL_BYTES: usize =
    2 * (size_of::<(Slot, Cell)>() + size_of::<(Slot, usize)>() + 1) + RECORD_BYTES;

/// An encoded counts record with a sparse latency, rounded up.
const RECORD_BYTES: usize = 512;

/// Cells keyed by (topic, partition, bucket start), with their estimated memory.
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
    slots: HashMap<Slot, usize>,
    cells: Vec<(Slot, Cell)>,
    last: Option<(Slot, usize)>,
    /// [`CELL_BYTES`] per cell plus the heap of every latency.
    bytes: usize,
}

impl Tally {
    /// An empty tally counting into buckets of `width`.
    pub fn new(width: BucketWidth) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// Number of open cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell is open.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Estimated memory of the open cells and of the records they will become, in bytes.
    pub fn estimated_bytes(&self) -> usize {
        self.bytes
    }

    /// The cell for (topic, partition, bucket), created when missing. Looks the topic up by
    /// `&str`, so no allocation happens once the topic is known.
    #[inline]
    fn cell(&mut self, topic: &str, partition: Option<i32>, bucket_start_ms: i64) -> &mut Cell {
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
        let bytes = &mut self.bytes;
        let i = *self.slots.entry(slot).or_insert_with(|| {
            cells.push((slot, Cell::default()));
            *bytes += CELL_BYTES;
            cells.len() - 1
        });
        self.last = Some((slot, i));
        &mut self.cells[i].1
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
        let grew = self
            .cell(topic, partition, start)
            .add_timed(event_ms, bytes, seen_at_ms);
        self.bytes += grew;
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

    /// Removes and returns every cell, sorted by topic, partition and bucket. The capacity
    /// kept for the next flush is what this one used, so a burst of cells is given back to
    /// the allocator one flush later.
    pub fn drain(&mut self) -> Vec<Entry> {
        let n = self.cells.len();
        self.slots.clear();
        self.slots.shrink_to(n);
        self.last = None;
        self.bytes = 0;
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
        self.cells.shrink_to(n);
        out.sort_unstable_by(|a, b| {
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
    use crate::latency::{SPARSE_MAX_BINS, dense_bytes};

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
        assert_eq!(t.estimated_bytes(), 0);
        assert_eq!(drained.len(), 3);
        let first = drained[0].clone().into_audit();
        assert_eq!((first.partition, first.bucket_start_ms), (Some(0), 60_000));
        assert_eq!(first.cell.count, 2);
        assert_eq!(first.cell.bytes, 20);
        assert_eq!(first.cell.min_event_ms, Some(60_000));
        assert_eq!(first.cell.max_event_ms, Some(119_999));
        assert_eq!(first.cell.latency.len(), 2);
        let untimed = drained[2].clone().into_audit();
        assert_eq!(
            (untimed.partition, untimed.bucket_start_ms),
            (Some(1), 60_000)
        );
        assert_eq!((untimed.cell.no_timestamp, untimed.cell.malformed), (1, 1));
        assert!(untimed.cell.latency.is_empty());
    }

    /// The service's tally drains to exactly what audit-lib's tally (one full histogram per
    /// cell, what the service used before) drains to, for the same messages.
    #[test]
    fn drains_what_audit_libs_tally_drains() {
        use rand::Rng as _;
        let mut rng = rand::rng();
        let mut ours = Tally::new(BucketWidth::default());
        let mut theirs = chaperone_audit::Tally::new(BucketWidth::default());
        let now = 1_800_000_000_000i64;
        for i in 0..20_000u64 {
            let topic = ["a", "b"][(i % 2) as usize];
            let partition = Some(rng.random_range(0..3));
            let bytes = rng.random_range(0..100);
            if i % 97 == 0 {
                ours.record_untimed(topic, partition, bytes, now, i % 2 == 0);
                theirs.record_untimed(topic, partition, bytes, now, i % 2 == 0);
                continue;
            }
            // A few busy buckets near now and a spray over two centuries.
            let event = if rng.random_bool(0.5) {
                now - rng.random_range(-5_000..600_000)
            } else {
                rng.random_range(946_684_800_000..7_258_118_400_000)
            };
            ours.record(topic, partition, event, bytes, now);
            theirs.record(topic, partition, event, bytes, now);
        }
        assert_eq!(ours.len(), theirs.len());
        let got: Vec<chaperone_audit::Entry> =
            ours.drain().into_iter().map(Entry::into_audit).collect();
        let want = theirs.drain();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
            assert_eq!(g.cell.latency.to_bytes(), w.cell.latency.to_bytes());
        }
    }

    #[test]
    fn estimate_grows_per_cell_and_per_dense_histogram() {
        let mut t = Tally::new(BucketWidth::default());
        for b in 0..10i64 {
            t.record("t", Some(0), b * 60_000, 1, b * 60_000 + 5);
        }
        let sparse = t.estimated_bytes();
        assert!(sparse >= 10 * CELL_BYTES, "{sparse}");
        assert!(sparse < 10 * (CELL_BYTES + 64), "{sparse}");
        // One cell turns dense.
        for v in 0..=SPARSE_MAX_BINS as i64 {
            t.record("t", Some(0), 0, 1, v);
        }
        assert!(t.estimated_bytes() >= sparse + dense_bytes());
        // Untimed messages and messages into a cell's existing bins add nothing.
        let before = t.estimated_bytes();
        t.record_untimed("t", Some(0), 1, 0, false);
        t.record("t", Some(0), 0, 1, 3);
        assert_eq!(t.estimated_bytes(), before);
        t.drain();
        assert_eq!(t.estimated_bytes(), 0);
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
}
