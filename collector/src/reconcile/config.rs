//! Configuration of the reconciler: the topology (tiers and the edges between them) and the
//! timing rules that decide when a bucket is final.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::model::ConfigError;

/// A duration in whole milliseconds, saturating (the engine's and the verdict rules' unit).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `[reconcile]`: which tiers are compared and when a bucket is final.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Run the reconciler at all (a collector can be ingest-only while another one reconciles).
    pub enabled: bool,
    /// How often pending buckets are evaluated. Short intervals give faster verdicts at the
    /// cost of more queries.
    #[serde(with = "chaperone_audit::duration")]
    pub interval: Duration,
    /// How far past a bucket's end every partition of the downstream tier must have
    /// progressed before the bucket is judged: room for records that arrive out of order.
    #[serde(with = "chaperone_audit::duration")]
    pub allowed_lateness: Duration,
    /// A bucket is judged at the latest this long after its end, even when a tier never
    /// reported progress past it (this is how a silent tier is noticed).
    #[serde(with = "chaperone_audit::duration")]
    pub max_wait: Duration,
    /// A judged bucket whose counts change again (late records) is judged again only once its
    /// counts have not changed for this long, so that every tier involved has had the
    /// chance to deliver its late counts too: a re-judgement compares settled numbers.
    #[serde(with = "chaperone_audit::duration")]
    pub settle: Duration,
    /// A producer instance (an observer without consumer positions) that sent no progress
    /// for this long, and did not say it shut down, stops holding buckets back. Verdicts of
    /// the buckets it had not passed name it (`stale_instances`): its counts of them may be
    /// incomplete. Keep it well above the producers' flush interval.
    #[serde(with = "chaperone_audit::duration")]
    pub instance_timeout: Duration,
    /// A downstream tier that has not shown it read past a bucket by `max_wait` is
    /// `lagging`; what it still lacks this long after the bucket end is called `missing`.
    #[serde(with = "chaperone_audit::duration")]
    pub loss_after: Duration,
    /// A loss whose bucket starts this long after the last bad bucket of the topic's open
    /// incident opens a new incident (and notifies) instead of joining it: a loss that never
    /// heals does not mute its topic for good.
    #[serde(with = "chaperone_audit::duration")]
    pub incident_gap: Duration,
    /// A loss at least this many times the largest loss of the topic's open incident opens a
    /// new incident (and notifies) instead of joining it, if it is also `escalate_min`
    /// messages or more.
    pub escalate_factor: u32,
    /// The smallest loss (messages in one bucket) that can escalate: a loss that starts in
    /// the middle of a bucket shows a few messages there and the full rate in the next one,
    /// which is the same loss, not a worse one.
    pub escalate_min: u64,
    /// Buckets that ended longer ago than this are not judged (nor re-judged when very late
    /// records arrive): a collector started on weeks of stored counts does not alert about
    /// losses long past.
    #[serde(with = "chaperone_audit::duration")]
    pub lookback: Duration,
    /// Buckets evaluated per transaction: bounds memory and transaction length.
    pub batch_buckets: usize,
    /// Names of the tiers that take part in reconciliation (as reported in audit records). A
    /// name ending in `*` (`consumer:*`) stands for every tier that starts with what precedes
    /// it: each consumer group that reports is a tier of its own.
    pub tiers: Vec<String>,
    /// Pairs of tiers to compare, upstream first. An edge whose `to` is a pattern of `tiers`
    /// stands for one edge to each matching tier, on the topics that tier announced.
    pub edges: Vec<EdgeConfig>,
    /// The `missing messages per topic` gauge sums topic-level missing verdicts of buckets
    /// that started within this window before now.
    #[serde(with = "chaperone_audit::duration")]
    pub missing_metric_window: Duration,
    /// At most this many topics get their own series in the missing-messages gauge; the
    /// others are summed under the topic label `_other` (keeps label cardinality bounded).
    pub missing_metric_max_topics: usize,
    /// Verdicts of buckets that started more than this many days ago, history entries older
    /// than that, and incidents resolved longer ago (with their notifications) are deleted,
    /// in small batches, once an hour. 0 keeps everything.
    pub retention_days: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(10),
            allowed_lateness: Duration::from_secs(120),
            max_wait: Duration::from_secs(900),
            settle: Duration::from_secs(30),
            instance_timeout: Duration::from_secs(120),
            loss_after: Duration::from_secs(3_600),
            incident_gap: Duration::from_secs(3_600),
            escalate_factor: 10,
            escalate_min: 100,
            lookback: Duration::from_secs(2 * 86_400),
            batch_buckets: 500,
            tiers: vec!["producer".into(), "regional".into(), "aggregate".into()],
            edges: vec![
                EdgeConfig {
                    from: "producer".into(),
                    to: "regional".into(),
                    per_datacenter: true,
                    ..EdgeConfig::default()
                },
                EdgeConfig {
                    from: "regional".into(),
                    to: "aggregate".into(),
                    ..EdgeConfig::default()
                },
            ],
            missing_metric_window: Duration::from_secs(3600),
            missing_metric_max_topics: 100,
            retention_days: 30,
        }
    }
}

