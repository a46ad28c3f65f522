//! Judging one queued bucket on every edge of the topology: which edges and scopes
//! (datacenters) are final, and their topic- and partition-level verdicts. Pure: the engine
//! loads the rows and writes what comes out.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use super::{
    EdgeBucket, Finality, Mark, Rules, Side, VerdictStatus, evaluate_all, event_lag_ms, judge,
    proven_downstream, sources_passed,
};
use crate::model::BucketKey;
use crate::reconcile::config::{EdgeConfig, ReconcileConfig, millis, tier_pattern};
use crate::store::{CellCount, ProgressMark};

/// What judging found that is reported rather than judged.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    /// Edges of a topic whose tiers count in different bucket widths: not compared, and their
    /// buckets stay queued while the mismatch lasts.
    pub(crate) mismatches: BTreeSet<String>,
    /// Cells (edge, topic, scope, bucket) whose counts sum past `i64::MAX`: not judged (no
    /// verdict, no alert), and settled, since counts only grow.
    pub(crate) overflows: BTreeSet<String>,
}

/// Sum of `counts`, `None` past `i64::MAX`.
fn checked_total(counts: &BTreeMap<i32, i64>) -> Option<i64> {
    counts.values().try_fold(0i64, |sum, &n| sum.checked_add(n))
}

/// When the producer instances of each datacenter were first seen to have passed a bucket
/// (datacenter -> epoch ms on the reconciler's clock); kept with the bucket.
pub(crate) type SourcesPassed = BTreeMap<String, i64>;

/// The reconciler's view of a bucket's times, epoch ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Times {
    /// When the bucket entered the queue.
    pub(crate) queued_ms: i64,
    /// Now, on the reconciler's clock.
    pub(crate) now_ms: i64,
}

/// What a verdict is about: edge, topic, scope (datacenter, '' when summed), partition (-1
/// for the topic) and bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct VerdictKey {
    pub(crate) edge: String,
    pub(crate) topic: String,
    pub(crate) datacenter: String,
    pub(crate) partition: i32,
    pub(crate) start: i64,
    pub(crate) width: i64,
}

/// A verdict judged in this pass, before it is compared with what is stored.
#[derive(Debug, Clone)]
pub(crate) struct Computed {
    pub(crate) key: VerdictKey,
    pub(crate) from_tier: String,
    pub(crate) to_tier: String,
    pub(crate) status: VerdictStatus,
    pub(crate) expected: i64,
    pub(crate) actual: i64,
    pub(crate) silent_tier: Option<String>,
    pub(crate) lag_ms: Option<i64>,
    pub(crate) stale_instances: Vec<String>,
    pub(crate) waiting_on: Vec<String>,
    pub(crate) finality: Finality,
    pub(crate) alert: bool,
}

