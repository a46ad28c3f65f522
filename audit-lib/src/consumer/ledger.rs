//! What an [`AuditedConsumer`](crate::AuditedConsumer) knows about each assigned partition:
//! the messages received but not yet counted, how far the application said it processed,
//! and what was committed. Pure bookkeeping, no IO: the consumer calls it on its own thread.
//!
//! A message is counted once, when the application says it was processed: explicitly
//! ([`Ledger::processed`]) or by storing or committing an offset past it ([`Ledger::store`],
//! which, in [`CountOn::Offsets`] mode, counts every message received below that offset and
//! not counted yet). In [`CountOn::Processed`] mode an offset past a message that was never
//! marked processed passes over it without counting it: the audit then shows it missing.

use std::collections::VecDeque;

use foldhash::HashMap;

use crate::record::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};

/// How the application tells that a message was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountOn {
    /// Storing or committing an offset counts every message received below it (and
    /// `processed(&msg)` counts one message ahead of that). For applications whose commits
    /// mean "everything before this is done".
    #[default]
    Offsets,
    /// Only `processed(&msg)` counts; offsets move the group's position but count nothing,
    /// so a message the application passed over without processing it is never counted. For
    /// applications that can drop or park single messages and want the audit to see it.
    Processed,
}

/// A message received and not counted yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Its offset.
    pub offset: i64,
    /// Its event time, `None` when it has none the audit contract can carry.
    pub event_ms: Option<i64>,
    /// Its payload bytes.
    pub bytes: u64,
}

impl Waiting {
    /// A message at `offset` with timestamp `timestamp_ms` (if any) and `bytes` of payload.
    pub fn new(offset: i64, timestamp_ms: Option<i64>, bytes: u64) -> Self {
        Self {
            offset,
            event_ms: timestamp_ms.filter(|t| (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(t)),
            bytes,
        }
    }
}

/// One assigned partition.
#[derive(Debug, Default, Clone)]
pub struct Partition {
    /// Received, neither counted nor passed over; in offset order.
    waiting: VecDeque<Waiting>,
    /// Next offset after the last message received.
    pub received_to: Option<i64>,
    /// Next offset the application stored or committed: committed by the next flush.
    pub stored: Option<i64>,
    /// Next offset the group has committed (by this consumer, or found at assignment).
    pub committed: Option<i64>,
    /// Lowest offset received since the partition was assigned: where it is read again from
    /// while the group has committed nothing.
    pub first_received: Option<i64>,
    /// Highest event time counted in the partition since it was assigned.
    pub counted_max_event_ms: Option<i64>,
    /// Highest watermark reported for the partition.
    pub claimed_ms: Option<i64>,
}

impl Partition {
    /// Whether every message received was counted or passed over.
    pub fn nothing_waiting(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The offset a flush commits now, if it moves the committed one.
    pub fn to_commit(&self) -> Option<i64> {
        match (self.stored, self.committed) {
            (Some(s), Some(c)) if s <= c => None,
            (s, _) => s,
        }
    }

    /// The position a progress record reports: what is committed, or about to be.
    pub fn position(&self) -> Option<i64> {
        self.stored.max(self.committed)
    }

    fn count(
        &mut self,
        topic: &str,
        partition: i32,
        w: &Waiting,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) {
        if let Some(e) = w.event_ms {
            self.counted_max_event_ms = self.counted_max_event_ms.max(Some(e));
        }
        count(topic, partition, w);
    }
}

/// Where a message's partition is found without hashing its topic name: the address of
/// librdkafka's topic handle (rdkafka's `BorrowedMessage::topic_ptr`) and the partition.
/// The address is only compared, never followed; the ledger forgets it whenever partitions
/// are assigned or revoked (and the consumer whenever its assignment changes), so an address
/// that a later topic handle reuses is never taken for the old topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    /// The topic handle's address.
    pub topic: usize,
    /// The partition.
    pub partition: i32,
}

/// One assigned partition, with its name.
#[derive(Debug)]
struct Slot {
    topic: String,
    partition: i32,
    part: Partition,
}

impl Slot {
    /// Counts the messages waiting below `next`; returns how many.
    fn count_below(&mut self, next: i64, count: &mut impl FnMut(&str, i32, &Waiting)) -> usize {
        let mut n = 0;
        while let Some(w) = self.part.waiting.front().copied() {
            if w.offset >= next {
                break;
            }
            self.part.waiting.pop_front();
            self.part.count(&self.topic, self.partition, &w, count);
            n += 1;
        }
        n
    }

