//! The concurrent in-memory counter behind every audited producer.
//!
//! A [`Tracker`] keeps a fixed number of shards, each a mutex over its own cells; a thread
//! uses the same shard (picked round-robin on its first call) unless another thread holds
//! it, in which case it takes the next free one, so no thread waits on a lock while a shard
//! is free and there is no global lock on the hot path. Each shard remembers the cell it used last, so the common case (acknowledgements
//! arrive batch by batch, one partition at a time) costs one uncontended lock, three
//! comparisons and the cell update. [`Tracker::drain`] empties every shard and merges the
//! cells through a [`Tally`] into sorted [`Entry`] values.
//!
//! Memory is bounded: the number of open cells over all shards is capped, and a message that
//! would open a cell beyond the cap is not counted but added to an overflow counter that
//! [`Tracker::drain`] reports.

use std::cell::Cell as StdCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use crate::bucket::BucketWidth;
use crate::tally::{Cell, Entry, Tally};

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_INDEX: StdCell<usize> = const { StdCell::new(usize::MAX) };
}

/// A small per-thread number, assigned round-robin on first use; used to pick shards.
#[inline]
pub(crate) fn thread_index() -> usize {
    THREAD_INDEX.with(|c| {
        let i = c.get();
        if i != usize::MAX {
            i
        } else {
            let i = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            c.set(i);
            i
        }
    })
}

/// Locks this thread's shard or, when another thread holds it (two threads whose numbers
/// collide, or a drain), the next free one: a thread never waits while a shard is free.
#[inline]
pub(crate) fn lock_free_shard<'a, S, T>(
    shards: &'a [S],
    mask: usize,
    mutex: impl Fn(&'a S) -> &'a Mutex<T>,
) -> MutexGuard<'a, T> {
    let home = thread_index();
    for k in 0..shards.len() {
        match mutex(&shards[(home + k) & mask]).try_lock() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
    }
    mutex(&shards[home & mask])
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// What [`Tracker::drain`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Drained {
    /// Every cell counted since the previous drain, sorted by topic, partition and bucket.
    pub entries: Vec<Entry>,
    /// Messages not counted since the previous drain because the open-cell cap was reached.
    pub overflowed: u64,
}

impl Drained {
    /// Messages counted in `entries`.
    pub fn messages(&self) -> u64 {
        self.entries.iter().map(|e| e.cell.count).sum()
    }
}

#[derive(Debug)]
struct Slot {
    topic: Box<str>,
    partition: Option<i32>,
    start: i64,
    end: i64,
    cell: Cell,
}

/// Slot positions of one topic's cells, by (partition, bucket start).
type SlotIndex = HashMap<(Option<i32>, i64), usize>;

#[derive(Debug, Default)]
struct Cells {
    slots: Vec<Slot>,
    index: HashMap<Box<str>, SlotIndex>,
    last: usize,
}

/// One shard on its own cache lines, so neighbouring shards do not false-share.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<Cells>);

/// Concurrent counter of messages per (topic, partition, event-time bucket).
#[derive(Debug)]
pub struct Tracker {
    width: BucketWidth,
    shards: Box<[Shard]>,
    mask: usize,
    max_open_cells: usize,
    open: AtomicUsize,
    overflowed: AtomicU64,
}

impl Tracker {
    /// A tracker with buckets of `width`, at most `max_open_cells` cells open between two
    /// drains, and a shard count suited to this machine (four times the available
    /// parallelism, at least 8, rounded up to a power of two).
    pub fn new(width: BucketWidth, max_open_cells: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards(width, max_open_cells, (cpus * 4).max(8))
    }

    /// Like [`Tracker::new`] with an explicit shard count (rounded up to a power of two).
    pub fn with_shards(width: BucketWidth, max_open_cells: usize, shards: usize) -> Self {
        let n = shards.clamp(4, 1 << 12).next_power_of_two();
        let shards = (0..n)
            .map(|_| {
                Shard(Mutex::new(Cells {
                    last: usize::MAX,
                    ..Cells::default()
                }))
            })
            .collect();
        Self {
            width,
            shards,
            mask: n - 1,
            max_open_cells: max_open_cells.max(1),
            open: AtomicUsize::new(0),
            overflowed: AtomicU64::new(0),
        }
    }

