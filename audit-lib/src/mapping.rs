//! Topic mapping across mirrors.
//!
//! On the aggregate cluster MirrorMaker 2 writes `orders` from the `regional` cluster to
//! `regional.orders`. To line aggregate counts up with the regional counts they came from,
//! each physical topic maps to a logical topic and the datacenter the messages originated in.
//! Topics the rule does not match are local: logical = physical, datacenter = the configured
//! one. chaperone-service maps every topic it reads; an [`AuditedConsumer`] reading mirrors
//! on the aggregate cluster maps them the same way (`ConsumerOptions::mapping`).
//!
//! [`AuditedConsumer`]: crate::AuditedConsumer

use regex::Regex;
use serde::{Deserialize, Serialize};

/// How a physical topic name maps to its logical topic and source datacenter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// Physical topic = logical topic; datacenter = the reader's own.
    Identity,
    /// MirrorMaker 2's DefaultReplicationPolicy: `<source><separator><topic>`.
    Mirror,
    /// A regular expression with named groups `source` and `topic`.
    Regex,
}

/// Topic mapping across mirrors, as configured (`[mapping]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingConfig {
    /// The rule; unset, the reader's default (chaperone-service: `mirror` on the `aggregate`
    /// tier, `identity` elsewhere; a consumer: `identity`).
    pub kind: Option<MappingKind>,
    /// MirrorMaker 2's `replication.policy.separator`.
    pub separator: String,
    /// Source cluster aliases the `mirror` rule recognises; empty means any prefix before the
    /// first separator. Listing them keeps local topics with dots in their names intact.
    pub sources: Vec<String>,
    /// For `regex`: a pattern with named groups `source` and `topic`, matched against the
    /// whole physical topic name.
    pub pattern: Option<String>,
}

impl Default for MappingConfig {
    fn default() -> Self {
        Self {
            kind: None,
            separator: ".".to_owned(),
            sources: Vec::new(),
            pattern: None,
        }
    }
}

/// A mapping configuration that cannot work: the key (under `mapping.`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping.{key}: {reason}")]
pub struct MappingError {
    /// `separator` or `pattern`.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl MappingConfig {
    /// The rule, with `default` when `kind` is unset, for a reader in `local_datacenter`;
    /// an empty separator or a `regex` rule without a valid pattern with named groups
    /// `source` and `topic` is an error naming the key.
    pub fn rule(
        &self,
        default: MappingKind,
        local_datacenter: &str,
    ) -> Result<Mapping, MappingError> {
        let invalid = |key, reason: &str| MappingError {
            key,
            reason: reason.to_owned(),
        };
        if self.separator.is_empty() {
            return Err(invalid("separator", "must not be empty"));
        }
        let kind = self.kind.unwrap_or(default);
        let pattern = match (kind, &self.pattern) {
            (MappingKind::Regex, None) => {
                return Err(invalid(
                    "pattern",
                    "must be set when mapping.kind is `regex`",
                ));
            }
            (MappingKind::Regex, Some(p)) => {
                let re = Regex::new(p).map_err(|e| invalid("pattern", &e.to_string()))?;
                let groups: Vec<_> = re.capture_names().flatten().collect();
                if !groups.contains(&"source") || !groups.contains(&"topic") {
                    return Err(invalid(
                        "pattern",
                        "must have named groups `source` and `topic`",
                    ));
                }
                Some(re)
            }
            _ => None,
        };
        Ok(Mapping {
            kind,
            separator: self.separator.clone(),
            sources: self.sources.clone(),
            pattern,
            local_datacenter: local_datacenter.to_owned(),
        })
    }
}

/// A physical topic's logical name and source datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Logical topic.
    pub topic: String,
    /// Datacenter the messages originated in.
    pub datacenter: String,
    /// Whether the topic is a mirror of a topic of another cluster (the rule matched it).
    /// Having read a mirror to its end says nothing about what is still upstream of the
    /// mirror maker, so its watermarks never claim "caught up".
    pub mirrored: bool,
}

/// The mapping rule.
#[derive(Debug, Clone)]
pub struct Mapping {
    kind: MappingKind,
    separator: String,
    sources: Vec<String>,
    pattern: Option<Regex>,
    local_datacenter: String,
}

impl Mapping {
    fn local(&self, physical: &str) -> Mapped {
        Mapped {
            topic: physical.to_owned(),
            datacenter: self.local_datacenter.clone(),
            mirrored: false,
        }
    }