/// Judges one bucket on every edge and scope that is final (see [`evaluate_all`]). Returns the
/// verdicts and whether every edge and scope is settled (the bucket can leave the queue).
/// Edges whose tiers count the topic in different bucket widths are not compared; they are
/// added to `findings.mismatches`. Edges and scopes whose counts, or any sum of them the
/// judgement takes, do not fit in an `i64` are not judged; they are added to
/// `findings.overflows`. A datacenter whose producer instances are seen to have passed the
/// bucket for the first time is added to `sources` at `now`.
pub(crate) fn judge_bucket(
    config: &ReconcileConfig,
    key: &BucketKey,
    Times { queued_ms, now_ms }: Times,
    rows: &[CellCount],
    progress: &[ProgressMark],
    sources: &mut SourcesPassed,
    findings: &mut Findings,
) -> (Vec<Computed>, bool) {
    let end = key.start.saturating_add(key.width);
    let rules = Rules {
        lateness_ms: millis(config.allowed_lateness),
        max_wait_ms: millis(config.max_wait),
        loss_after_ms: millis(config.loss_after),
    };
    // What the producers of each datacenter tell every tier, whichever edge it is on (see
    // `EdgeBucket`): their event-time lag, and when they passed the bucket.
    let mut by_source: BTreeMap<&str, (i64, Option<i64>)> = BTreeMap::new();
    for dc in progress.iter().map(|p| p.datacenter.as_str()) {
        if by_source.contains_key(dc) {
            continue;
        }
        let marks: Vec<Mark> = progress
            .iter()
            .filter(|p| p.datacenter == dc)
            .map(|p| p.mark.clone())
            .collect();
        let at = match sources_passed(&marks, end.saturating_add(rules.lateness_ms)) {
            None => None,
            Some(false) => Some(i64::MAX),
            Some(true) => Some(*sources.entry(dc.to_owned()).or_insert(now_ms)),
        };
        by_source.insert(dc, (event_lag_ms(&marks), at));
    }
    let mut all_final = true;
    let mut out = Vec::new();
    // Per (tier, datacenter): the partitions an edge judged before proved complete, taken as
    // passed on the edges from that tier (edges are taken in the configured order).
    let mut proven: BTreeMap<(String, String), BTreeSet<i32>> = BTreeMap::new();
    let none = BTreeSet::new();
    for edge in topic_edges(&config.edges, progress) {
        let edge = edge.as_ref();
        let on_edge: Vec<&CellCount> = rows
            .iter()
            .filter(|r| r.tier == edge.from || r.tier == edge.to)
            .collect();
        if on_edge.is_empty() {
            continue;
        }
        let scopes: BTreeSet<&str> = if edge.per_datacenter {
            on_edge.iter().map(|r| r.datacenter.as_str()).collect()
        } else {
            BTreeSet::from([""])
        };
        for scope in scopes {
            let in_scope = |dc: &str| scope.is_empty() || dc == scope;
            let scoped: Vec<&ProgressMark> = progress
                .iter()
                .filter(|p| in_scope(&p.datacenter))
                .collect();
            let widths = |tier: &str| -> BTreeSet<i64> {
                scoped
                    .iter()
                    .filter(|p| p.tier == tier && !p.mark.stale)
                    .map(|p| p.bucket_width_ms)
                    .collect()
            };
            // A consumer group that stopped cleanly (its last progress records are final) before
            // the bucket ended is not waited for and not judged on it, unless it counted
            // exactly what its upstream counted there (below).
            let down: Vec<&Mark> = scoped
                .iter()
                .filter(|p| p.tier == edge.to)
                .map(|p| &p.mark)
                .collect();
            let stopped_before = !down.is_empty()
                && down.iter().all(|m| m.consumer && m.closing)
                && down
                    .iter()
                    .map(|m| m.watermark_ms)
                    .min()
                    .unwrap_or(i64::MAX)
                    < end.saturating_add(rules.lateness_ms);
            let (up_widths, down_widths) = (widths(&edge.from), widths(&edge.to));
            if !up_widths.is_empty()
                && !down_widths.is_empty()
                && up_widths.is_disjoint(&down_widths)
            {
                findings.mismatches.insert(format!(
                    "topic `{}` on `{}`: {} counts in {:?} ms buckets, {} in {:?} ms",
                    key.topic,
                    edge.name(),
                    edge.from,
                    up_widths,
                    edge.to,
                    down_widths
                ));
                // Stays queued, so that the mismatch is seen again while it lasts.
                all_final = false;
                continue;
            }
            // `None` when a count or a sum of counts does not fit in an i64.
            let by_partition = |tier: &str, dc: Option<&str>| -> Option<BTreeMap<i32, i64>> {
                let mut m = BTreeMap::new();
                for r in on_edge.iter().filter(|r| {
                    r.tier == tier
                        && in_scope(&r.datacenter)
                        && dc.is_none_or(|d| d == r.datacenter)
                }) {
                    let sum: &mut i64 = m.entry(r.partition).or_insert(0);
                    *sum = sum.checked_add(r.count?)?;
                }
                Some(m)
            };
            let overflow = |findings: &mut Findings| {
                let scope = if scope.is_empty() {
                    String::new()
                } else {
                    format!(" in `{scope}`")
                };
                findings.overflows.insert(format!(
                    "topic `{}` on `{}`{scope}, bucket {} ({} ms)",
                    key.topic,
                    edge.name(),
                    key.start,
                    key.width
                ));
            };
            let (Some(expected), Some(actual)) =
                (by_partition(&edge.from, None), by_partition(&edge.to, None))
            else {
                overflow(findings);
                continue;
            };
            let nonzero = |m: &BTreeMap<i32, i64>| {
                m.iter()
                    .filter(|&(_, &n)| n != 0)
                    .map(|(&p, &n)| (p, n))
                    .collect::<Vec<_>>()
            };
            if stopped_before && nonzero(&expected) != nonzero(&actual) {
                continue;
            }
            // The topic-level counts and their difference (stored with the verdict).
            let Some((expected_total, actual_total)) = checked_total(&expected)
                .zip(checked_total(&actual))
                .filter(|&(e, a)| e.checked_sub(a).is_some() && a.checked_sub(e).is_some())
            else {
                overflow(findings);
                continue;
            };
            if !scoped.iter().any(|p| p.tier == edge.from) && expected.values().all(|&n| n == 0) {
                // The upstream tier never reported this topic here (for example producers
                // without the audit library): nothing to compare against.
                continue;
            }
            // Every datacenter in scope must pass on its own: the same partition number of
            // two datacenters is two streams (docs/verdicts.md).
            let datacenters: BTreeSet<&str> = scoped
                .iter()
                .filter(|p| p.tier == edge.from || p.tier == edge.to)
                .map(|p| p.datacenter.as_str())
                .chain(
                    on_edge
                        .iter()
                        .filter(|r| in_scope(&r.datacenter))
                        .map(|r| r.datacenter.as_str()),
                )
                .collect();
            struct Part<'d> {
                dc: &'d str,
                up: Vec<Mark>,
                down: Vec<Mark>,
                expected: BTreeMap<i32, i64>,
                actual: BTreeMap<i32, i64>,
                event_lag_ms: i64,
                sources_passed_ms: Option<i64>,
            }
            let parts: Option<Vec<Part>> = datacenters
                .into_iter()
                .map(|dc| {
                    let marks = |tier: &str| -> Vec<Mark> {
                        scoped
                            .iter()
                            .filter(|p| p.tier == tier && p.datacenter == dc)
                            .map(|p| p.mark.clone())
                            .collect()
                    };
                    let (event_lag_ms, sources_passed_ms) =
                        by_source.get(dc).copied().unwrap_or((0, None));
                    // Each datacenter's totals are taken too (`evaluate`).
                    let counts = |tier: &str| {
                        by_partition(tier, Some(dc)).filter(|m| checked_total(m).is_some())
                    };
                    Some(Part {
                        dc,
                        up: marks(&edge.from),
                        down: marks(&edge.to),
                        expected: counts(&edge.from)?,
                        actual: counts(&edge.to)?,
                        event_lag_ms,
                        sources_passed_ms,
                    })
                })
                .collect();
            let Some(mut parts) = parts else {
                overflow(findings);
                continue;
            };
            // A datacenter where only the downstream reports, counting nothing, has nothing to
            // prove.
            parts.retain(|p| {
                !(p.up.is_empty()
                    && p.expected.values().all(|&n| n == 0)
                    && p.actual.values().all(|&n| n == 0))
            });
            let buckets: Vec<EdgeBucket<'_>> = parts
                .iter()
                .map(|p| EdgeBucket {
                    end_ms: end,
                    queued_ms,
                    now_ms,
                    upstream: &p.up,
                    downstream: &p.down,
                    expected: &p.expected,
                    actual: &p.actual,
                    event_lag_ms: p.event_lag_ms,
                    sources_passed_ms: p.sources_passed_ms,
                    upstream_proven: proven
                        .get(&(edge.from.clone(), p.dc.to_owned()))
                        .unwrap_or(&none),
                })
                .collect();
            let proofs: Vec<(String, BTreeSet<i32>)> = parts
                .iter()
                .zip(&buckets)
                .map(|(p, b)| (p.dc.to_owned(), proven_downstream(&rules, b)))
                .collect();
            let outcome = evaluate_all(&rules, &buckets);
            for (dc, partitions) in proofs {
                proven
                    .entry((edge.to.clone(), dc))
                    .or_default()
                    .extend(partitions);
            }
            let Some(outcome) = outcome else {
                all_final = false;
                continue;
            };
            let waiting_on: Vec<String> = if outcome.finality == Finality::Progress {
                Vec::new()
            } else {
                let named = |tier: &str, who: &[String]| {
                    who.iter()
                        .map(|w| format!("{tier}:{w}"))
                        .collect::<Vec<_>>()
                };
                let mut w = named(&edge.from, &outcome.upstream.waiting_on);
                w.extend(named(&edge.to, &outcome.downstream.waiting_on));
                w
            };
            if !outcome.settled {
                all_final = false;
            }
            let mut push = |partition: i32, e: i64, a: i64| {
                let j = judge(&outcome, now_ms, e, a);
                out.push(Computed {
                    key: VerdictKey {
                        edge: edge.name(),
                        topic: key.topic.clone(),
                        datacenter: scope.to_owned(),
                        partition,
                        start: key.start,
                        width: key.width,
                    },
                    from_tier: edge.from.clone(),
                    to_tier: edge.to.clone(),
                    status: j.status,
                    expected: e,
                    actual: a,
                    silent_tier: j.silent.map(|s| silent_tier(edge, s)),
                    lag_ms: j.lag_ms,
                    stale_instances: outcome.upstream.stale.clone(),
                    waiting_on: waiting_on.clone(),
                    finality: outcome.finality,
                    alert: edge.alert,
                });
            };
            push(-1, expected_total, actual_total);
            if edge.partition_level {
                if expected.contains_key(&-1) || actual.contains_key(&-1) {
                    tracing::debug!(
                        topic = %key.topic, edge = %edge.name(),
                        "partition-level verdict skipped: a tier counted without partitions"
                    );
                    continue;
                }
                let partitions: BTreeSet<i32> =
                    expected.keys().chain(actual.keys()).copied().collect();
                for p in partitions {
                    push(
                        p,
                        expected.get(&p).copied().unwrap_or(0),
                        actual.get(&p).copied().unwrap_or(0),
                    );
                }
            }
        }
    }
    // A tier of a pattern edge that counted here and has not announced the topic yet is about
    // to: its progress follows its counts, and may be stored after a pass has judged the
    // bucket. The bucket stays queued for it (up to `max_wait` after it was queued) so that
    // its edge is judged when the progress comes, not left out for good.
    if now_ms < queued_ms.saturating_add(rules.max_wait_ms)
        && unannounced_counts(&config.edges, rows, progress)
    {
        all_final = false;
    }
    (out, all_final)
}