    /// The bucket width.
    pub fn width(&self) -> BucketWidth {
        self.width
    }

    /// Cells open right now, over all shards.
    pub fn open_cells(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    #[inline]
    fn shard(&self) -> MutexGuard<'_, Cells> {
        lock_free_shard(&self.shards, self.mask, |s| &s.0)
    }

    /// Counts one message with a known event time: `bytes` of payload, seen (acknowledged)
    /// at `seen_at_ms`. Latency is `seen_at_ms - event_ms`.
    #[inline]
    pub fn record(
        &self,
        topic: &str,
        partition: Option<i32>,
        event_ms: i64,
        bytes: u64,
        seen_at_ms: i64,
    ) {
        let mut cells = self.shard();
        let last = cells.last;
        if let Some(slot) = cells.slots.get_mut(last)
            && slot.partition == partition
            && event_ms >= slot.start
            && event_ms < slot.end
            && &*slot.topic == topic
        {
            slot.cell.add_timed(event_ms, bytes, seen_at_ms);
            return;
        }
        let start = self.width.start_of(event_ms);
        if let Some(cell) = self.slow_cell(&mut cells, topic, partition, start) {
            cell.add_timed(event_ms, bytes, seen_at_ms);
        }
    }

    /// Counts one message without a usable event time in the bucket of `seen_at_ms`;
    /// `malformed` when its payload could not be parsed.
    pub fn record_untimed(
        &self,
        topic: &str,
        partition: Option<i32>,
        bytes: u64,
        seen_at_ms: i64,
        malformed: bool,
    ) {
        let mut cells = self.shard();
        let start = self.width.start_of(seen_at_ms);
        if let Some(cell) = self.slow_cell(&mut cells, topic, partition, start) {
            cell.add_untimed(bytes, malformed);
        }
    }

