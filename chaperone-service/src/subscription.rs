//! Which topics of the cluster are audited.
//!
//! A topic is audited when it matches an include pattern and no exclude pattern, and is not
//! one of the topics that must never be counted: the audit topic itself and its mirrored
//! copies (`<source><sep><audit topic>`), Kafka-internal topics (`__*`) and MirrorMaker 2's
//! own topics. The pipeline re-reads cluster metadata periodically and re-subscribes when the
//! selected set changes, so new topics are picked up without a restart.

use std::collections::BTreeSet;

use regex::RegexSet;

/// Patterns excluded whatever the configuration says.
const ALWAYS_EXCLUDED: &[&str] = &[
    r"^__",                      // Kafka internal (__consumer_offsets, __transaction_state)
    r"^mm2-",                    // MirrorMaker 2: offset syncs, configs, offsets, status
    r"^heartbeats$",             // MirrorMaker 2 heartbeats
    r"\.heartbeats$",            // ... and their mirrored copies
    r"\.checkpoints\.internal$", // MirrorMaker 2 checkpoints
    r"^connect-(configs|offsets|status)$", // Kafka Connect defaults
];

/// The topic selector.
#[derive(Debug, Clone)]
pub struct Selector {
    include: RegexSet,
    exclude: RegexSet,
    always: RegexSet,
    audit_topic: String,
    separator: String,
}

impl Selector {
    /// Builds the selector. Patterns must have been validated.
    pub fn new(
        include: &[String],
        exclude: &[String],
        audit_topic: &str,
        separator: &str,
    ) -> Result<Self, regex::Error> {
        Ok(Self {
            include: RegexSet::new(include)?,
            exclude: RegexSet::new(exclude)?,
            always: RegexSet::new(ALWAYS_EXCLUDED)?,
            audit_topic: audit_topic.to_owned(),
            separator: separator.to_owned(),
        })
    }

    /// Whether `topic` is the audit topic or a mirrored copy of it (at any depth).
    fn is_audit_topic(&self, topic: &str) -> bool {
        topic == self.audit_topic
            || topic
                .strip_suffix(self.audit_topic.as_str())
                .is_some_and(|prefix| prefix.ends_with(self.separator.as_str()))
    }

    /// Whether `topic` is audited.
    pub fn selects(&self, topic: &str) -> bool {
        !self.is_audit_topic(topic)
            && !self.always.is_match(topic)
            && self.include.is_match(topic)
            && !self.exclude.is_match(topic)
    }

    /// The audited subset of `topics`, sorted.
    pub fn select<'a, I: IntoIterator<Item = &'a str>>(&self, topics: I) -> BTreeSet<String> {
        topics
            .into_iter()
            .filter(|t| self.selects(t))
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(include: &[&str], exclude: &[&str]) -> Selector {
        let inc: Vec<String> = include.iter().map(|s| s.to_string()).collect();
        let exc: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        Selector::new(&inc, &exc, "chaperone-audit", ".").expect("valid")
    }

    #[test]
    fn excludes_what_must_never_be_counted() {
        let s = selector(&[".*"], &[]);
        for t in [
            "chaperone-audit",
            "regional.chaperone-audit",
            "dc2.regional.chaperone-audit",
            "__consumer_offsets",
            "__transaction_state",
            "mm2-offset-syncs.aggregate.internal",
            "mm2-configs.regional.internal",
            "heartbeats",
            "regional.heartbeats",
            "regional.checkpoints.internal",
        ] {
            assert!(!s.selects(t), "{t} must be excluded");
        }
        for t in [
            "orders",
            "regional.orders",
            "my-chaperone-audit",
            "heartbeats-app",
        ] {
            assert!(s.selects(t), "{t} must be selected");
        }
    }

    #[test]
    fn include_and_exclude() {
        let s = selector(&["^orders", "^payments$"], &["-dlq$"]);
        let got = s.select(["orders", "orders-dlq", "payments", "payments2", "other"]);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec!["orders".to_owned(), "payments".to_owned()]
        );
    }

    #[test]
    fn empty_include_selects_nothing() {
        let s = selector(&[], &[]);
        assert!(!s.selects("orders"));
    }
}