    /// Maps one physical topic.
    pub fn map(&self, physical: &str) -> Mapped {
        match self.kind {
            MappingKind::Identity => self.local(physical),
            MappingKind::Mirror => self.mirror(physical),
            MappingKind::Regex => {
                let Some(caps) = self.pattern.as_ref().and_then(|re| re.captures(physical)) else {
                    return self.local(physical);
                };
                match (caps.name("source"), caps.name("topic")) {
                    (Some(s), Some(t))
                        if caps.get(0).map(|m| m.as_str().len()) == Some(physical.len())
                            && !s.as_str().is_empty()
                            && !t.as_str().is_empty() =>
                    {
                        Mapped {
                            topic: t.as_str().to_owned(),
                            datacenter: s.as_str().to_owned(),
                            mirrored: true,
                        }
                    }
                    _ => self.local(physical),
                }
            }
        }
    }

    fn mirror(&self, physical: &str) -> Mapped {
        let sep = self.separator.as_str();
        if self.sources.is_empty() {
            // DefaultReplicationPolicy: the source is everything before the first separator.
            return match physical.split_once(sep) {
                Some((source, topic)) if !source.is_empty() && !topic.is_empty() => Mapped {
                    topic: topic.to_owned(),
                    datacenter: source.to_owned(),
                    mirrored: true,
                },
                _ => self.local(physical),
            };
        }
        // Known sources: strip them while they prefix the name, so a topic mirrored twice
        // (`b.a.orders`) maps to its original datacenter `a` and topic `orders`.
        let mut rest = physical;
        let mut origin: Option<&str> = None;
        loop {
            let next = self.sources.iter().find_map(|s| {
                rest.strip_prefix(s.as_str())
                    .and_then(|r| r.strip_prefix(sep))
                    .filter(|r| !r.is_empty())
                    .map(|r| (s.as_str(), r))
            });
            match next {
                Some((source, r)) => {
                    origin = Some(source);
                    rest = r;
                }
                None => break,
            }
        }
        match origin {
            Some(source) => Mapped {
                topic: rest.to_owned(),
                datacenter: source.to_owned(),
                mirrored: true,
            },
            None => self.local(physical),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: MappingKind, sources: &[&str], pattern: Option<&str>) -> Mapping {
        let c = MappingConfig {
            kind: Some(kind),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            pattern: pattern.map(str::to_owned),
            ..MappingConfig::default()
        };
        c.rule(MappingKind::Identity, "agg-dc").expect("valid")
    }

    #[test]
    fn bad_rules_name_their_key() {
        let key = |c: MappingConfig| c.rule(MappingKind::Mirror, "dc").unwrap_err().key;
        let separator = MappingConfig {
            separator: String::new(),
            ..MappingConfig::default()
        };
        assert_eq!(key(separator), "separator");
        let regex = |pattern: Option<&str>| MappingConfig {
            kind: Some(MappingKind::Regex),
            pattern: pattern.map(str::to_owned),
            ..MappingConfig::default()
        };
        assert_eq!(key(regex(None)), "pattern");
        assert_eq!(key(regex(Some("("))), "pattern");
        assert_eq!(key(regex(Some("^(?P<source>x)$"))), "pattern");
        let unset = MappingConfig::default().rule(MappingKind::Mirror, "dc");
        assert_eq!(
            unset.expect("valid").map("regional.orders").datacenter,
            "regional"
        );
    }

    /// A mapped topic; mirrored unless it is in the local datacenter `agg-dc`.
    fn mapped(topic: &str, dc: &str) -> Mapped {
        Mapped {
            topic: topic.into(),
            datacenter: dc.into(),
            mirrored: dc != "agg-dc",
        }
    }

    #[test]
    fn identity_keeps_names() {
        let r = m(MappingKind::Identity, &[], None);
        assert_eq!(
            r.map("regional.orders"),
            mapped("regional.orders", "agg-dc")
        );
    }

    #[test]
    fn mirror_default_policy() {
        let r = m(MappingKind::Mirror, &[], None);
        assert_eq!(r.map("regional.orders"), mapped("orders", "regional"));
        assert_eq!(r.map("regional.my.orders"), mapped("my.orders", "regional"));
        assert_eq!(r.map("orders"), mapped("orders", "agg-dc"));
        assert_eq!(r.map(".orders"), mapped(".orders", "agg-dc"));
    }

    #[test]
    fn mirror_with_known_sources() {
        let r = m(MappingKind::Mirror, &["regional", "eu"], None);
        assert_eq!(r.map("my.orders"), mapped("my.orders", "agg-dc"));
        assert_eq!(r.map("regional.my.orders"), mapped("my.orders", "regional"));
        assert_eq!(r.map("regional.eu.orders"), mapped("orders", "eu"));
        assert_eq!(r.map("regional."), mapped("regional.", "agg-dc"));
    }

    #[test]
    fn regex_rule() {
        let r = m(
            MappingKind::Regex,
            &[],
            Some(r"^mirror_(?P<source>[a-z0-9]+)_(?P<topic>.+)$"),
        );
        assert_eq!(r.map("mirror_dc1_orders"), mapped("orders", "dc1"));
        assert_eq!(r.map("orders"), mapped("orders", "agg-dc"));
    }
}