    /// Finds or opens the cell for a key that missed the last-used cache.
    #[cold]
    fn slow_cell<'c>(
        &self,
        cells: &'c mut Cells,
        topic: &str,
        partition: Option<i32>,
        start: i64,
    ) -> Option<&'c mut Cell> {
        let found = cells
            .index
            .get(topic)
            .and_then(|m| m.get(&(partition, start)))
            .copied();
        let i = match found {
            Some(i) => i,
            None => {
                if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_open_cells {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    self.overflowed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                let i = cells.slots.len();
                cells.slots.push(Slot {
                    topic: topic.into(),
                    partition,
                    start,
                    end: self.width.end_of(start),
                    cell: Cell::default(),
                });
                if !cells.index.contains_key(topic) {
                    cells.index.insert(topic.into(), HashMap::new());
                }
                if let Some(m) = cells.index.get_mut(topic) {
                    m.insert((partition, start), i);
                }
                i
            }
        };
        cells.last = i;
        cells.slots.get_mut(i).map(|s| &mut s.cell)
    }

    /// Removes every cell from every shard and returns them merged and sorted, with the
    /// number of messages lost to the open-cell cap since the previous drain.
    pub fn drain(&self) -> Drained {
        let mut tally = Tally::new(self.width);
        for shard in self.shards.iter() {
            let slots = {
                let mut cells = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
                cells.index.clear();
                cells.last = usize::MAX;
                std::mem::take(&mut cells.slots)
            };
            self.open.fetch_sub(slots.len(), Ordering::Relaxed);
            for slot in slots {
                if tally.contains(&slot.topic, slot.partition, slot.start) {
                    tally
                        .cell(&slot.topic, slot.partition, slot.start)
                        .merge(&slot.cell);
                } else {
                    *tally.cell(&slot.topic, slot.partition, slot.start) = slot.cell;
                }
            }
        }
        Drained {
            entries: tally.drain(),
            overflowed: self.overflowed.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn width() -> BucketWidth {
        BucketWidth::default()
    }

    #[test]
    fn counts_into_cells_and_drains_sorted() {
        let t = Tracker::new(width(), 100);
        t.record("b", Some(1), 60_000, 10, 60_100);
        t.record("a", Some(0), 61_000, 5, 61_050);
        t.record("a", Some(0), 119_999, 5, 120_000);
        t.record("a", Some(0), 120_000, 1, 120_000);
        t.record_untimed("a", None, 3, 125_000, true);
        assert_eq!(t.open_cells(), 4);
        let d = t.drain();
        assert_eq!(t.open_cells(), 0);
        assert_eq!(d.overflowed, 0);
        assert_eq!(d.messages(), 5);
        let keys: Vec<_> = d
            .entries
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
            keys,
            vec![
                ("a", None, 120_000, 1),
                ("a", Some(0), 60_000, 2),
                ("a", Some(0), 120_000, 1),
                ("b", Some(1), 60_000, 1),
            ]
        );
        let a0 = &d.entries[1].cell;
        assert_eq!(
            (a0.bytes, a0.min_event_ms, a0.max_event_ms),
            (10, Some(61_000), Some(119_999))
        );
        assert_eq!(a0.latency.len(), 2);
        assert_eq!(d.entries[0].cell.malformed, 1);
        assert!(t.drain().entries.is_empty());
    }

    #[test]
    fn cap_turns_new_cells_into_overflow() {
        let t = Tracker::with_shards(width(), 2, 4);
        t.record("t", Some(0), 0, 1, 0);
        t.record("t", Some(1), 0, 1, 0);
        t.record("t", Some(2), 0, 1, 0);
        t.record("t", Some(2), 0, 1, 0);
        // Existing cells keep counting.
        t.record("t", Some(0), 1, 1, 1);
        assert_eq!(t.open_cells(), 2);
        let d = t.drain();
        assert_eq!(d.overflowed, 2);
        assert_eq!(d.messages(), 3);
        // The cap is per flush: after a drain, cells can open again.
        t.record("t", Some(2), 0, 1, 0);
        let d = t.drain();
        assert_eq!((d.messages(), d.overflowed), (1, 0));
    }

    #[test]
    fn threads_sum_exactly() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 50_000;
        let t = Arc::new(Tracker::with_shards(width(), 10_000, 4));
        let handles: Vec<_> = (0..THREADS)
            .map(|n| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let partition = (i % 4) as i32;
                        let event = ((i % 3) * 60_000 + n) as i64;
                        t.record("orders", Some(partition), event, 2, event + 5);
                    }
                })
            })
            .collect();
        // Drain concurrently while threads count: nothing may be lost or doubled.
        let mut total = Tally::new(width());
        let mut merge = |d: Drained| {
            assert_eq!(d.overflowed, 0);
            for e in d.entries {
                total
                    .cell(&e.topic, e.partition, e.bucket_start_ms)
                    .merge(&e.cell);
            }
        };
        for _ in 0..20 {
            merge(t.drain());
            std::thread::yield_now();
        }
        for h in handles {
            h.join().expect("thread finished");
        }
        merge(t.drain());
        let entries = total.drain();
        assert_eq!(entries.len(), 12);
        let sum: u64 = entries.iter().map(|e| e.cell.count).sum();
        assert_eq!(sum, THREADS * PER_THREAD);
        let bytes: u64 = entries.iter().map(|e| e.cell.bytes).sum();
        assert_eq!(bytes, 2 * THREADS * PER_THREAD);
        let latencies: u64 = entries.iter().map(|e| e.cell.latency.len()).sum();
        assert_eq!(latencies, THREADS * PER_THREAD);
        for e in &entries {
            // Each (partition, bucket) key gets an equal share of every thread's messages.
            let expected: u64 = (0..PER_THREAD)
                .filter(|i| {
                    Some((i % 4) as i32) == e.partition
                        && ((i % 3) * 60_000) as i64 == e.bucket_start_ms
                })
                .count() as u64
                * THREADS;
            assert_eq!(
                e.cell.count, expected,
                "{:?} {}",
                e.partition, e.bucket_start_ms
            );
            assert_eq!(e.cell.latency.max(), Some(5));
        }
    }
}
