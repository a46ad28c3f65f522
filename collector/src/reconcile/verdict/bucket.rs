//! Judging one queued bucket on every edge of the topology: which edges and scopes
//! (datacenters) are final, and their topic- and partition-level verdicts. Pure: the engine
//! loads the rows and writes what comes out.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    EdgeBucket, Finality, Mark, Rules, Side, VerdictStatus, evaluate_all, event_lag_ms, judge,
};
use crate::reconcile::config::{EdgeConfig, ReconcileConfig, millis};

/// A queued bucket of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BucketKey {
    pub(crate) topic: String,
    pub(crate) start: i64,
    pub(crate) width: i64,
}

/// Counts of one tier, datacenter and partition in the bucket.
#[derive(Debug, Clone)]
pub(crate) struct CountRow {
    pub(crate) tier: String,
    pub(crate) datacenter: String,
    pub(crate) partition: i32,
    pub(crate) count: i64,
}

/// One observer's progress in one partition of the bucket's topic.
#[derive(Debug, Clone)]
pub(crate) struct ProgressRow {
    pub(crate) tier: String,
    pub(crate) datacenter: String,
    pub(crate) width: i64,
    pub(crate) mark: Mark,
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
/// added to `mismatches`.
pub(crate) fn judge_bucket(
    config: &ReconcileConfig,
    key: &BucketKey,
    queued_ms: i64,
    now_ms: i64,
    rows: &[CountRow],
    progress: &[ProgressRow],
    mismatches: &mut BTreeSet<String>,
) -> (Vec<Computed>, bool) {
    let end = key.start.saturating_add(key.width);
    let rules = Rules {
        lateness_ms: millis(config.allowed_lateness),
        max_wait_ms: millis(config.max_wait),
        loss_after_ms: millis(config.loss_after),
    };
    let mut all_final = true;
    let mut out = Vec::new();
    for edge in &config.edges {
        let on_edge: Vec<&CountRow> = rows
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
            let scoped: Vec<&ProgressRow> = progress
                .iter()
                .filter(|p| in_scope(&p.datacenter))
                .collect();
            let widths = |tier: &str| -> BTreeSet<i64> {
                scoped
                    .iter()
                    .filter(|p| p.tier == tier && !p.mark.stale)
                    .map(|p| p.width)
                    .collect()
            };
            let (up_widths, down_widths) = (widths(&edge.from), widths(&edge.to));
            if !up_widths.is_empty()
                && !down_widths.is_empty()
                && up_widths.is_disjoint(&down_widths)
            {
                mismatches.insert(format!(
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
            let by_partition = |tier: &str, dc: Option<&str>| -> BTreeMap<i32, i64> {
                let mut m = BTreeMap::new();
                for r in on_edge.iter().filter(|r| {
                    r.tier == tier
                        && in_scope(&r.datacenter)
                        && dc.is_none_or(|d| d == r.datacenter)
                }) {
                    *m.entry(r.partition).or_insert(0) += r.count;
                }
                m
            };
            let expected = by_partition(&edge.from, None);
            let actual = by_partition(&edge.to, None);
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
            struct Part {
                up: Vec<Mark>,
                down: Vec<Mark>,
                expected: BTreeMap<i32, i64>,
                actual: BTreeMap<i32, i64>,
                event_lag_ms: i64,
            }
            let parts: Vec<Part> = datacenters
                .into_iter()
                .map(|dc| {
                    let marks = |tier: &str| -> Vec<Mark> {
                        scoped
                            .iter()
                            .filter(|p| p.tier == tier && p.datacenter == dc)
                            .map(|p| p.mark.clone())
                            .collect()
                    };
                    // Producers' event-time lag is a property of the datacenter's sources:
                    // every tier waits for it, whichever edge it is on.
                    let sources: Vec<Mark> = scoped
                        .iter()
                        .filter(|p| p.datacenter == dc)
                        .map(|p| p.mark.clone())
                        .collect();
                    Part {
                        up: marks(&edge.from),
                        down: marks(&edge.to),
                        expected: by_partition(&edge.from, Some(dc)),
                        actual: by_partition(&edge.to, Some(dc)),
                        event_lag_ms: event_lag_ms(&sources),
                    }
                })
                .filter(|p| {
                    // A datacenter where only the downstream reports, counting nothing, has
                    // nothing to prove.
                    !(p.up.is_empty()
                        && p.expected.values().all(|&n| n == 0)
                        && p.actual.values().all(|&n| n == 0))
                })
                .collect();
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
                })
                .collect();
            let Some(outcome) = evaluate_all(&rules, &buckets) else {
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
            push(-1, expected.values().sum(), actual.values().sum());
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
    (out, all_final)
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

    fn counts(tier: &str, dc: &str, partition: i32, count: i64) -> CountRow {
        CountRow {
            tier: tier.into(),
            datacenter: dc.into(),
            partition,
            count,
        }
    }

    fn progress(tier: &str, dc: &str, partition: i32, watermark_ms: i64) -> ProgressRow {
        ProgressRow {
            tier: tier.into(),
            datacenter: dc.into(),
            width: WIDTH,
            mark: Mark {
                partition,
                observer: format!("{tier}-{dc}/1"),
                watermark_ms,
                last_emitted_ms: watermark_ms,
                consumer: tier != "producer",
                closing: false,
                stale: false,
            },
        }
    }

    fn judged(
        rows: &[CountRow],
        marks: &[ProgressRow],
        now_ms: i64,
    ) -> (Vec<Computed>, bool, BTreeSet<String>) {
        let mut mismatches = BTreeSet::new();
        let (v, done) = judge_bucket(&config(), &key(), END, now_ms, rows, marks, &mut mismatches);
        (v, done, mismatches)
    }

    fn topic_level<'a>(v: &'a [Computed], edge: &str, dc: &str) -> Option<&'a Computed> {
        v.iter()
            .find(|c| c.key.edge == edge && c.key.datacenter == dc && c.key.partition == -1)
    }

    /// Two datacenters, each with producers, a regional cluster and a mirror into aggregate.
    fn two_datacenters(
        dc2_mirrored: i64,
        dc2_aggregate_mark: i64,
    ) -> (Vec<CountRow>, Vec<ProgressRow>) {
        let passed = END + 2_000;
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
            m.width = 10_000;
        }
        let (v, done, mismatches) = judged(&rows, &marks, END + 5_000);
        assert!(!done);
        assert!(topic_level(&v, "regional->aggregate", "").is_none());
        assert_eq!(mismatches.len(), 1, "{mismatches:?}");
        assert!(
            mismatches
                .iter()
                .all(|m| m.contains("orders") && m.contains("10000"))
        );
    }
}