    /// Stores `next` (see [`Ledger::store`]); returns how many messages it passed over.
    fn store(
        &mut self,
        next: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> u64 {
        let passed = match mode {
            CountOn::Offsets => {
                self.count_below(next, count);
                0
            }
            CountOn::Processed => {
                let before = self.part.waiting.len();
                while self.part.waiting.front().is_some_and(|w| w.offset < next) {
                    self.part.waiting.pop_front();
                }
                (before - self.part.waiting.len()) as u64
            }
        };
        self.part.stored = self.part.stored.max(Some(next));
        passed
    }

    /// The message at `offset` was processed (see [`Ledger::processed`]).
    fn processed(
        &mut self,
        offset: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        if mode == CountOn::Offsets {
            return self.count_below(offset + 1, count) > 0;
        }
        let part = &mut self.part;
        let Ok(i) = part.waiting.binary_search_by_key(&offset, |w| w.offset) else {
            return false;
        };
        let Some(w) = part.waiting.remove(i) else {
            return false;
        };
        part.count(&self.topic, self.partition, &w, count);
        true
    }
}

/// Every assigned partition of one consumer.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The partitions, in no order; `index` finds one by name.
    slots: Vec<Slot>,
    index: HashMap<String, HashMap<i32, usize>>,
    /// The handle last looked up, and its slot.
    cursor: Option<(Handle, usize)>,
    /// Messages passed over without being counted ([`CountOn::Processed`]).
    pub passed_over: u64,
    /// The slot of the last message received.
    last: Option<usize>,
}

impl Ledger {
    fn slot_of(&self, topic: &str, partition: i32) -> Option<usize> {
        self.index
            .get(topic)
            .and_then(|m| m.get(&partition))
            .copied()
    }

    /// The slot of a message's partition, if it is assigned: by its handle when it is the
    /// one looked up last (the common case: messages come in runs from one partition), else
    /// by name.
    #[inline]
    fn slot_by<'a>(&mut self, handle: Handle, topic: impl Fn() -> &'a str) -> Option<usize> {
        match self.cursor {
            Some((h, i)) if h == handle => Some(i),
            _ => self.slot_by_name(handle, topic()),
        }
    }

    #[cold]
    fn slot_by_name(&mut self, handle: Handle, topic: &str) -> Option<usize> {
        let i = self.slot_of(topic, handle.partition)?;
        self.cursor = Some((handle, i));
        Some(i)
    }

    /// The state of a partition, if it is assigned.
    pub fn get(&self, topic: &str, partition: i32) -> Option<&Partition> {
        self.slot_of(topic, partition).map(|i| &self.slots[i].part)
    }

    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Partition> {
        self.slot_of(topic, partition)
            .map(|i| &mut self.slots[i].part)
    }

    /// Forgets the handle looked up last: the consumer's assignment changed, so a topic
    /// handle may be gone and its address serve another topic.
    pub fn forget_handles(&mut self) {
        self.cursor = None;
    }

