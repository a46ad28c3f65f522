//! librdkafka client configurations: defaults, then the user's properties, then the settings
//! a daemon's guarantees rely on, forced last so nobody turns them off by accident. What was
//! forced over a user value is logged at WARN, and the effective properties at INFO with
//! secrets redacted by `chaperone_audit::config`'s one rule.

use std::collections::BTreeMap;

use chaperone_audit::config::{REDACTED, is_secret_property, redacted_properties};
use rdkafka::ClientConfig;

/// Sets, in `props`, the librdkafka property of every variable named `<prefix><PROPERTY>`:
/// the rest of the name lower-cased, with `_` read as `.` (with prefix `CHAPERONE_KAFKA__`,
/// `CHAPERONE_KAFKA__SASL_PASSWORD` sets `sasl.password`). This is how secrets reach a
/// daemon without a file.
pub fn apply_env<I: IntoIterator<Item = (String, String)>>(
    props: &mut BTreeMap<String, String>,
    prefix: &str,
    vars: I,
) {
    for (name, value) in vars {
        if let Some(prop) = name.strip_prefix(prefix) {
            let prop = prop.to_ascii_lowercase().replace('_', ".");
            if !prop.is_empty() {
                props.insert(prop, value);
            }
        }
    }
}

/// Builds a client configuration from `defaults`, then the user's `layers` in order, then
/// `forced`. `client` and `cluster` name it in the logs.
pub fn client_config(
    client: &str,
    cluster: &str,
    defaults: &[(&str, String)],
    layers: &[&BTreeMap<String, String>],
    forced: &[(&str, String)],
) -> ClientConfig {
    let props = layered(client, cluster, defaults, layers, forced);
    tracing::info!(
        client,
        cluster,
        properties = ?redacted_properties(&props),
        "kafka client properties"
    );
    let mut cfg = ClientConfig::new();
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg
}

fn layered(
    client: &str,
    cluster: &str,
    defaults: &[(&str, String)],
    layers: &[&BTreeMap<String, String>],
    forced: &[(&str, String)],
) -> BTreeMap<String, String> {
    let mut props: BTreeMap<String, String> = defaults
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    for layer in layers {
        props.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for (k, v) in forced {
        match props.get(*k) {
            Some(user) if user != v => {
                let shown = |s: &str| {
                    if is_secret_property(k) {
                        REDACTED.to_owned()
                    } else {
                        s.to_owned()
                    }
                };
                tracing::warn!(
                    client,
                    cluster,
                    property = *k,
                    configured = %shown(user),
                    forced = %shown(v),
                    "overriding a safety-critical kafka property"
                );
            }
            _ => tracing::debug!(client, cluster, property = *k, "forcing kafka property"),
        }
        props.insert((*k).to_owned(), v.clone());
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_settings_win_over_user_ones_and_defaults_lose_to_them() {
        let user: BTreeMap<String, String> = [
            ("enable.auto.commit", "true"),
            ("auto.offset.reset", "latest"),
            ("sasl.password", "pw"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let cfg = client_config(
            "consumer",
            "regional",
            &[
                ("auto.offset.reset", "earliest".to_owned()),
                ("linger.ms", "1".to_owned()),
            ],
            &[&user],
            &[("enable.auto.commit", "false".to_owned())],
        );
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));
        assert_eq!(cfg.get("auto.offset.reset"), Some("latest"));
        assert_eq!(cfg.get("linger.ms"), Some("1"));
        assert_eq!(cfg.get("sasl.password"), Some("pw"));
    }
}
