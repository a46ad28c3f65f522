//! The judgement itself: a pure function of counts, progress marks and the time, so that the
//! rules can be read (and tested) without a database.

use std::collections::{BTreeMap, BTreeSet};

use chaperone_audit::record::MIN_TIMESTAMP_MS;
use serde::{Deserialize, Serialize};

mod bucket;

pub(crate) use bucket::{Computed, Findings, SourcesPassed, Times, VerdictKey, judge_bucket};

pub use crate::model::{UnknownStatus, VerdictStatus};
pub use crate::store::evidence::Mark;

/// Why a bucket was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finality {
    /// Both tiers proved they passed the bucket (see [`evaluate`]).
    Progress,
    /// The maximum wait after the bucket end passed.
    MaxWait,
    /// A lag lasted `loss_after`: what never arrived is called lost.
    LossAfter,
}

impl Finality {
    /// The reason as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Finality::Progress => "progress",
            Finality::MaxWait => "max_wait",
            Finality::LossAfter => "loss_after",
        }
    }
}

/// Which side of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The upstream (`from`) tier.
    Upstream,
    /// The downstream (`to`) tier.
    Downstream,
}

/// The timing rules, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How far past a bucket end a watermark must be.
    pub lateness_ms: i64,
    /// Longest wait after a bucket end before judging anyway.
    pub max_wait_ms: i64,
    /// A lag this long after a bucket end is called loss.
    pub loss_after_ms: i64,
}

/// What is known of one edge, scope and bucket.
#[derive(Debug, Clone, Copy)]
pub struct EdgeBucket<'a> {
    /// Bucket end (exclusive), epoch ms.
    pub end_ms: i64,
    /// When the bucket entered the queue (its first counts arrived), epoch ms.
    pub queued_ms: i64,
    /// The reconciler's clock, epoch ms.
    pub now_ms: i64,
    /// Progress rows of the upstream tier in scope.
    pub upstream: &'a [Mark],
    /// Progress rows of the downstream tier in scope.
    pub downstream: &'a [Mark],
    /// Upstream counts by partition (-1: partition unknown).
    pub expected: &'a BTreeMap<i32, i64>,
    /// Downstream counts by partition (-1: partition unknown).
    pub actual: &'a BTreeMap<i32, i64>,
    /// How far the topic's producers' event times trail their clocks ([`event_lag_ms`]).
    pub event_lag_ms: i64,
    /// When the reconciler first saw every live producer instance pass the bucket
    /// ([`sources_passed`]), on its clock, epoch ms: `i64::MAX` while they have not, `None`
    /// when there is no live producer instance to wait for.
    pub sources_passed_ms: Option<i64>,
    /// Partitions of the upstream tier whose counts of the bucket the edge into that tier
    /// proved complete ([`proven_downstream`]): they count as passed whatever the upstream's
    /// own marks say (the reader of a mirror, whose watermark stays an event time once the
    /// stream stops).
    pub upstream_proven: &'a BTreeSet<i32>,
}

/// How far a tier got, for one bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierState {
    /// Every observer the tier waits for proved it passed the bucket.
    pub passed: bool,
    /// The tier has observers that still report (or shut down cleanly).
    pub live: bool,
    /// Observers that stopped reporting without a clean shutdown before passing the bucket
    /// (only instance observers: a consumer partition is never given up on).
    pub stale: Vec<String>,
    /// Lowest watermark among the live observers that have not passed.
    pub behind_ms: Option<i64>,
    /// The live observers that have not passed the bucket: `host/instance`, or
    /// `host/instance partition N` for a consumer partition (the furthest owner), or
    /// `partition N` for a partition with counts and no progress at all.
    pub waiting_on: Vec<String>,
    /// The tier is a consumer group counting at-least-once (its progress says so): a
    /// surplus is messages it processed again, not duplicates in the pipeline.
    pub redelivers: bool,
}