    /// A partition was assigned; `committed` is the group's committed offset, if known.
    /// Returns its slot.
    pub fn assign(&mut self, topic: &str, partition: i32, committed: Option<i64>) -> usize {
        self.cursor = None;
        match self.slot_of(topic, partition) {
            Some(i) => {
                let part = &mut self.slots[i].part;
                *part = Partition {
                    committed,
                    claimed_ms: part.claimed_ms,
                    ..Partition::default()
                };
                i
            }
            None => {
                let i = self.slots.len();
                self.slots.push(Slot {
                    topic: topic.to_owned(),
                    partition,
                    part: Partition {
                        committed,
                        ..Partition::default()
                    },
                });
                self.index
                    .entry(topic.to_owned())
                    .or_default()
                    .insert(partition, i);
                i
            }
        }
    }

    /// A partition went: what was received and not counted is left to its next owner.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<Partition> {
        let i = self.slot_of(topic, partition)?;
        self.cursor = None;
        if let Some(m) = self.index.get_mut(topic) {
            m.remove(&partition);
            if m.is_empty() {
                self.index.remove(topic);
            }
        }
        let gone = self.slots.swap_remove(i);
        // The last slot took the place of the one removed.
        if let Some(moved) = self.slots.get(i)
            && let Some(at) = self
                .index
                .get_mut(&moved.topic)
                .and_then(|m| m.get_mut(&moved.partition))
        {
            *at = i;
        }
        self.last = match self.last {
            Some(l) if l == i => None,
            Some(l) if l == self.slots.len() => Some(i),
            l => l,
        };
        Some(gone.part)
    }

    /// Every assigned partition, sorted.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = self
            .slots
            .iter()
            .map(|s| (s.topic.clone(), s.partition))
            .collect();
        v.sort();
        v
    }

    /// A message was handed to the application. Receiving an offset below what was received
    /// before (the application seeked back) forgets the waiting messages from there on.
    /// Messages of partitions not assigned (yet) are tracked from here on.
    pub fn received(&mut self, topic: &str, partition: i32, w: Waiting) {
        let i = match self.slot_of(topic, partition) {
            Some(i) => i,
            None => self.assign(topic, partition, None),
        };
        self.received_in(i, w);
    }

    /// [`Ledger::received`], the partition found by its handle (`topic` gives its name when
    /// the handle is not the one looked up last).
    #[inline]
    pub fn received_by<'a>(&mut self, handle: Handle, topic: impl Fn() -> &'a str, w: Waiting) {
        let i = match self.slot_by(handle, &topic) {
            Some(i) => i,
            None => {
                let i = self.assign(topic(), handle.partition, None);
                self.cursor = Some((handle, i));
                i
            }
        };
        self.received_in(i, w);
    }

    fn received_in(&mut self, i: usize, w: Waiting) {
        let part = &mut self.slots[i].part;
        if part.received_to.is_some_and(|r| w.offset < r) {
            while part.waiting.back().is_some_and(|b| b.offset >= w.offset) {
                part.waiting.pop_back();
            }
        }
        part.waiting.push_back(w);
        part.received_to = Some(w.offset + 1);
        part.first_received = Some(part.first_received.map_or(w.offset, |f| f.min(w.offset)));
        self.last = Some(i);
    }

    /// Stores the offset after the last message received (once): the application came back
    /// for another message, so with librdkafka's `enable.auto.offset.store` it is done with
    /// the previous one.
    #[inline]
    pub fn store_last_received(
        &mut self,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) {
        let Some(slot) = self.last.and_then(|i| self.slots.get_mut(i)) else {
            return;
        };
        if let Some(next) = slot.part.received_to
            && slot.part.stored < Some(next)
        {
            self.passed_over += slot.store(next, mode, count);
        }
    }

    /// The message at `offset` was processed: counts it (through `count`) unless it was
    /// counted or passed over already. In [`CountOn::Offsets`] mode the messages received
    /// before it are counted too (an offset past them would count them anyway).
    pub fn processed(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        self.slot_of(topic, partition)
            .is_some_and(|i| self.slots[i].processed(offset, mode, count))
    }

    /// [`Ledger::processed`], the partition found by its handle.
    #[inline]
    pub fn processed_by<'a>(
        &mut self,
        handle: Handle,
        topic: impl Fn() -> &'a str,
        offset: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        self.slot_by(handle, topic)
            .is_some_and(|i| self.slots[i].processed(offset, mode, count))
    }

    /// The application stored (or committed) `next`, the offset after the last message it
    /// processed. In [`CountOn::Offsets`] mode every message received below it is counted;
    /// in [`CountOn::Processed`] mode the ones not marked processed are passed over. Returns
    /// whether the partition is assigned.
    pub fn store(
        &mut self,
        topic: &str,
        partition: i32,
        next: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        let slot = self.slot_of(topic, partition);
        self.store_in(slot, next, mode, count)
    }

    /// [`Ledger::store`], the partition found by its handle.
    #[inline]
    pub fn store_by<'a>(
        &mut self,
        handle: Handle,
        topic: impl Fn() -> &'a str,
        next: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        let slot = self.slot_by(handle, topic);
        self.store_in(slot, next, mode, count)
    }

    fn store_in(
        &mut self,
        slot: Option<usize>,
        next: i64,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) -> bool {
        let Some(i) = slot else {
            return false;
        };
        self.passed_over += self.slots[i].store(next, mode, count);
        true
    }

    /// Stores the offset after the last message received, in every partition.
    pub fn store_all_received(
        &mut self,
        mode: CountOn,
        count: &mut impl FnMut(&str, i32, &Waiting),
    ) {
        for slot in &mut self.slots {
            if let Some(r) = slot.part.received_to {
                self.passed_over += slot.store(r, mode, count);
            }
        }
    }

    /// The offsets a flush commits: `(topic, partition, next offset)` where it moves.
    pub fn to_commit(&self) -> Vec<(String, i32, i64)> {
        let mut v: Vec<(String, i32, i64)> = self
            .slots
            .iter()
            .filter_map(|s| {
                s.part
                    .to_commit()
                    .map(|o| (s.topic.clone(), s.partition, o))
            })
            .collect();
        v.sort();
        v
    }

    /// These offsets are committed.
    pub fn committed(&mut self, offsets: &[(String, i32, i64)]) {
        for (t, p, o) in offsets {
            if let Some(part) = self.get_mut(t, *p) {
                part.committed = part.committed.max(Some(*o));
            }
        }
    }

    /// Remembers the watermark reported for a partition.
    pub fn claim(&mut self, topic: &str, partition: i32, watermark_ms: i64) {
        if let Some(part) = self.get_mut(topic, partition) {
            part.claimed_ms = part.claimed_ms.max(Some(watermark_ms));
        }
    }

    /// Forgets everything not committed (a transaction was aborted, or an assignment lost):
    /// returns where each partition must be read again from, so that its messages are
    /// processed and counted again: its committed offset, or, while the group has committed
    /// none, the first offset received since it was assigned (a partition that received
    /// nothing has nothing to read again).
    pub fn rewind(&mut self) -> Vec<(String, i32, i64)> {
        let mut v = Vec::new();
        for s in &mut self.slots {
            let part = &mut s.part;
            part.waiting.clear();
            part.stored = None;
            part.received_to = None;
            if let Some(from) = part.committed.or(part.first_received) {
                v.push((s.topic.clone(), s.partition, from));
            }
        }
        v.sort();
        v
    }
}

