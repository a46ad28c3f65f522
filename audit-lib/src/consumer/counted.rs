//! What an [`AuditedConsumer`](crate::AuditedConsumer) counted since its last flush. It is
//! kept under the ledger's lock, so counting a message takes no lock of its own (the
//! producer's [`Tracker`](crate::tracker::Tracker) is shared by many threads; a consumer
//! counts where it keeps its ledger).

use crate::bucket::BucketWidth;
use crate::consumer::ledger::Waiting;
use crate::tally::Tally;
use crate::tracker::Drained;

/// Counts per (topic, partition, bucket), at most `max_open_cells` cells between two
/// flushes: a message that would open one more is not counted, and the next drain says how
/// many there were (a consumer fed garbage timestamps must not run out of memory).
#[derive(Debug)]
pub struct Counted {
    tally: Tally,
    /// The bucket of the last message counted, `[start, end)`: most messages fall in it, and
    /// finding theirs then takes no division.
    last_bucket: (i64, i64),
    max_open_cells: usize,
    overflowed: u64,
    /// Messages counted since the consumer started (not reset by a drain).
    pub total: u64,
}

impl Counted {
    /// Nothing counted yet, buckets of `width`, at most `max_open_cells` cells.
    pub fn new(width: BucketWidth, max_open_cells: usize) -> Self {
        Self {
            tally: Tally::new(width),
            last_bucket: (0, 0),
            max_open_cells: max_open_cells.max(1),
            overflowed: 0,
            total: 0,
        }
    }

    /// Counts `w`, received from `topic` and `partition` and processed at `now_ms`: in the
    /// bucket of its event time, else (untimed) of `now_ms`.
    #[inline]
    pub fn add(&mut self, topic: &str, partition: i32, w: &Waiting, now_ms: i64) {
        let t = w.event_ms.unwrap_or(now_ms);
        let start = match self.last_bucket {
            (start, end) if start <= t && t < end => start,
            _ => {
                let width = self.tally.width();
                let start = width.start_of(t);
                self.last_bucket = (start, width.end_of(start));
                start
            }
        };
        match self
            .tally
            .cell_within(topic, Some(partition), start, self.max_open_cells)
        {
            Some(cell) => {
                match w.event_ms {
                    Some(e) => cell.add_timed(e, w.bytes, now_ms),
                    None => cell.add_untimed(w.bytes, false),
                }
                self.total += 1;
            }
            None => self.overflowed += 1,
        }
    }

    /// [`Counted::add`] at `now_ms`, in the shape the ledger calls.
    #[inline]
    pub fn at(&mut self, now_ms: i64) -> impl FnMut(&str, i32, &Waiting) + '_ {
        move |topic, partition, w| self.add(topic, partition, w, now_ms)
    }

    /// Takes everything counted since the last drain, sorted, with the number of messages
    /// left uncounted by the cap.
    pub fn drain(&mut self) -> Drained {
        Drained {
            entries: self.tally.drain(),
            overflowed: std::mem::take(&mut self.overflowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_067_200_000;

    #[test]
    fn counts_by_bucket_and_caps_the_open_cells() {
        let width = BucketWidth::from_millis(600_000).expect("ten minutes");
        let mut c = Counted::new(width, 2);
        let minute = Waiting::new(0, Some(T + 60_000), 10);
        c.add("t", 0, &minute, T + 61_000);
        c.add("t", 0, &Waiting::new(1, Some(T + 120_000), 10), T + 121_000);
        // Untimed: the bucket of the time it was processed.
        c.add("t", 1, &Waiting::new(2, None, 5), T + 1_000);
        // A third cell would pass the cap; the open ones still count.
        c.add("t", 2, &minute, T + 61_000);
        c.add("t", 1, &Waiting::new(3, None, 5), T + 2_000);
        assert_eq!(c.total, 4);
        let d = c.drain();
        assert_eq!(d.overflowed, 1);
        assert_eq!(
            d.entries
                .iter()
                .map(|e| (
                    e.partition,
                    e.bucket_start_ms,
                    e.cell.count,
                    e.cell.no_timestamp
                ))
                .collect::<Vec<_>>(),
            vec![(Some(0), T, 2, 0), (Some(1), T, 2, 2)]
        );
        assert_eq!(d.entries[0].cell.latency.len(), 2);
        // A drain empties the cells and the overflow count, not the total.
        let d = c.drain();
        assert!(d.entries.is_empty() && d.overflowed == 0);
        // Back and forth across a bucket edge: each message in its own bucket.
        c.add("t", 2, &minute, T + 61_000);
        c.add("t", 2, &Waiting::new(4, Some(T - 1), 10), T + 61_000);
        c.add("t", 2, &Waiting::new(5, Some(T), 10), T + 61_000);
        assert_eq!(c.total, 7);
        assert_eq!(
            c.drain()
                .entries
                .iter()
                .map(|e| (e.bucket_start_ms, e.cell.count))
                .collect::<Vec<_>>(),
            vec![(T - 600_000, 1), (T, 2)]
        );
    }
}