/// `[[reconcile.edges]]`: one comparison of an upstream tier with a downstream tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Name used in verdicts and alerts; defaults to `<from>-><to>`.
    pub name: Option<String>,
    /// Upstream tier: what should have arrived.
    pub from: String,
    /// Downstream tier: what did arrive.
    pub to: String,
    /// Compare each datacenter on its own (producer -> regional, where every datacenter has
    /// its own regional cluster) instead of summing over datacenters (regional -> aggregate).
    pub per_datacenter: bool,
    /// Also judge every partition on its own. Only meaningful where partitions map one to
    /// one between the tiers (a mirror that keeps partitioning); partition-level verdicts
    /// are stored and queryable but do not raise alerts.
    pub partition_level: bool,
    /// Whether bad topic-level verdicts of this edge open incidents and notify webhooks.
    pub alert: bool,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            name: None,
            from: String::new(),
            to: String::new(),
            per_datacenter: false,
            partition_level: false,
            alert: true,
        }
    }
}

impl EdgeConfig {
    /// The edge's name in verdicts and alerts.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}->{}", self.from, self.to))
    }

    /// This edge to `tier`, when `to` is a pattern that `tier` matches.
    pub fn to_tier(&self, tier: &str) -> Option<EdgeConfig> {
        self.reaches(tier).then(|| EdgeConfig {
            to: tier.to_owned(),
            ..self.clone()
        })
    }

    /// Whether `to` is a pattern that `tier` matches.
    pub fn reaches(&self, tier: &str) -> bool {
        tier_pattern(&self.to)
            .is_some_and(|prefix| tier.starts_with(prefix) && tier.len() > prefix.len())
    }
}

/// What a tier pattern (`consumer:*`) requires a tier name to start with; `None` for a name.
pub fn tier_pattern(tier: &str) -> Option<&str> {
    tier.strip_suffix('*')
}

impl ReconcileConfig {
    /// `tiers` as SQL `LIKE` patterns (`tier LIKE ANY($1)`): names match themselves, a
    /// pattern every tier it stands for.
    pub fn tier_like_patterns(&self) -> Vec<String> {
        self.tiers
            .iter()
            .map(|t| {
                let (name, any) = match tier_pattern(t) {
                    Some(prefix) => (prefix, "%"),
                    None => (t.as_str(), ""),
                };
                let escaped = name
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                format!("{escaped}{any}")
            })
            .collect()
    }