/// The event-time watermark of a partition at a flush, from what is known then:
///
/// - `caught_up_at`: when every message in the log at that time (epoch ms; the end offset was
///   read then) had been received and counted in this flush or before, the claim is that time;
/// - otherwise the highest event time counted in the partition (never after `now_ms`): its
///   messages are read in log order, so the ones before it were counted;
/// - never less than what was claimed before, and `MIN_TIMESTAMP_MS` when nothing is known.
pub fn decide(
    caught_up_at: Option<i64>,
    counted_max_event_ms: Option<i64>,
    claimed_ms: Option<i64>,
    now_ms: i64,
) -> i64 {
    let claim = caught_up_at
        .map(|t| t.min(now_ms))
        .max(counted_max_event_ms.map(|e| e.min(now_ms)));
    claim
        .max(claimed_ms)
        .unwrap_or(MIN_TIMESTAMP_MS)
        .clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_067_200_000;

    fn w(offset: i64) -> Waiting {
        Waiting::new(offset, Some(T + offset), 10)
    }

    fn ledger(n: i64) -> Ledger {
        let mut l = Ledger::default();
        l.assign("t", 0, Some(0));
        for o in 0..n {
            l.received("t", 0, w(o));
        }
        l
    }

    #[test]
    fn receiving_counts_nothing_storing_counts_everything_below() {
        let mut l = ledger(10);
        let mut counted = Vec::new();
        let mut count = |_: &str, _: i32, w: &Waiting| counted.push(w.offset);
        assert!(l.to_commit().is_empty());
        assert!(l.store("t", 0, 4, CountOn::Offsets, &mut count));
        assert_eq!(counted, vec![0, 1, 2, 3]);
        // Storing the same or an earlier offset again counts nothing more.
        let mut again = Vec::new();
        l.store("t", 0, 3, CountOn::Offsets, &mut |_, _, w| {
            again.push(w.offset)
        });
        assert!(again.is_empty());
        assert_eq!(l.to_commit(), vec![("t".to_owned(), 0, 4)]);
        l.committed(&l.to_commit());
        assert!(l.to_commit().is_empty());
        let part = l.get("t", 0).expect("assigned");
        assert_eq!(
            (part.position(), part.counted_max_event_ms),
            (Some(4), Some(T + 3))
        );
        assert!(!part.nothing_waiting());
    }

    #[test]
    fn processed_counts_once_and_offsets_mode_counts_the_ones_before() {
        let mut l = ledger(5);
        let mut counted = Vec::new();
        let mut count = |_: &str, _: i32, w: &Waiting| counted.push(w.offset);
        assert!(l.processed("t", 0, 2, CountOn::Offsets, &mut count));
        assert!(!l.processed("t", 0, 2, CountOn::Offsets, &mut count));
        assert!(!l.processed("t", 0, 1, CountOn::Offsets, &mut count));
        l.store("t", 0, 5, CountOn::Offsets, &mut count);
        assert_eq!(counted, vec![0, 1, 2, 3, 4]);
        assert!(l.get("t", 0).expect("assigned").nothing_waiting());
    }

    #[test]
    fn processed_mode_passes_over_what_was_not_processed() {
        let mut l = ledger(6);
        let mut counted = Vec::new();
        let mut count = |_: &str, _: i32, w: &Waiting| counted.push(w.offset);
        for o in [0, 2, 3, 5] {
            assert!(l.processed("t", 0, o, CountOn::Processed, &mut count));
        }
        assert!(!l.processed("t", 0, 3, CountOn::Processed, &mut count));
        l.store("t", 0, 6, CountOn::Processed, &mut count);
        assert_eq!(counted, vec![0, 2, 3, 5]);
        assert_eq!(l.passed_over, 2);
        assert_eq!(l.to_commit(), vec![("t".to_owned(), 0, 6)]);
    }

    #[test]
    fn seeking_back_forgets_what_follows_and_rewind_restarts_at_the_committed_offset() {
        let mut l = ledger(6);
        l.store("t", 0, 2, CountOn::Offsets, &mut |_, _, _| {});
        l.received("t", 0, w(3));
        let mut counted = Vec::new();
        l.store("t", 0, 10, CountOn::Offsets, &mut |_, _, w| {
            counted.push(w.offset)
        });
        assert_eq!(counted, vec![2, 3]);
        assert_eq!(l.rewind(), vec![("t".to_owned(), 0, 0)]);
        assert!(l.to_commit().is_empty());
    }

    #[test]
    fn rewind_without_a_committed_offset_restarts_at_the_first_offset_received() {
        let mut l = Ledger::default();
        l.assign("t", 0, None);
        l.assign("t", 1, None);
        l.received("t", 0, w(40));
        l.received("t", 0, w(41));
        // Nothing committed and nothing received in partition 1: nothing to read again.
        assert_eq!(l.rewind(), vec![("t".to_owned(), 0, 40)]);
        // Read again from 40, the same start holds until something is committed.
        l.received("t", 0, w(40));
        assert_eq!(l.rewind(), vec![("t".to_owned(), 0, 40)]);
    }

    #[test]
    fn store_all_received_and_unassigned_partitions() {
        let mut l = ledger(3);
        l.received("u", 1, w(7));
        let mut n = 0;
        l.store_all_received(CountOn::Offsets, &mut |_, _, _| n += 1);
        assert_eq!(n, 4);
        assert_eq!(
            l.to_commit(),
            vec![("t".to_owned(), 0, 3), ("u".to_owned(), 1, 8)]
        );
        assert!(l.revoke("u", 1).is_some());
        assert_eq!(l.partitions(), vec![("t".to_owned(), 0)]);
        assert!(!l.store("u", 1, 9, CountOn::Offsets, &mut |_, _, _| {}));
    }

    #[test]
    fn handles_find_partitions_until_the_assignment_changes() {
        let mut l = Ledger::default();
        l.assign("a", 0, Some(0));
        l.assign("b", 1, Some(0));
        let a = Handle {
            topic: 1,
            partition: 0,
        };
        let b = Handle {
            topic: 2,
            partition: 1,
        };
        l.received_by(a, || "a", w(0));
        l.received_by(b, || "b", w(0));
        l.received_by(b, || unreachable!("the handle looked up last"), w(1));
        // `a` goes: `b` takes its slot, and stays the partition of the last message.
        assert!(l.revoke("a", 0).is_some());
        let mut counted = Vec::new();
        l.store_last_received(CountOn::Offsets, &mut |t, p, w| {
            counted.push((t.to_owned(), p, w.offset))
        });
        assert_eq!(counted, [("b".to_owned(), 1, 0), ("b".to_owned(), 1, 1)]);
        // `a`'s address now serves another topic: found by name, never taken for `a`.
        let c = Handle {
            topic: 1,
            partition: 1,
        };
        l.received_by(c, || "b", w(2));
        assert!(l.processed_by(c, || "b", 2, CountOn::Offsets, &mut |_, _, _| {}));
        // A handle of a partition not assigned finds nothing and assigns nothing.
        assert!(!l.processed_by(a, || "a", 0, CountOn::Offsets, &mut |_, _, _| {}));
        assert!(!l.store_by(a, || "a", 1, CountOn::Offsets, &mut |_, _, _| {}));
        assert_eq!(l.partitions(), vec![("b".to_owned(), 1)]);
        assert_eq!(l.to_commit(), vec![("b".to_owned(), 1, 2)]);
    }

    #[test]
    fn untimed_and_out_of_range_timestamps() {
        assert_eq!(Waiting::new(0, None, 1).event_ms, None);
        assert_eq!(Waiting::new(0, Some(1), 1).event_ms, None);
        assert_eq!(Waiting::new(0, Some(T), 1).event_ms, Some(T));
    }

    #[test]
    fn watermark_decisions() {
        let now = T + 600_000;
        // Caught up: the time the end offsets were read.
        assert_eq!(decide(Some(now - 1_000), Some(T), None, now), now - 1_000);
        // Behind: the highest event time counted, never after now.
        assert_eq!(decide(None, Some(T), None, now), T);
        assert_eq!(decide(None, Some(now + 5_000), None, now), now);
        // Never below an earlier claim.
        assert_eq!(decide(None, Some(T), Some(T + 60_000), now), T + 60_000);
        // Nothing known.
        assert_eq!(decide(None, None, None, now), MIN_TIMESTAMP_MS);
    }
}
