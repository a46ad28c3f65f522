//! Which configured clusters the collector can hear, and since when.
//!
//! An observer (a producer instance, a chaperone-service partition) is judged stale when it
//! has been silent for `reconcile.instance_timeout`. When the cluster whose audit topic it
//! reports to is unreachable (its broker killed, a network partition), every observer that
//! reports through it falls silent together: that is delay, not a stopped producer or tier.
//! So silence only counts while the cluster is reachable: from the later of the observer's
//! last progress and the moment the cluster became reachable again (`audit_progress.source`
//! names the cluster each observer's progress arrives through).
//!
//! The consumers' probe asks each cluster for the audit topic's metadata every [`PROBE_INTERVAL`]: the
//! cluster is reachable when it answers within [`PROBE_TIMEOUT`] and every partition of the
//! audit topic has a leader. Noticing an outage takes at most their sum (7 s), so an
//! `instance_timeout` of a few times that leaves no outage counted as silence.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// How often each cluster is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a probe waits for the cluster's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per cluster alias: reachable since when, or `None` while unreachable. A cluster never
/// probed is absent, and its observers' silence counts as before (from their last progress).
#[derive(Debug, Clone, Default)]
pub struct Reach(Arc<Mutex<BTreeMap<String, Option<DateTime<Utc>>>>>);

impl Reach {
    /// The cluster answered at `now`: reachable since now, or since it last became so.
    pub fn answered(&self, alias: &str, now: DateTime<Utc>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let since = map.entry(alias.to_owned()).or_insert(None);
        if since.is_none() {
            *since = Some(now);
        }
    }

    /// The cluster did not answer: unreachable until it does.
    pub fn lost(&self, alias: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(alias.to_owned(), None);
    }

    /// Whether the cluster is reachable now (`None` when it was never probed).
    pub fn reachable(&self, alias: &str) -> Option<bool> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(alias).map(Option::is_some)
    }

    /// The probed clusters' aliases and since when each is reachable (`None`: unreachable),
    /// as two columns for SQL.
    pub fn columns(&self) -> (Vec<String>, Vec<Option<DateTime<Utc>>>) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(a, s)| (a.clone(), *s)).unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachable_since_the_first_answer_after_an_outage() {
        let reach = Reach::default();
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        assert_eq!(reach.reachable("regional"), None);
        reach.answered("regional", t(10));
        reach.answered("regional", t(20));
        assert_eq!(
            reach.columns(),
            (vec!["regional".to_owned()], vec![Some(t(10))])
        );
        reach.lost("regional");
        assert_eq!(reach.reachable("regional"), Some(false));
        assert_eq!(reach.columns().1, vec![None]);
        reach.answered("regional", t(60));
        reach.answered("regional", t(70));
        assert_eq!(reach.columns().1, vec![Some(t(60))]);
    }
}