    /// Checks the configuration, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new("reconcile.interval", "must be above zero"));
        }
        if self.max_wait < self.allowed_lateness {
            return Err(ConfigError::new(
                "reconcile.max_wait",
                "must be at least reconcile.allowed_lateness",
            ));
        }
        if self.loss_after < self.max_wait {
            return Err(ConfigError::new(
                "reconcile.loss_after",
                "must be at least reconcile.max_wait",
            ));
        }
        if self.lookback < self.loss_after {
            return Err(ConfigError::new(
                "reconcile.lookback",
                "must be at least reconcile.loss_after",
            ));
        }
        if self.settle > self.max_wait {
            return Err(ConfigError::new(
                "reconcile.settle",
                "must be at most reconcile.max_wait",
            ));
        }
        if self.escalate_factor < 2 {
            return Err(ConfigError::new(
                "reconcile.escalate_factor",
                "must be at least 2",
            ));
        }
        if self.instance_timeout.is_zero() {
            return Err(ConfigError::new(
                "reconcile.instance_timeout",
                "must be above zero",
            ));
        }
        if self.batch_buckets == 0 {
            return Err(ConfigError::new(
                "reconcile.batch_buckets",
                "must be at least 1",
            ));
        }
        if self.missing_metric_max_topics == 0 {
            return Err(ConfigError::new(
                "reconcile.missing_metric_max_topics",
                "must be at least 1",
            ));
        }
        let mut tiers = HashSet::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            if tier.is_empty() {
                return Err(ConfigError::new(
                    format!("reconcile.tiers[{i}]"),
                    "is empty",
                ));
            }
            if !tiers.insert(tier.as_str()) {
                return Err(ConfigError::new(
                    format!("reconcile.tiers[{i}]"),
                    format!("tier `{tier}` is listed twice"),
                ));
            }
            if tier_pattern(tier).unwrap_or(tier).contains('*') || tier == "*" {
                return Err(ConfigError::new(
                    format!("reconcile.tiers[{i}]"),
                    format!("`{tier}`: only a trailing `*` after a prefix is a pattern"),
                ));
            }
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            if let Some(p) = self.tiers.iter().find(|p| {
                tier_pattern(p).is_some_and(|prefix| tier != *p && tier.starts_with(prefix))
            }) {
                return Err(ConfigError::new(
                    format!("reconcile.tiers[{i}]"),
                    format!("`{tier}` is already one of the tiers `{p}` stands for"),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, edge) in self.edges.iter().enumerate() {
            for (field, tier) in [("from", &edge.from), ("to", &edge.to)] {
                if !tiers.contains(tier.as_str()) {
                    return Err(ConfigError::new(
                        format!("reconcile.edges[{i}].{field}"),
                        format!("`{tier}` is not one of reconcile.tiers"),
                    ));
                }
            }
            if edge.from == edge.to {
                return Err(ConfigError::new(
                    format!("reconcile.edges[{i}].to"),
                    "must differ from `from`",
                ));
            }
            if tier_pattern(&edge.from).is_some() {
                return Err(ConfigError::new(
                    format!("reconcile.edges[{i}].from"),
                    "must name one tier, not a pattern",
                ));
            }
            if tier_pattern(&edge.to).is_some() && edge.name.is_some() {
                return Err(ConfigError::new(
                    format!("reconcile.edges[{i}].name"),
                    "an edge to a pattern of tiers is named after each tier it reaches",
                ));
            }
            let name = edge.name();
            if name.is_empty() || name.len() > 255 {
                return Err(ConfigError::new(
                    format!("reconcile.edges[{i}].name"),
                    "must be 1 to 255 bytes",
                ));
            }
            if !names.insert(name.clone()) {
                return Err(ConfigError::new(
                    format!("reconcile.edges[{i}].name"),
                    format!("edge name `{name}` is used twice"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ReconcileConfig::default()
            .validate()
            .expect("defaults validate");
    }

    #[test]
    fn parses_a_topology() {
        let cfg: ReconcileConfig = toml::from_str(
            r#"
            interval = "5s"
            allowed_lateness = "90s"
            max_wait = "10m"
            tiers = ["producer", "regional", "aggregate"]
            [[edges]]
            from = "producer"
            to = "regional"
            per_datacenter = true
            [[edges]]
            from = "regional"
            to = "aggregate"
            partition_level = true
            "#,
        )
        .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.interval, Duration::from_secs(5));
        assert_eq!(cfg.allowed_lateness, Duration::from_secs(90));
        assert_eq!(cfg.max_wait, Duration::from_secs(600));
        assert_eq!(cfg.edges.len(), 2);
        assert_eq!(cfg.edges[0].name(), "producer->regional");
        assert!(cfg.edges[0].per_datacenter);
        assert!(cfg.edges[1].partition_level);
        assert!(cfg.edges[1].alert);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<ReconcileConfig>("lateness = \"5s\"").unwrap_err();
        assert!(err.to_string().contains("lateness"), "{err}");
        let err =
            toml::from_str::<ReconcileConfig>("[[edges]]\nfrom = \"a\"\ntoo = \"b\"").unwrap_err();
        assert!(err.to_string().contains("too"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let mut cfg = ReconcileConfig::default();
        cfg.edges[1].to = "mirror".into();
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key, "reconcile.edges[1].to");

        let cfg = ReconcileConfig {
            max_wait: Duration::from_secs(1),
            ..ReconcileConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "reconcile.max_wait");

        let mut cfg = ReconcileConfig::default();
        cfg.edges.push(cfg.edges[0].clone());
        assert_eq!(cfg.validate().unwrap_err().key, "reconcile.edges[2].name");

        let cfg = ReconcileConfig {
            interval: Duration::ZERO,
            ..ReconcileConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "reconcile.interval");
    }

    #[test]
    fn an_edge_to_a_pattern_of_tiers_reaches_each_consumer_group() {
        let cfg: ReconcileConfig = toml::from_str(
            r#"
            tiers = ["producer", "regional", "aggregate", "consumer:*"]
            [[edges]]
            from = "aggregate"
            to = "consumer:*"
            "#,
        )
        .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(
            cfg.tier_like_patterns(),
            ["producer", "regional", "aggregate", "consumer:%"]
        );
        let edge = &cfg.edges[0];
        let billing = edge.to_tier("consumer:billing").expect("matches");
        assert_eq!(billing.name(), "aggregate->consumer:billing");
        assert!(edge.to_tier("consumer:").is_none());
        assert!(edge.to_tier("regional").is_none());
        assert!(cfg.edges[0].to_tier("aggregate").is_none());

        // LIKE's own wildcards in a name match only themselves.
        let odd = ReconcileConfig {
            tiers: vec!["a_b%c\\".into(), "x_*".into()],
            edges: Vec::new(),
            ..ReconcileConfig::default()
        };
        assert_eq!(odd.tier_like_patterns(), ["a\\_b\\%c\\\\", "x\\_%"]);

        let bad = |tiers: &[&str], edge: EdgeConfig| {
            ReconcileConfig {
                tiers: tiers.iter().map(|t| (*t).to_owned()).collect(),
                edges: vec![edge],
                ..ReconcileConfig::default()
            }
            .validate()
            .unwrap_err()
            .key
        };
        let edge = |from: &str, to: &str| EdgeConfig {
            from: from.into(),
            to: to.into(),
            ..EdgeConfig::default()
        };
        assert_eq!(
            bad(&["aggregate", "c*x*"], edge("aggregate", "c*x*")),
            "reconcile.tiers[1]"
        );
        assert_eq!(
            bad(
                &["aggregate", "consumer:*", "consumer:a"],
                edge("aggregate", "consumer:*")
            ),
            "reconcile.tiers[2]"
        );
        assert_eq!(
            bad(
                &["consumer:*", "aggregate"],
                edge("consumer:*", "aggregate")
            ),
            "reconcile.edges[0].from"
        );
        let named = EdgeConfig {
            name: Some("to consumers".into()),
            ..edge("aggregate", "consumer:*")
        };
        assert_eq!(
            bad(&["aggregate", "consumer:*"], named),
            "reconcile.edges[0].name"
        );
    }

    #[test]
    fn durations_need_a_unit() {
        let err = toml::from_str::<ReconcileConfig>("max_wait = 900").unwrap_err();
        assert!(err.to_string().contains("\"900s\" or \"900ms\""), "{err}");
    }
}