impl TierState {
    /// The state of a tier made of parts that each must pass (the datacenters of an edge
    /// summed over datacenters): passed when every part passed, live when every part that
    /// has not passed is live, with every part's stale and waiting observers.
    fn all_of(parts: impl IntoIterator<Item = TierState>) -> TierState {
        let mut all = TierState {
            passed: true,
            live: true,
            ..TierState::default()
        };
        for t in parts {
            all.passed &= t.passed;
            all.live &= t.live || t.passed;
            all.redelivers |= t.redelivers;
            all.stale.extend(t.stale);
            all.waiting_on.extend(t.waiting_on);
            all.behind_ms = match (all.behind_ms, t.behind_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        all
    }
}

/// The judgement of one edge, scope and bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Why now.
    pub finality: Finality,
    /// Whether the judgement stands (the bucket leaves the queue). A `lagging` bucket stays
    /// queued and is judged again on every pass.
    pub settled: bool,
    /// Upstream progress.
    pub upstream: TierState,
    /// Downstream progress.
    pub downstream: TierState,
}

/// The largest `last_emitted - watermark` over the live instance observers (producers):
/// how far behind their own clock the event times of a topic's producers run (clock skew,
/// backfills), plus at most one flush interval and bucket. A consumer tier whose watermark is
/// a time on its clock (it read everything written up to then) proves it read a bucket only
/// once that time is this much later.
pub fn event_lag_ms(marks: &[Mark]) -> i64 {
    marks
        .iter()
        .filter(|m| !m.consumer && !m.stale)
        .map(|m| m.last_emitted_ms.saturating_sub(m.watermark_ms).max(0))
        .max()
        .unwrap_or(0)
}

/// Whether every live instance observer (producer) has a watermark at or past `due`, its
/// lowest over its partitions: `None` when there is none to wait for (no audited producer,
/// or only stale ones). One that shut down cleanly sent every count: it counts as passed.
///
/// An instance passes a bucket only once every message it sent with an event time in it
/// was acknowledged, so by the time the reconciler sees it pass, every such message is in
/// the log. A message can reach the log long after its event time (a producer stalled, a
/// request retried), behind later messages of other producers: a consumer tier proves it
/// read the bucket only with a mark at or past that time (see [`evaluate`]).
pub fn sources_passed(marks: &[Mark], due: i64) -> Option<bool> {
    let mut lowest: BTreeMap<&str, (i64, bool)> = BTreeMap::new();
    for m in marks.iter().filter(|m| !m.consumer && !m.stale) {
        let e = lowest
            .entry(m.observer.as_str())
            .or_insert((m.watermark_ms, true));
        e.0 = e.0.min(m.watermark_ms);
        e.1 &= m.closing;
    }
    (!lowest.is_empty()).then(|| lowest.values().all(|&(w, closing)| closing || w >= due))
}

/// How far a tier got past `due` (instances) and `consumer_due` (consumer partitions).
/// `partition_done` says, for a consumer partition that has not passed, whether other
/// evidence makes it final anyway; `partitions` lists partitions that must be final even
/// without a progress row of their own.
fn tier_state(
    marks: &[Mark],
    due: i64,
    consumer_due: i64,
    partitions: &BTreeSet<i32>,
    partition_done: impl Fn(i32) -> bool,
) -> TierState {
    let mut state = TierState {
        passed: true,
        ..TierState::default()
    };
    let behind = |w: i64, who: String, state: &mut TierState| {
        state.passed = false;
        state.behind_ms = Some(state.behind_ms.map_or(w, |b: i64| b.min(w)));
        state.waiting_on.push(who);
    };
    // Instances: each on its own, the lowest mark over its partitions.
    let mut instances: BTreeMap<&str, (i64, bool, bool)> = BTreeMap::new();
    for m in marks.iter().filter(|m| !m.consumer) {
        let e = instances
            .entry(m.observer.as_str())
            .or_insert((m.watermark_ms, true, true));
        e.0 = e.0.min(m.watermark_ms);
        e.1 &= m.closing;
        e.2 &= m.stale;
    }
    for (observer, (watermark, closing, stale)) in instances {
        if closing {
            state.live = true;
        } else if stale {
            if watermark < due {
                state.stale.push(observer.to_owned());
            }
        } else {
            state.live = true;
            if watermark < due {
                behind(watermark, observer.to_owned(), &mut state);
            }
        }
    }
    state.redelivers = marks.iter().any(|m| m.consumer && m.at_least_once);
    // Consumer partitions: the furthest mark of any owner.
    let mut owned: BTreeMap<i32, (i64, &str, bool)> = BTreeMap::new();
    for m in marks.iter().filter(|m| m.consumer) {
        let e = owned
            .entry(m.partition)
            .or_insert((m.watermark_ms, m.observer.as_str(), true));
        if m.watermark_ms > e.0 {
            (e.0, e.1) = (m.watermark_ms, m.observer.as_str());
        }
        e.2 &= m.stale;
    }
    for (&p, &(watermark, observer, stale)) in &owned {
        state.live |= !stale;
        if watermark < consumer_due && !partition_done(p) {
            behind(watermark, format!("{observer} partition {p}"), &mut state);
        }
    }
    for &p in partitions {
        if !owned.contains_key(&p) && !partition_done(p) {
            state.passed = false;
            state.waiting_on.push(format!("partition {p}"));
        }
    }
    if owned.is_empty()
        && !state.live
        && !(if partitions.is_empty() {
            partition_done(-1)
        } else {
            partitions.iter().all(|&p| partition_done(p))
        })
    {
        // No consumer partition and no live instance: nobody proved anything, unless every
        // partition (or the topic, without partitions) counted exactly what the upstream
        // counted.
        state.passed = false;
    }
    state
}

/// The sum of `counts`, wide enough never to overflow.
fn total(counts: &BTreeMap<i32, i64>) -> i128 {
    counts.values().map(|&n| i128::from(n)).sum()
}

/// Whether a side counted messages without knowing their partition (partition -1).
fn counted_without_partitions(counts: &BTreeMap<i32, i64>) -> bool {
    counts.get(&-1).is_some_and(|&n| n != 0)
}

/// Whether the counts of `p` are known to be equal on both sides.
fn equal_at(expected: &BTreeMap<i32, i64>, actual: &BTreeMap<i32, i64>, p: i32) -> bool {
    if counted_without_partitions(expected) || counted_without_partitions(actual) {
        // A side counted without partitions: only the whole topic can be compared.
        total(expected) == total(actual)
    } else {
        expected.get(&p).copied().unwrap_or(0) == actual.get(&p).copied().unwrap_or(0)
    }
}

/// The marks a bucket is due at, `end + lateness` for instances and, for consumer partitions,
/// that plus the producers' event lag and no earlier than they passed it (see [`evaluate`]),
/// and how far the upstream tier got.
fn upstream_state(rules: &Rules, b: &EdgeBucket<'_>) -> (i64, i64, TierState) {
    let due = b.end_ms.saturating_add(rules.lateness_ms);
    let consumer_due = due
        .saturating_add(b.event_lag_ms)
        .max(b.sources_passed_ms.unwrap_or(i64::MIN));
    let upstream = tier_state(b.upstream, due, consumer_due, &BTreeSet::new(), |p| {
        b.upstream_proven.contains(&p)
    });
    (due, consumer_due, upstream)
}

/// Decides whether one edge, scope and bucket can be judged now; `None` while it must wait.
///
/// * The upstream tier passed the bucket when every live instance observer has a watermark
///   at or past `end + lateness` (an instance that shut down cleanly is not waited for; one
///   silent for `instance_timeout` is not waited for either, and is named) and every
///   consumer partition has one at or past `end + lateness + event_lag`, and at or past the
///   time the reconciler saw the producer instances pass the bucket (a consumer's mark is a
///   time or an event time it read up to; a message that reached the log late sits behind
///   later ones).
/// * The downstream tier passed it when the same holds, where a consumer partition also
///   counts as passed when the upstream tier passed and both tiers counted the same in that
///   partition (an idle partition does not hold the bucket back).
/// * Both passed: final by progress. Otherwise, `max_wait` after the bucket end (or after
///   the bucket entered the queue, when its first counts came later than its end: a
///   backfill), final by the maximum wait, where a downstream tier that has not passed and
///   saw fewer is `lagging` (and stays queued), turning `missing` `loss_after` after the
///   same point.
pub fn evaluate(rules: &Rules, b: &EdgeBucket<'_>) -> Option<Outcome> {
    let waited_from = b.end_ms.max(b.queued_ms);
    let (due, consumer_due, upstream) = upstream_state(rules, b);
    let partitions: BTreeSet<i32> = b
        .expected
        .keys()
        .chain(b.actual.keys())
        .copied()
        .filter(|&p| p >= 0)
        .collect();
    let downstream = tier_state(b.downstream, due, consumer_due, &partitions, |p| {
        upstream.passed && equal_at(b.expected, b.actual, p)
    });
    let (finality, settled) = if upstream.passed && downstream.passed {
        (Finality::Progress, true)
    } else if b.now_ms >= waited_from.saturating_add(rules.max_wait_ms) {
        let short = total(b.actual) < total(b.expected);
        if short && !downstream.passed && downstream.live {
            if b.now_ms >= waited_from.saturating_add(rules.loss_after_ms) {
                (Finality::LossAfter, true)
            } else {
                (Finality::MaxWait, false)
            }
        } else {
            (Finality::MaxWait, true)
        }
    } else {
        return None;
    };
    Some(Outcome {
        finality,
        settled,
        upstream,
        downstream,
    })
}

/// The partitions of the downstream tier whose counts of the bucket are proven complete: the
/// upstream tier passed the bucket (by its marks, or proven in turn) and both tiers counted the
/// same in the partition, idle ones included. Everything of the bucket that the downstream will
/// ever count there has been counted, so an edge from the downstream tier may take those
/// partitions as passed ([`EdgeBucket::upstream_proven`]). Partitions are only compared when
/// both sides know them.
pub fn proven_downstream(rules: &Rules, b: &EdgeBucket<'_>) -> BTreeSet<i32> {
    let (_, _, upstream) = upstream_state(rules, b);
    if !upstream.passed
        || counted_without_partitions(b.expected)
        || counted_without_partitions(b.actual)
    {
        return BTreeSet::new();
    }
    b.expected
        .keys()
        .chain(b.actual.keys())
        .copied()
        .chain(b.downstream.iter().map(|m| m.partition))
        .filter(|&p| p >= 0 && equal_at(b.expected, b.actual, p))
        .collect()
}

/// [`evaluate`] for an edge summed over datacenters: each part (datacenter) is evaluated on
/// its own, with its own observers, counts and producers' event lag, and the bucket is final
/// when every part is. Partition 0 of `orders` from one datacenter and partition 0 of
/// `orders` from another are different streams (on the aggregate cluster, `dc1.orders` and
/// `dc2.orders`): the furthest owner of one says nothing about the other, so a paused mirror
/// of one datacenter holds the bucket back.
pub fn evaluate_all(rules: &Rules, parts: &[EdgeBucket<'_>]) -> Option<Outcome> {
    let outcomes = parts
        .iter()
        .map(|b| evaluate(rules, b))
        .collect::<Option<Vec<_>>>()?;
    let finality = if outcomes.iter().all(|o| o.finality == Finality::Progress) {
        Finality::Progress
    } else if outcomes.iter().any(|o| o.finality == Finality::LossAfter) {
        Finality::LossAfter
    } else {
        Finality::MaxWait
    };
    let settled = outcomes.iter().all(|o| o.settled);
    let (upstream, downstream): (Vec<_>, Vec<_>) = outcomes
        .into_iter()
        .map(|o| (o.upstream, o.downstream))
        .unzip();
    Some(Outcome {
        finality,
        settled,
        upstream: TierState::all_of(upstream),
        downstream: TierState::all_of(downstream),
    })
}

/// A judged bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// The verdict.
    pub status: VerdictStatus,
    /// For [`VerdictStatus::TierSilent`], which tier was silent.
    pub silent: Option<Side>,
    /// For [`VerdictStatus::Lagging`], how far the downstream tier was behind `now`, ms.
    pub lag_ms: Option<i64>,
}

/// Judges `expected` against `actual` (of the topic or of one partition) once [`evaluate`]
/// gave an outcome:
///
/// * the same on both sides: complete;
/// * a downstream tier with no live observer that did not pass the bucket: tier silent
///   (downstream); an upstream tier likewise that counted nothing: tier silent (upstream);
/// * downstream saw more: duplicated, unless the upstream tier did not pass the bucket or
///   an upstream instance stopped without a clean shutdown before passing it: then
///   `upstream_incomplete`; or unless the downstream tier is a consumer group counting
///   at-least-once: then `redelivered`;
/// * downstream saw fewer: missing once the downstream tier passed the bucket (or at
///   `loss_after`), lagging until then.
pub fn judge(outcome: &Outcome, now_ms: i64, expected: i64, actual: i64) -> Judgement {
    let status = |status| Judgement {
        status,
        silent: None,
        lag_ms: None,
    };
    let silent = |side| Judgement {
        status: VerdictStatus::TierSilent,
        silent: Some(side),
        lag_ms: None,
    };
    let (up, down) = (&outcome.upstream, &outcome.downstream);
    if expected == actual {
        status(VerdictStatus::Complete)
    } else if !down.live && !down.passed {
        silent(Side::Downstream)
    } else if expected == 0 && !up.live && !up.passed {
        silent(Side::Upstream)
    } else if actual > expected {
        if !(up.passed && up.stale.is_empty()) {
            status(VerdictStatus::UpstreamIncomplete)
        } else if down.redelivers {
            status(VerdictStatus::Redelivered)
        } else {
            status(VerdictStatus::Duplicated)
        }
    } else if actual < expected {
        if down.passed || outcome.finality == Finality::LossAfter {
            status(VerdictStatus::Missing)
        } else {
            Judgement {
                status: VerdictStatus::Lagging,
                silent: None,
                lag_ms: lag_ms(down.behind_ms, now_ms),
            }
        }
    } else {
        status(VerdictStatus::Complete)
    }
}

/// How far the lowest watermark of a downstream tier's observers that have not passed a
/// bucket (`behind_ms`) trails `now_ms`. Unknown when that observer has claimed no event time
/// yet (its watermark is the contract's earliest timestamp, which no record carries
/// otherwise), or when no observer has a watermark (a partition with counts and no progress).
fn lag_ms(behind_ms: Option<i64>, now_ms: i64) -> Option<i64> {
    behind_ms
        .filter(|&w| w != MIN_TIMESTAMP_MS)
        .map(|w| now_ms.saturating_sub(w).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: i64 = 120_000;
    const RULES: Rules = Rules {
        lateness_ms: 10,
        max_wait_ms: 1_000,
        loss_after_ms: 5_000,
    };

    fn instance(observer: &str, watermark_ms: i64) -> Mark {
        Mark {
            partition: 0,
            observer: observer.to_owned(),
            watermark_ms,
            last_emitted_ms: watermark_ms,
            consumer: false,
            closing: false,
            at_least_once: false,
            stale: false,
        }
    }

    fn consumer(partition: i32, watermark_ms: i64) -> Mark {
        Mark {
            partition,
            consumer: true,
            ..instance("svc/1", watermark_ms)
        }
    }

    fn counts(pairs: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        pairs.iter().copied().collect()
    }

    struct Case {
        up: Vec<Mark>,
        down: Vec<Mark>,
        expected: BTreeMap<i32, i64>,
        actual: BTreeMap<i32, i64>,
        lag: i64,
        queued: i64,
        sources_passed: Option<i64>,
        proven: BTreeSet<i32>,
    }

    impl Case {
        fn new(
            up: Vec<Mark>,
            down: Vec<Mark>,
            expected: &[(i32, i64)],
            actual: &[(i32, i64)],
        ) -> Self {
            Self {
                up,
                down,
                expected: counts(expected),
                actual: counts(actual),
                lag: 0,
                queued: END - 100,
                sources_passed: None,
                proven: BTreeSet::new(),
            }
        }

        fn at(&self, now_ms: i64) -> Option<(Outcome, Judgement)> {
            let b = EdgeBucket {
                end_ms: END,
                queued_ms: self.queued,
                now_ms,
                upstream: &self.up,
                downstream: &self.down,
                expected: &self.expected,
                actual: &self.actual,
                event_lag_ms: self.lag,
                sources_passed_ms: self.sources_passed,
                upstream_proven: &self.proven,
            };
            let o = evaluate(&RULES, &b)?;
            let e = self.expected.values().sum();
            let a = self.actual.values().sum();
            let j = judge(&o, now_ms, e, a);
            Some((o, j))
        }

        fn status(&self, now_ms: i64) -> Option<VerdictStatus> {
            self.at(now_ms).map(|(_, j)| j.status)
        }
    }

    const SOON: i64 = END + 20;

    #[test]
    fn every_live_producer_instance_must_pass() {
        let mut c = Case::new(
            vec![instance("a/1", END + 10), instance("b/2", END + 9)],
            vec![consumer(0, END + 10)],
            &[(0, 10)],
            &[(0, 10)],
        );
        assert_eq!(c.status(SOON), None, "instance b has not passed");
        c.up[1].watermark_ms = END + 10;
        assert_eq!(c.status(SOON), Some(VerdictStatus::Complete));
    }

    #[test]
    fn a_cleanly_closed_instance_is_not_waited_for() {
        let mut c = Case::new(
            vec![instance("a/1", END + 10), instance("b/2", END - 5_000)],
            vec![consumer(0, END + 10)],
            &[(0, 10)],
            &[(0, 10)],
        );
        assert_eq!(c.status(SOON), None);
        c.up[1].closing = true;
        let (o, j) = c.at(SOON).unwrap();
        assert_eq!(
            (j.status, o.finality),
            (VerdictStatus::Complete, Finality::Progress)
        );
        assert!(o.upstream.stale.is_empty());
    }

    #[test]
    fn a_stale_instance_is_named_and_its_gap_is_not_called_duplication() {
        let mut killed = instance("b/2", END - 5_000);
        killed.stale = true;
        let c = Case::new(
            vec![instance("a/1", END + 10), killed],
            vec![consumer(0, END + 10)],
            &[(0, 10)],
            &[(0, 13)],
        );
        let (o, j) = c.at(SOON).unwrap();
        assert_eq!(j.status, VerdictStatus::UpstreamIncomplete);
        assert_eq!(o.upstream.stale, vec!["b/2".to_owned()]);
        // Loss is still loss: the upstream counted at least what it counted.
        let c = Case {
            actual: counts(&[(0, 7)]),
            ..c
        };
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
    }

    #[test]
    fn consumer_partitions_take_the_furthest_owner_and_wait_for_event_lag() {
        let mut old_owner = consumer(0, END - 1_000);
        old_owner.observer = "svc/old".into();
        old_owner.stale = true;
        let mut c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![old_owner, consumer(0, END + 10), consumer(1, END + 10)],
            &[(0, 10), (1, 4)],
            &[(0, 9), (1, 4)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
        // Producers whose event times trail by 90 ms: the consumer must be 90 ms further.
        c.lag = 90;
        assert_eq!(c.status(SOON), None);
        // Partition 0 passes; partition 1 has not, but counted what the upstream counted.
        c.down[1].watermark_ms = END + 100;
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
    }

    #[test]
    fn idle_or_equal_partitions_do_not_wait_for_the_downstream() {
        // Partition 1 was never written: no downstream progress past the bucket, counts equal.
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![consumer(0, END + 10), consumer(1, 0)],
            &[(0, 10)],
            &[(0, 10)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Complete));
        // Equal counts and a final upstream: complete without downstream progress.
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![],
            &[(0, 5)],
            &[(0, 5)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Complete));
    }

    #[test]
    fn a_downstream_that_has_not_passed_is_lagging_then_lost() {
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![consumer(0, END - 300)],
            &[(0, 10)],
            &[(0, 4)],
        );
        assert_eq!(c.status(SOON), None);
        assert_eq!(c.status(END + 999), None);
        let (o, j) = c.at(END + 1_000).unwrap();
        assert_eq!(j.status, VerdictStatus::Lagging);
        assert_eq!(j.lag_ms, Some(1_300));
        assert!(!o.settled, "a lagging bucket stays queued");
        // A consumer partition that has read nothing yet lags by an unknown amount, not by
        // the time since the contract's earliest timestamp.
        assert_eq!(
            lag_ms(Some(MIN_TIMESTAMP_MS), MIN_TIMESTAMP_MS + 5_000),
            None
        );
        assert_eq!(lag_ms(None, END), None);
        assert_eq!(lag_ms(Some(END - 300), END + 1_000), Some(1_300));
        let (o, j) = c.at(END + 5_000).unwrap();
        assert_eq!(
            (j.status, o.finality),
            (VerdictStatus::Missing, Finality::LossAfter)
        );
        assert!(o.settled);
    }

