//! Topic mapping across mirrors.
//!
//! On the aggregate cluster MirrorMaker 2 writes `orders` from the `regional` cluster to
//! `regional.orders`. To line aggregate counts up with the regional counts they came from,
//! each physical topic maps to a logical topic and the datacenter the messages originated in.
//! Topics the rule does not match are local: logical = physical, datacenter = the configured
//! one.

use regex::Regex;

use crate::config::MappingKind;

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
    /// Builds the rule; `pattern` must be valid and have groups `source` and `topic` when
    /// `kind` is [`MappingKind::Regex`] (checked by config validation).
    pub fn new(
        kind: MappingKind,
        separator: &str,
        sources: &[String],
        pattern: Option<&str>,
        local_datacenter: &str,
    ) -> Result<Self, regex::Error> {
        Ok(Self {
            kind,
            separator: separator.to_owned(),
            sources: sources.to_vec(),
            pattern: pattern.map(Regex::new).transpose()?,
            local_datacenter: local_datacenter.to_owned(),
        })
    }

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
        let s: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        Mapping::new(kind, ".", &s, pattern, "agg-dc").expect("valid")
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