/// Whether a tier that an edge reaches through a pattern (`consumer:*`) has counts in `rows`
/// and no progress on the topic.
fn unannounced_counts(edges: &[EdgeConfig], rows: &[CellCount], progress: &[ProgressMark]) -> bool {
    rows.iter().any(|r| {
        edges.iter().any(|e| e.reaches(&r.tier)) && !progress.iter().any(|p| p.tier == r.tier)
    })
}

/// The edges judged for one topic: an edge to a pattern of tiers (`consumer:*`) reaches each
/// matching tier that announced the topic with progress records, so that a consumer group
/// that does not read the topic is never judged on it.
fn topic_edges<'a>(edges: &'a [EdgeConfig], progress: &[ProgressMark]) -> Vec<Cow<'a, EdgeConfig>> {
    let announced: BTreeSet<&str> = progress.iter().map(|p| p.tier.as_str()).collect();
    let mut out = Vec::new();
    for edge in edges {
        if tier_pattern(&edge.to).is_none() {
            out.push(Cow::Borrowed(edge));
        } else {
            out.extend(
                announced
                    .iter()
                    .filter_map(|t| edge.to_tier(t))
                    .map(Cow::Owned),
            );
        }
    }
    out
}

fn silent_tier(edge: &EdgeConfig, side: Side) -> String {
    match side {
        Side::Upstream => edge.from.clone(),
        Side::Downstream => edge.to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const START: i64 = 600_000;
    const WIDTH: i64 = 60_000;
    const END: i64 = START + WIDTH;
    /// When the fixtures' producers passed the bucket.
    const PASSED: i64 = END + 2_000;

    fn config() -> ReconcileConfig {
        ReconcileConfig {
            allowed_lateness: Duration::from_secs(1),
            max_wait: Duration::from_secs(60),
            ..ReconcileConfig::default()
        }
    }

    fn key() -> BucketKey {
        BucketKey {
            topic: "orders".into(),
            start: START,
            width: WIDTH,
        }
    }

    fn counts(tier: &str, dc: &str, partition: i32, count: i64) -> CellCount {
        CellCount {
            tier: tier.into(),
            datacenter: dc.into(),
            partition,
            count: Some(count),
        }
    }

    fn progress(tier: &str, dc: &str, partition: i32, watermark_ms: i64) -> ProgressMark {
        ProgressMark {
            topic: "orders".into(),
            tier: tier.into(),
            datacenter: dc.into(),
            bucket_width_ms: WIDTH,
            mark: Mark {
                partition,
                observer: format!("{tier}-{dc}/1"),
                watermark_ms,
                last_emitted_ms: watermark_ms,
                consumer: tier != "producer",
                closing: false,
                at_least_once: false,
                stale: false,
            },
        }
    }

    fn judged(
        rows: &[CellCount],
        marks: &[ProgressMark],
        now_ms: i64,
    ) -> (Vec<Computed>, bool, Findings) {
        let mut findings = Findings::default();
        let times = Times {
            queued_ms: END,
            now_ms,
        };
        // Seen passing when their marks say they did.
        let mut sources = SourcesPassed::from([("dc1".into(), PASSED), ("dc2".into(), PASSED)]);
        let (v, done) = judge_bucket(
            &config(),
            &key(),
            times,
            rows,
            marks,
            &mut sources,
            &mut findings,
        );
        (v, done, findings)
    }

    fn topic_level<'a>(v: &'a [Computed], edge: &str, dc: &str) -> Option<&'a Computed> {
        v.iter()
            .find(|c| c.key.edge == edge && c.key.datacenter == dc && c.key.partition == -1)
    }

    /// Two datacenters, each with producers, a regional cluster and a mirror into aggregate.
    fn two_datacenters(
        dc2_mirrored: i64,
        dc2_aggregate_mark: i64,
    ) -> (Vec<CellCount>, Vec<ProgressMark>) {
        let passed = PASSED;
        let rows = vec![
            counts("producer", "dc1", -1, 10),
            counts("regional", "dc1", 0, 10),
            counts("aggregate", "dc1", 0, 10),
            counts("producer", "dc2", -1, 7),
            counts("regional", "dc2", 0, 6),
            counts("aggregate", "dc2", 0, dc2_mirrored),
        ];
        let marks = vec![
            progress("producer", "dc1", -1, passed),
            progress("regional", "dc1", 0, passed),
            progress("aggregate", "dc1", 0, passed),
            progress("producer", "dc2", -1, passed),
            progress("regional", "dc2", 0, passed),
            progress("aggregate", "dc2", 0, dc2_aggregate_mark),
        ];
        (rows, marks)
    }

    #[test]
    fn loss_is_attributed_to_its_datacenter_and_the_summed_edge_waits_for_each() {
        // dc2's mirror is behind: its copy of partition 0 has not passed the bucket.
        let (rows, marks) = two_datacenters(2, START);
        let (v, done, _) = judged(&rows, &marks, END + 5_000);
        assert!(!done, "regional->aggregate waits for dc2's copy");
        let dc2 = topic_level(&v, "producer->regional", "dc2").expect("dc2 judged");
        assert_eq!(
            (dc2.status, dc2.expected, dc2.actual),
            (VerdictStatus::Missing, 7, 6)
        );
        assert_eq!(
            topic_level(&v, "producer->regional", "dc1").map(|c| c.status),
            Some(VerdictStatus::Complete)
        );
        assert!(topic_level(&v, "regional->aggregate", "").is_none());
        // The mirror catches up: summed over datacenters, complete.
        let (rows, marks) = two_datacenters(6, END + 2_000);
        let (v, done, _) = judged(&rows, &marks, END + 5_000);
        assert!(done);
        let r2a = topic_level(&v, "regional->aggregate", "").expect("judged");
        assert_eq!(
            (r2a.status, r2a.expected, r2a.actual),
            (VerdictStatus::Complete, 16, 16)
        );
        assert!(r2a.waiting_on.is_empty());
    }

    #[test]
    fn consumer_tiers_count_from_when_the_producers_were_seen_passing() {
        let (rows, marks) = two_datacenters(6, END + 2_000);
        let judge = |sources: &mut SourcesPassed, now_ms: i64| {
            let times = Times {
                queued_ms: END,
                now_ms,
            };
            let mut findings = Findings::default();
            judge_bucket(
                &config(),
                &key(),
                times,
                &rows,
                &marks,
                sources,
                &mut findings,
            )
        };
        // First seen at END + 5_000: the consumer tiers' marks (END + 2_000) are older, so
        // dc2's regional tier, one short, has not proved the loss (dc1's counts are equal).
        let mut sources = SourcesPassed::new();
        let (v, done) = judge(&mut sources, END + 5_000);
        assert!(!done);
        assert!(
            topic_level(&v, "producer->regional", "dc2").is_none(),
            "{v:?}"
        );
        assert_eq!(
            sources,
            SourcesPassed::from([("dc1".into(), END + 5_000), ("dc2".into(), END + 5_000)])
        );
        // Kept as first seen.
        judge(&mut sources, END + 9_000);
        assert_eq!(sources["dc1"], END + 5_000);
        // Not recorded while a producer has not passed.
        let mut behind = marks.clone();
        behind[0].mark.watermark_ms = END;
        let mut sources = SourcesPassed::new();
        let times = Times {
            queued_ms: END,
            now_ms: END + 5_000,
        };
        judge_bucket(
            &config(),
            &key(),
            times,
            &rows,
            &behind,
            &mut sources,
            &mut Findings::default(),
        );
        assert_eq!(sources.keys().collect::<Vec<_>>(), ["dc2"]);
    }

    /// One edge, from aggregate to every consumer group.
    fn to_consumers() -> ReconcileConfig {
        let config = ReconcileConfig {
            tiers: vec!["aggregate".into(), "consumer:*".into()],
            edges: vec![EdgeConfig {
                from: "aggregate".into(),
                to: "consumer:*".into(),
                ..EdgeConfig::default()
            }],
            ..config()
        };
        config.validate().expect("valid");
        config
    }

    /// Judges the bucket queued at its end, at `now_ms`, its producers in dc1 passed.
    fn judge_queued_at_end(
        config: &ReconcileConfig,
        rows: &[CellCount],
        marks: &[ProgressMark],
        now_ms: i64,
    ) -> (Vec<Computed>, bool) {
        let times = Times {
            queued_ms: END,
            now_ms,
        };
        let mut sources = SourcesPassed::from([("dc1".into(), PASSED)]);
        judge_bucket(
            config,
            &key(),
            times,
            rows,
            marks,
            &mut sources,
            &mut Findings::default(),
        )
    }

    #[test]
    fn each_consumer_group_is_an_edge_on_the_topics_it_announced() {
        let config = to_consumers();
        let rows = vec![
            counts("aggregate", "dc1", 0, 10),
            counts("consumer:billing", "dc1", 0, 7),
        ];
        let mut marks = vec![
            progress("aggregate", "dc1", 0, PASSED),
            progress("consumer:billing", "dc1", 0, PASSED),
        ];
        let judge_rows = |rows: &[CellCount], marks: &[ProgressMark]| {
            judge_queued_at_end(&config, rows, marks, END + 5_000)
        };
        let judge = |marks: &[ProgressMark]| judge_rows(&rows, marks);
        let (v, done) = judge(&marks);
        assert!(done);
        let edges: Vec<(&str, VerdictStatus, i64, i64)> = v
            .iter()
            .map(|c| (c.key.edge.as_str(), c.status, c.expected, c.actual))
            .collect();
        assert_eq!(
            edges,
            [("aggregate->consumer:billing", VerdictStatus::Missing, 10, 7)]
        );
        // The group stopped cleanly before the bucket was over: not waited for, not judged.
        marks[1].mark.closing = true;
        marks[1].mark.watermark_ms = END - 1_000;
        let (v, done) = judge(&marks);
        assert!(done && v.is_empty(), "{v:?}");
        // ... unless it counted what aggregate counted there (a reader of a mirror stops
        // with an event-time watermark short of the last bucket's end): complete.
        let mut equal = rows.clone();
        equal[1] = counts("consumer:billing", "dc1", 0, 10);
        let (v, done) = judge_rows(&equal, &marks);
        assert!(done);
        assert_eq!(
            v.iter()
                .map(|c| (c.key.edge.as_str(), c.status))
                .collect::<Vec<_>>(),
            [("aggregate->consumer:billing", VerdictStatus::Complete)]
        );
        // Stopped after it: judged as before.
        marks[1].mark.watermark_ms = PASSED;
        let (v, _) = judge(&marks);
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn a_group_whose_counts_come_before_its_progress_is_waited_for() {
        let config = to_consumers();
        // `search` counted, and its progress (sent after its counts) is not stored yet.
        let rows = vec![
            counts("aggregate", "dc1", 0, 10),
            counts("consumer:search", "dc1", 0, 9),
        ];
        let mut marks = vec![progress("aggregate", "dc1", 0, PASSED)];
        let judge = |marks: &[ProgressMark], now_ms: i64| {
            judge_queued_at_end(&config, &rows, marks, now_ms)
        };
        let (v, done) = judge(&marks, END + 5_000);
        assert!(v.is_empty() && !done, "the bucket stays queued: {v:?}");
        // The progress comes: its edge is judged, and the bucket is settled.
        marks.push(progress("consumer:search", "dc1", 0, PASSED));
        let (v, done) = judge(&marks, END + 6_000);
        assert!(done);
        assert_eq!(
            v.iter()
                .map(|c| (c.key.edge.as_str(), c.status, c.expected, c.actual))
                .collect::<Vec<_>>(),
            [("aggregate->consumer:search", VerdictStatus::Missing, 10, 9)]
        );
        // Never any progress: not waited for past `max_wait` (60 s), and not judged.
        let (v, done) = judge(&marks[..1], END + 60_000);
        assert!(v.is_empty() && done, "{v:?}");
    }

    #[test]
    fn at_max_wait_a_lagging_datacenter_is_named() {
        let (rows, marks) = two_datacenters(2, START);
        let (v, done, _) = judged(&rows, &marks, END + 60_000);
        assert!(!done, "a lagging bucket stays queued");
        let r2a = topic_level(&v, "regional->aggregate", "").expect("judged at max_wait");
        assert_eq!(r2a.status, VerdictStatus::Lagging);
        assert_eq!(
            r2a.waiting_on,
            vec!["aggregate:aggregate-dc2/1 partition 0".to_owned()]
        );
    }

    #[test]
    fn different_bucket_widths_are_not_compared_and_stay_queued() {
        let (rows, mut marks) = two_datacenters(6, END + 2_000);
        for m in marks.iter_mut().filter(|m| m.tier == "aggregate") {
            m.bucket_width_ms = 10_000;
        }
        let (v, done, Findings { mismatches, .. }) = judged(&rows, &marks, END + 5_000);
        assert!(!done);
        assert!(topic_level(&v, "regional->aggregate", "").is_none());
        assert_eq!(mismatches.len(), 1, "{mismatches:?}");
        assert!(
            mismatches
                .iter()
                .all(|m| m.contains("orders") && m.contains("10000"))
        );
    }

    #[test]
    fn a_cell_whose_counts_overflow_is_reported_and_not_judged_and_the_others_are() {
        // Regional dc1 counted nearly i64::MAX: each datacenter fits on its own, the sum over
        // datacenters of regional->aggregate does not.
        let big = i64::MAX - 5;
        let (mut rows, marks) = two_datacenters(6, END + 2_000);
        for r in &mut rows {
            if r.datacenter == "dc1" {
                r.count = Some(big);
            }
        }
        let (v, done, findings) = judged(&rows, &marks, END + 5_000);
        assert!(done, "an overflowing cell does not hold the bucket back");
        assert_eq!(
            findings.overflows,
            BTreeSet::from([format!(
                "topic `orders` on `regional->aggregate`, bucket {START} ({WIDTH} ms)"
            )])
        );
        assert!(
            v.iter().all(|c| c.key.edge != "regional->aggregate"),
            "not judged: {v:?}"
        );
        let dc1 = topic_level(&v, "producer->regional", "dc1").expect("dc1 judged");
        assert_eq!(
            (dc1.status, dc1.expected, dc1.actual),
            (VerdictStatus::Complete, big, big)
        );
        let dc2 = topic_level(&v, "producer->regional", "dc2").expect("dc2 judged");
        assert_eq!(
            (dc2.status, dc2.expected, dc2.actual),
            (VerdictStatus::Missing, 7, 6)
        );
    }

    #[test]
    fn overflowing_sums_of_partitions_and_of_clusters_are_caught() {
        let half = i64::MAX / 2 + 1;
        let passed = END + 2_000;
        let marks = vec![
            progress("producer", "dc1", -1, passed),
            progress("regional", "dc1", 0, passed),
            progress("regional", "dc1", 1, passed),
        ];
        // Two partitions whose sum does not fit; then one whose rows' sum over clusters did
        // not (PostgreSQL gives no count).
        for rows in [
            vec![
                counts("producer", "dc1", -1, 10),
                counts("regional", "dc1", 0, half),
                counts("regional", "dc1", 1, half),
            ],
            vec![
                counts("producer", "dc1", -1, 10),
                CellCount {
                    count: None,
                    ..counts("regional", "dc1", 0, 0)
                },
            ],
        ] {
            let (v, done, findings) = judged(&rows, &marks, END + 5_000);
            assert!(done);
            assert!(v.is_empty(), "{v:?}");
            assert_eq!(
                findings.overflows,
                BTreeSet::from([
                    format!(
                        "topic `orders` on `producer->regional` in `dc1`, bucket {START} \
                         ({WIDTH} ms)"
                    ),
                    format!("topic `orders` on `regional->aggregate`, bucket {START} ({WIDTH} ms)")
                ])
            );
        }
        // A difference that does not fit (only negative counts could make one).
        let rows = vec![
            counts("producer", "dc1", -1, i64::MAX),
            counts("regional", "dc1", 0, -1),
        ];
        let (v, _, findings) = judged(&rows, &marks, END + 5_000);
        assert!(
            v.iter().all(|c| c.key.edge != "producer->regional"),
            "{v:?}"
        );
        assert_eq!(findings.overflows.len(), 1, "{:?}", findings.overflows);
    }
}