    #[test]
    fn a_bucket_that_arrives_late_as_a_whole_gets_the_full_wait() {
        // A backfill: the bucket's first counts came long after its end; the downstream has
        // not read them all yet.
        let mut c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![consumer(0, END - 300)],
            &[(0, 10)],
            &[(0, 4)],
        );
        c.queued = END + 50_000;
        assert_eq!(c.status(END + 50_000), None);
        assert_eq!(c.status(END + 50_999), None);
        assert_eq!(c.status(END + 51_000), Some(VerdictStatus::Lagging));
    }

    #[test]
    fn silence_is_told_apart_from_loss() {
        let mut gone = consumer(0, END - 300);
        gone.stale = true;
        let c = Case::new(vec![instance("a/1", END + 10)], vec![gone], &[(0, 10)], &[]);
        let (_, j) = c.at(END + 1_000).unwrap();
        assert_eq!(
            (j.status, j.silent),
            (VerdictStatus::TierSilent, Some(Side::Downstream))
        );
        let c = Case::new(vec![], vec![consumer(0, END + 10)], &[], &[(0, 5)]);
        let (_, j) = c.at(END + 1_000).unwrap();
        assert_eq!(
            (j.status, j.silent),
            (VerdictStatus::TierSilent, Some(Side::Upstream))
        );
        // An upstream that passed and counted nothing: the downstream duplicated.
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![consumer(0, END + 10)],
            &[],
            &[(0, 5)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Duplicated));
    }

    #[test]
    fn a_tier_that_passed_the_bucket_is_not_silent_about_it() {
        // The downstream stopped reporting after it read past the bucket: what it counted
        // stands.
        let mut stopped = consumer(0, END + 10);
        stopped.stale = true;
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![stopped],
            &[(0, 10)],
            &[(0, 7)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
    }

    #[test]
    fn more_downstream_while_the_upstream_never_passed_is_not_duplication() {
        let c = Case::new(
            vec![instance("a/1", END - 500)],
            vec![consumer(0, END + 10)],
            &[(0, 10)],
            &[(0, 12)],
        );
        assert_eq!(c.status(SOON), None);
        assert_eq!(
            c.status(END + 1_000),
            Some(VerdictStatus::UpstreamIncomplete)
        );
    }

    #[test]
    fn a_surplus_at_an_at_least_once_consumer_is_redelivery_and_a_shortfall_still_loss() {
        let at_least_once = |partition, watermark| Mark {
            at_least_once: true,
            ..consumer(partition, watermark)
        };
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![at_least_once(0, END + 10), consumer(1, END + 10)],
            &[(0, 10), (1, 5)],
            &[(0, 12), (1, 5)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Redelivered));
        assert!(!VerdictStatus::Redelivered.is_bad());
        let c = Case::new(
            vec![instance("a/1", END + 10)],
            vec![at_least_once(0, END + 10)],
            &[(0, 10)],
            &[(0, 7)],
        );
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
        // The upstream's own gap comes first.
        let c = Case::new(
            vec![instance("a/1", END - 500)],
            vec![at_least_once(0, END + 10)],
            &[(0, 10)],
            &[(0, 12)],
        );
        assert_eq!(
            c.status(END + 1_000),
            Some(VerdictStatus::UpstreamIncomplete)
        );
    }

    #[test]
    fn a_tier_proven_complete_by_the_edge_into_it_has_passed_for_the_next_edge() {
        // regional -> aggregate: regional passed; aggregate reads a mirror, its watermark an
        // event time short of the bucket end, and counted the same in partitions 0 and 1
        // (2 idle); partition 3 is short.
        let regional = vec![consumer(0, END + 10)];
        let aggregate = vec![
            consumer(0, END - 300),
            consumer(1, END - 300),
            consumer(2, END - 300),
            consumer(3, END - 300),
        ];
        let into = Case::new(
            regional.clone(),
            aggregate.clone(),
            &[(0, 10), (1, 4), (3, 5)],
            &[(0, 10), (1, 4), (3, 2)],
        );
        let b = EdgeBucket {
            end_ms: END,
            queued_ms: into.queued,
            now_ms: SOON,
            upstream: &into.up,
            downstream: &into.down,
            expected: &into.expected,
            actual: &into.actual,
            event_lag_ms: 0,
            sources_passed_ms: None,
            upstream_proven: &BTreeSet::new(),
        };
        assert_eq!(proven_downstream(&RULES, &b), BTreeSet::from([0, 1, 2]));
        // An upstream that has not passed proves nothing.
        let unproven = EdgeBucket {
            upstream: &aggregate,
            ..b
        };
        assert!(proven_downstream(&RULES, &unproven).is_empty());

        // aggregate -> consumer: the consumer reads the same mirror and counted the same.
        let mut next = Case::new(
            aggregate[..3].to_vec(),
            vec![consumer(0, END - 300), consumer(1, END - 300)],
            &[(0, 10), (1, 4)],
            &[(0, 10), (1, 4)],
        );
        assert_eq!(next.status(SOON), None);
        next.proven = BTreeSet::from([0, 1, 2]);
        let (o, j) = next.at(SOON).unwrap();
        assert_eq!(
            (o.finality, j.status),
            (Finality::Progress, VerdictStatus::Complete)
        );
        // Where the consumer counted fewer, it still has to show it read past the bucket.
        next.actual = counts(&[(0, 10), (1, 3)]);
        assert_eq!(next.status(SOON), None);
    }

    #[test]
    fn event_lag_is_the_largest_over_live_instances() {
        let mut a = instance("a/1", 1_000);
        a.last_emitted_ms = 91_000;
        let mut stale = instance("b/1", 0);
        stale.last_emitted_ms = 500_000;
        stale.stale = true;
        let svc = Mark {
            last_emitted_ms: 900_000,
            ..consumer(0, 0)
        };
        assert_eq!(event_lag_ms(&[a, stale, svc]), 90_000);
        assert_eq!(event_lag_ms(&[]), 0);
    }

    #[test]
    fn sources_pass_when_every_live_instance_did() {
        let due = END + 10;
        assert_eq!(sources_passed(&[], due), None);
        assert_eq!(sources_passed(&[consumer(0, END + 99)], due), None);
        let mut stale = instance("b/2", 0);
        stale.stale = true;
        assert_eq!(sources_passed(&[stale.clone()], due), None);
        let a = instance("a/1", due);
        assert_eq!(sources_passed(&[a.clone(), stale], due), Some(true));
        // The lowest mark over an instance's partitions.
        let a_behind = Mark {
            partition: 1,
            ..instance("a/1", due - 1)
        };
        assert_eq!(
            sources_passed(&[a.clone(), a_behind.clone()], due),
            Some(false)
        );
        let closed = |m: Mark| Mark { closing: true, ..m };
        assert_eq!(
            sources_passed(&[closed(a), closed(a_behind)], due),
            Some(true)
        );
    }

    #[test]
    fn a_consumer_mark_counts_only_from_when_the_producers_passed() {
        // A producer stalled with a message of the bucket: it reached the log after later
        // messages of another producer, which a mirror's reader already read (its mark is
        // the latest event time read). The producers passed at END + 5_000.
        let mut c = Case::new(
            vec![consumer(0, END + 6_000)],
            vec![consumer(0, END + 2_000)],
            &[(0, 10)],
            &[(0, 9)],
        );
        c.sources_passed = Some(i64::MAX);
        assert_eq!(c.status(SOON), None, "the producers have not passed");
        c.sources_passed = Some(END + 5_000);
        assert_eq!(c.status(SOON), None, "read before the producers passed");
        let (o, j) = c.at(END + 1_000).unwrap();
        assert_eq!(
            (j.status, o.downstream.passed),
            (VerdictStatus::Lagging, false),
            "at max_wait it is delay, not loss"
        );
        c.down[0].watermark_ms = END + 5_000;
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
        // Without producers to wait for, the consumer's mark is enough.
        c.down[0].watermark_ms = END + 2_000;
        c.sources_passed = None;
        assert_eq!(c.status(SOON), Some(VerdictStatus::Missing));
    }

    #[test]
    fn waiting_observers_are_named() {
        let c = Case::new(
            vec![instance("a/1", END + 10), instance("b/2", END - 400)],
            vec![consumer(0, END + 10), consumer(1, END - 300)],
            &[(0, 10), (1, 2), (2, 1)],
            &[(0, 12), (1, 1)],
        );
        let (o, _) = c.at(END + 1_000).unwrap();
        assert_eq!(o.upstream.waiting_on, vec!["b/2".to_owned()]);
        assert_eq!(
            o.downstream.waiting_on,
            vec!["svc/1 partition 1".to_owned(), "partition 2".to_owned()]
        );
    }

    #[test]
    fn each_datacenter_of_a_summed_edge_must_pass() {
        // dc1's mirror copies; dc2's is paused: its partition 0 on the aggregate is behind,
        // while dc1's partition 0 passed. Summed, the aggregate has fewer.
        let dc1 = Case::new(
            vec![consumer(0, END + 10)],
            vec![consumer(0, END + 10)],
            &[(0, 10)],
            &[(0, 10)],
        );
        let dc2 = Case::new(
            vec![consumer(0, END + 10)],
            vec![consumer(0, END - 300)],
            &[(0, 10)],
            &[(0, 6)],
        );
        fn part(c: &Case, now_ms: i64) -> EdgeBucket<'_> {
            EdgeBucket {
                end_ms: END,
                queued_ms: c.queued,
                now_ms,
                upstream: &c.up,
                downstream: &c.down,
                expected: &c.expected,
                actual: &c.actual,
                event_lag_ms: c.lag,
                sources_passed_ms: c.sources_passed,
                upstream_proven: &c.proven,
            }
        }
        assert_eq!(
            evaluate_all(&RULES, &[part(&dc1, SOON), part(&dc2, SOON)]),
            None
        );
        let o = evaluate_all(&RULES, &[part(&dc1, END + 1_000), part(&dc2, END + 1_000)]).unwrap();
        assert_eq!(
            judge(&o, END + 1_000, 20, 16).status,
            VerdictStatus::Lagging
        );
        assert!(!o.settled);
        assert_eq!(
            o.downstream.waiting_on,
            vec!["svc/1 partition 0".to_owned()]
        );
        // Both passed: final by progress.
        let o = evaluate_all(&RULES, &[part(&dc1, SOON), part(&dc1, SOON)]).unwrap();
        assert_eq!(o.finality, Finality::Progress);
    }

    #[test]
    fn statuses_round_trip() {
        for s in VerdictStatus::ALL {
            assert_eq!(s.as_str().parse::<VerdictStatus>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("lost".parse::<VerdictStatus>().is_err());
    }
}
