//! What `deploy/` ships works: the Prometheus rules pass `promtool check rules` and their unit
//! tests, every alerting rule has one and every metric they use is one the daemons export; the
//! metric names pass `promtool check metrics` and are all `chaperone_<component>_…`; the
//! Grafana provisioning files parse and point at dashboards and data sources that exist; the
//! systemd units (the REST proxy's too) pass `systemd-analyze verify` and are hardened alike,
//! and outlast the daemons' graceful shutdown; the example configurations of the service, the
//! collector and the REST proxy pass their `--check-config`; every binary answers `--version`.
//!
//! Needs `promtool` and `systemd-analyze` (`dev/test` installs them from Debian) and the
//! daemon binaries built next to this test (`cargo test --workspace` builds them); fails, never
//! skips, without them. Needs neither Kafka nor PostgreSQL.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chaperone_tests::programs::built;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn yaml(path: &Path) -> anyhow::Result<Yaml> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs `program`, naming the package that provides it when it is missing.
fn run(program: &str, args: &[&str], package: &str) -> anyhow::Result<Output> {
    Command::new(program).args(args).output().with_context(|| {
        format!("running {program} (dev/test installs it from Debian's `{package}` package)")
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A daemon binary built next to this test binary (`cargo test --workspace` builds both).
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    built(name, &format!("cargo build -p {name}"))
}

fn temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(chaperone_test_support::unique(what));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn prometheus_rules_pass_promtool_check_and_their_unit_tests() -> anyhow::Result<()> {
    for (command, file) in [("check", "rules.yml"), ("test", "rules_test.yml")] {
        let path = deploy("prometheus").join(file);
        let args = [command, "rules", &path.display().to_string()];
        let out = run("promtool", &args, "prometheus")?;
        ensure!(
            out.status.success(),
            "promtool {command} rules {file} failed:\n{}",
            text(&out)
        );
    }
    Ok(())
}

/// The alerting rules of rules.yml: name -> expression.
fn alerting_rules() -> anyhow::Result<Vec<(String, String)>> {
    let rules = yaml(&deploy("prometheus/rules.yml"))?;
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().context("no groups")? {
        for rule in group["rules"]
            .as_sequence()
            .context("a group without rules")?
        {
            if let Some(alert) = rule["alert"].as_str() {
                let expr = rule["expr"].as_str().context("a rule without expr")?;
                out.push((alert.to_owned(), expr.to_owned()));
            }
        }
    }
    Ok(out)
}

/// Every expression of rules.yml, recording rules included.
fn rule_expressions() -> anyhow::Result<Vec<String>> {
    let rules = yaml(&deploy("prometheus/rules.yml"))?;
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().context("no groups")? {
        for rule in group["rules"]
            .as_sequence()
            .context("a group without rules")?
        {
            out.push(
                rule["expr"]
                    .as_str()
                    .context("a rule without expr")?
                    .to_owned(),
            );
        }
    }
    Ok(out)
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it() -> anyhow::Result<()> {
    let alerts = alerting_rules()?;
    ensure!(alerts.len() >= 10, "only {} alerting rules", alerts.len());
    let tests = yaml(&deploy("prometheus/rules_test.yml"))?;
    let mut fired = HashSet::new();
    let mut quiet = HashSet::new();
    for test in tests["tests"].as_sequence().context("no tests")? {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"]
                .as_str()
                .context("a case without alertname")?;
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 {
                fired.insert(name.to_owned());
            } else {
                quiet.insert(name.to_owned());
            }
        }
    }
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        names.len() == alerts.len(),
        "two alerting rules share a name"
    );
    for name in names {
        ensure!(fired.contains(name), "no unit test makes {name} fire");
        ensure!(
            quiet.contains(name),
            "no unit test shows {name} staying quiet"
        );
    }
    Ok(())
}

/// Every metric audit-lib and the two daemons register, on one registry with a series in
/// each labelled family (an empty family is not exported), in the Prometheus text format.
fn exposition() -> anyhow::Result<String> {
    let registry = prometheus::Registry::new();
    chaperone_audit::AuditMetrics::new(&registry)?;
    let service = chaperone_service::metrics::Metrics::new(&registry, "regional", 10)?;
    service.set_lags(&[("orders".to_owned(), 0, 1)]);
    service.records.with_label_values(&["counts"]).inc();
    service.rebalances.with_label_values(&["assign"]).inc();
    let ingest = chaperone_collector::metrics::IngestMetrics::register(&registry)?;
    ingest.records_ingested.with_label_values(&["counts"]).inc();
    ingest
        .records_rejected
        .with_label_values(&["invalid_json"])
        .inc();
    ingest.write_failures.with_label_values(&["postgres"]).inc();
    ingest
        .records_parked
        .with_label_values(&["too_large"])
        .inc();
    ingest.lag_records.with_label_values(&["regional"]).set(1);
    ingest.partitions.with_label_values(&["regional"]).set(1);
    ingest.kafka_errors.with_label_values(&["regional"]).inc();
    ingest
        .retention_deleted
        .with_label_values(&["buckets"])
        .inc();
    ingest
        .api_seconds
        .with_label_values(&["topics"])
        .observe(0.1);
    let reconcile = chaperone_collector::reconcile::ReconcileMetrics::new(&registry)?;
    reconcile.verdicts.with_label_values(&["complete"]).inc();
    reconcile
        .missing_messages
        .with_label_values(&["orders"])
        .set(1);
    reconcile.passes.with_label_values(&["ok"]).inc();
    let alerts = chaperone_collector::alerts::AlertMetrics::new(&registry)?;
    alerts.deliveries.with_label_values(&["ops", "sent"]).inc();
    alerts.parked.with_label_values(&["ops"]).inc();
    Ok(prometheus::TextEncoder::new().encode_to_string(&registry.gather())?)
}

#[test]
fn metric_names_pass_promtool_check_metrics() -> anyhow::Result<()> {
    // `_total` on counters and only there, base units in the name, help on every metric.
    let exported = exposition()?;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("promtool stdin")?,
        exported.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics:\n{}",
        text(&out)
    );
    // One namespace, then the component: `chaperone_<audit|service|collector>_`.
    for line in exported.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).context("TYPE line")?;
        ensure!(
            [
                "chaperone_audit_",
                "chaperone_service_",
                "chaperone_collector_"
            ]
            .iter()
            .any(|p| name.starts_with(p)),
            "{name} is not named chaperone_<component>_…"
        );
    }
    Ok(())
}

#[test]
fn rules_use_only_metrics_the_daemons_export() -> anyhow::Result<()> {
    let exported = exposition()?;
    let mut checked = 0;
    for expr in rule_expressions()? {
        for (start, _) in expr.match_indices("chaperone_") {
            // A recording rule's name (chaperone:…) is not a metric; a metric name ends at the
            // first character that cannot be part of it.
            if start > 0 && expr.as_bytes()[start - 1] == b':' {
                continue;
            }
            let name: String = expr[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| exported.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(&name);
            ensure!(
                exported.contains(&format!("# TYPE {family} ")),
                "{name} (in `{expr}`) is not registered by audit-lib or a daemon"
            );
            checked += 1;
        }
    }
    ensure!(checked >= 20, "only {checked} metric references found");
    Ok(())
}

#[test]
fn grafana_provisioning_parses_and_points_at_what_exists() -> anyhow::Result<()> {
    // Data sources: unique uids, types Grafana knows for the two kinds the dashboards use.
    let mut types = HashSet::new();
    let mut uids = HashSet::new();
    let dir = deploy("grafana/provisioning/datasources");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yml" && e != "yaml") {
            continue;
        }
        files += 1;
        let doc = yaml(&path)?;
        ensure!(
            doc["apiVersion"].as_u64() == Some(1),
            "{}: apiVersion 1",
            path.display()
        );
        for ds in doc["datasources"].as_sequence().context("no datasources")? {
            let uid = ds["uid"].as_str().context("a data source without uid")?;
            ensure!(uids.insert(uid.to_owned()), "data source uid {uid} twice");
            let kind = ds["type"].as_str().context("a data source without type")?;
            ensure!(
                ds["url"].as_str().is_some_and(|u| !u.is_empty()),
                "data source {uid}: no url"
            );
            ensure!(
                ds["password"].is_null() && ds["basicAuthPassword"].is_null(),
                "data source {uid}: a password in clear; use secureJsonData with $__file{{…}}"
            );
            types.insert(kind.to_owned());
        }
    }
    ensure!(files > 0, "no data source file in {}", dir.display());

    // Dashboard provider: a file provider whose path, installed as deploy/README.md says,
    // is dashboards/ of this repository.
    let provider_file = deploy("grafana/provisioning/dashboards/chaperone.yml");
    let doc = yaml(&provider_file)?;
    ensure!(
        doc["apiVersion"].as_u64() == Some(1),
        "provider: apiVersion 1"
    );
    let providers = doc["providers"].as_sequence().context("no providers")?;
    ensure!(providers.len() == 1, "one provider expected");
    let provider = &providers[0];
    ensure!(provider["type"].as_str() == Some("file"), "a file provider");
    let path = provider["options"]["path"]
        .as_str()
        .context("provider without options.path")?;
    const INSTALLED: &str = "/usr/share/chaperone/";
    let relative = path
        .strip_prefix(INSTALLED)
        .with_context(|| format!("provider path {path} is not under {INSTALLED}"))?;
    let dashboards_dir = repo().join(relative);
    let readme = std::fs::read_to_string(deploy("README.md"))?;
    ensure!(
        readme.contains(path),
        "deploy/README.md does not say how to install dashboards into {path}"
    );
    let mut dashboards = 0;
    for entry in std::fs::read_dir(&dashboards_dir)
        .with_context(|| format!("provider path {path} maps to {}", dashboards_dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        dashboards += 1;
        let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        check_datasources(&path, &dashboard, &types, &uids)?;
    }
    ensure!(dashboards >= 2, "{dashboards} dashboards in {path}");
    Ok(())
}

/// Every data source a dashboard refers to is provisioned: a literal uid must be one of
/// `uids`; a `${var}` must be a data-source variable whose plugin type is provisioned.
fn check_datasources(
    path: &Path,
    dashboard: &Json,
    types: &HashSet<String>,
    uids: &HashSet<String>,
) -> anyhow::Result<()> {
    let name = path.display();
    let mut variables = HashMap::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "datasource" {
            let var = v["name"].as_str().context("a variable without name")?;
            let kind = v["query"]
                .as_str()
                .context("a data-source variable without type")?;
            ensure!(
                types.contains(kind),
                "{name}: variable `{var}` wants a {kind} data source; none is provisioned"
            );
            variables.insert(var.to_owned(), kind.to_owned());
        }
    }
    let mut refs = Vec::new();
    collect_datasources(dashboard, &mut refs);
    ensure!(!refs.is_empty(), "{name}: no data source referenced");
    for r in refs {
        let uid = r["uid"].as_str().unwrap_or_default();
        if let Some(var) = uid.strip_prefix("${").and_then(|u| u.strip_suffix('}')) {
            let kind = variables
                .get(var)
                .with_context(|| format!("{name}: data source {uid} is not a variable"))?;
            if let Some(t) = r["type"].as_str() {
                ensure!(t == kind, "{name}: {uid} is a {kind}, used as a {t}");
            }
        } else {
            ensure!(
                uids.contains(uid),
                "{name}: data source uid `{uid}` is not provisioned"
            );
        }
    }
    Ok(())
}

fn collect_datasources<'a>(value: &'a Json, out: &mut Vec<&'a Json>) {
    match value {
        Json::Object(map) => {
            for (key, v) in map {
                if key == "datasource" && v.is_object() {
                    out.push(v);
                }
                collect_datasources(v, out);
            }
        }
        Json::Array(items) => items.iter().for_each(|v| collect_datasources(v, out)),
        _ => {}
    }
}

/// A unit's settings (last value of each key wins, as in systemd).
fn unit_settings(path: &Path) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    Ok(out)
}

const UNITS: [(&str, &str); 3] = [
    ("chaperone-service@.service", "chaperone-service"),
    ("chaperone-collector.service", "chaperone-collector"),
    ("chaperone-rest-proxy.service", "chaperone-rest-proxy"),
];

#[test]
fn systemd_units_pass_systemd_analyze_verify_and_are_hardened() -> anyhow::Result<()> {
    // `verify` checks that ExecStart's program exists: a copy of each unit runs the binaries
    // built here instead of /usr/local/bin (the template as an instance, as systemd loads it).
    let dir = temp_dir("units")?;
    let mut args = vec!["verify".to_owned(), "--man=no".to_owned()];
    for (unit, program) in UNITS {
        let path = deploy("systemd").join(unit);
        let settings = unit_settings(&path)?;
        let one = |key: &str| -> anyhow::Result<&str> {
            settings
                .get(key)
                .and_then(|v| v.last())
                .map(String::as_str)
                .with_context(|| format!("{unit}: no {key}="))
        };
        for (key, want) in [
            ("User", "chaperone"),
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
            ("Restart", "on-failure"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            ensure!(one(key)? == want, "{unit}: {key}= should be {want:?}");
        }
        let installed = format!("/usr/local/bin/{program}");
        ensure!(
            one("ExecStart")?.starts_with(&installed),
            "{unit}: ExecStart does not run {installed}"
        );
        let built = binary(program)?;
        let text =
            std::fs::read_to_string(&path)?.replace(&installed, &built.display().to_string());
        let name = unit.replace("@.", "@regional-eu.");
        std::fs::write(dir.join(&name), text)?;
        args.push(dir.join(&name).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("systemd-analyze", &args, "systemd")?;
    // `verify` only warns about unknown keys and bad values: any output is a failure too.
    ensure!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        text(&out)
    );
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// `"120s"`, `"2min"`, `"90"` (seconds) as systemd reads TimeoutStopSec.
fn systemd_seconds(value: &str) -> anyhow::Result<Duration> {
    let v = value.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("min") {
        (n, 60)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1)
    } else {
        (v, 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("TimeoutStopSec={value}"))?;
    Ok(Duration::from_secs(n * scale))
}

fn stop_timeout(unit: &str) -> anyhow::Result<Duration> {
    let settings = unit_settings(&deploy("systemd").join(unit))?;
    let value = settings
        .get("TimeoutStopSec")
        .and_then(|v| v.last())
        .with_context(|| format!("{unit}: no TimeoutStopSec"))?;
    systemd_seconds(value)
}

#[test]
fn stop_timeouts_outlast_the_graceful_shutdown_of_the_example_configs() -> anyhow::Result<()> {
    // chaperone-service: the transaction in flight and the final one, two Kafka calls of up to
    // kafka_timeout each (sending the offsets, committing).
    let service = chaperone_service::Config::from_file(
        &deploy("config/chaperone-service.toml")
            .display()
            .to_string(),
    )?;
    let bound = service.kafka_timeout * 4;
    let timeout = stop_timeout("chaperone-service@.service")?;
    ensure!(
        timeout > bound,
        "chaperone-service: TimeoutStopSec {timeout:?} is not above 4 x kafka_timeout {bound:?}"
    );
    // collector: the last batch retried for shutdown_grace, a retry sleeping up to retry_max,
    // dead letters waiting up to dlq_timeout, a connection up to acquire_timeout.
    let collector = chaperone_collector::Config::from_toml(&std::fs::read_to_string(deploy(
        "config/collector.toml",
    ))?)?;
    let bound = collector.ingest.shutdown_grace
        + collector.ingest.retry_max
        + collector.ingest.dlq_timeout
        + collector.database.acquire_timeout;
    let timeout = stop_timeout("chaperone-collector.service")?;
    ensure!(
        timeout > bound,
        "collector: TimeoutStopSec {timeout:?} is not above its graceful stop {bound:?}"
    );
    Ok(())
}

/// Copies the example configs into `dir` with `/etc/chaperone/` pointing at `dir`, and writes
/// every secret and certificate file they name there. Returns the configs (chaperone-service,
/// collector, REST proxy) and the secret values written.
fn installed_examples(dir: &Path) -> anyhow::Result<(Vec<PathBuf>, Vec<String>)> {
    let root = format!("{}/", dir.display());
    let mut secrets = Vec::new();
    let mut paths = Vec::new();
    // The proxy's own certificate and its key, a pair.
    let proxy_key = rcgen::KeyPair::generate()?;
    let proxy_cert = rcgen::CertificateParams::new(vec!["rest-proxy.internal".to_owned()])?
        .self_signed(&proxy_key)?;
    for (name, file) in [
        ("chaperone-service.toml", "service.toml"),
        ("collector.toml", "collector.toml"),
        ("rest-proxy.toml", "rest-proxy.toml"),
    ] {
        let text = std::fs::read_to_string(deploy("config").join(name))?;
        let settings: String = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        for (at, _) in settings.match_indices("/etc/chaperone/") {
            let path: String = settings[at..]
                .chars()
                .take_while(|c| !matches!(c, '"' | '}' | '\'' | ' '))
                .collect();
            let local = dir.join(path.trim_start_matches("/etc/chaperone/"));
            std::fs::create_dir_all(local.parent().context("a file path")?)?;
            if path.ends_with("/rest-proxy.pem") {
                std::fs::write(&local, proxy_cert.pem())?;
            } else if path.ends_with("/rest-proxy.key") {
                let pem = proxy_key.serialize_pem();
                secrets.extend(pem.lines().nth(1).map(str::to_owned));
                std::fs::write(&local, pem)?;
            } else if path.ends_with(".pem") {
                std::fs::write(&local, test_ca_pem()?)?;
            } else {
                let value = format!("secret-{}-{}", secrets.len(), uuid::Uuid::new_v4());
                let content = if path.contains("database-url") {
                    format!("postgres://chaperone:{value}@db.internal/chaperone\n")
                } else {
                    format!("{value}\n")
                };
                std::fs::write(&local, content)?;
                secrets.push(value);
            }
        }
        let out = dir.join(file);
        std::fs::write(&out, text.replace("/etc/chaperone/", &root))?;
        paths.push(out);
    }
    Ok((paths, secrets))
}

fn test_ca_pem() -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "deploy test CA");
    let key = rcgen::KeyPair::generate()?;
    Ok(params.self_signed(&key)?.pem())
}

/// Runs `binary --config <config> --check-config` with a clean environment for the secrets.
fn check_config(binary: &Path, config: &Path) -> anyhow::Result<Output> {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .arg("--check-config")
        .env_remove("DATABASE_URL")
        .env_remove("CHAPERONE_COLLECTOR_API_TOKEN")
        .env("RUST_LOG", "debug")
        .output()
        .with_context(|| format!("running {}", binary.display()))
}

#[test]
fn example_configs_pass_check_config_and_bad_ones_are_named() -> anyhow::Result<()> {
    let service_bin = binary("chaperone-service")?;
    let collector_bin = binary("chaperone-collector")?;
    let proxy_bin = binary("chaperone-rest-proxy")?;
    let dir = temp_dir("deploy-config")?;
    let (configs, secrets) = installed_examples(&dir)?;
    let [service, collector, proxy] = <[PathBuf; 3]>::try_from(configs)
        .map_err(|c| anyhow::anyhow!("three example configs expected: {c:?}"))?;
    ensure!(
        secrets.len() >= 9,
        "the examples name {} secrets",
        secrets.len()
    );
    let daemons = [
        (&service_bin, &service),
        (&collector_bin, &collector),
        (&proxy_bin, &proxy),
    ];

    for (bin, config) in daemons {
        let out = check_config(bin, config)?;
        let all = text(&out);
        ensure!(
            out.status.success(),
            "{} --check-config failed on the example: {all}",
            bin.display()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            stdout.lines().count() == 1 && stdout.starts_with("configuration is valid"),
            "one line of OK expected: {stdout:?}"
        );
        for s in &secrets {
            ensure!(!all.contains(s.as_str()), "a secret was printed: {all}");
        }
    }

    // A secret file that cannot be read: the key and the file are named, nothing starts.
    let broken = dir.join("broken-service.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&service)?.replace("kafka-regional-eu-password", "nope"),
    )?;
    let out = check_config(&service_bin, &broken)?;
    let all = text(&out);
    ensure!(!out.status.success(), "a missing secret file passed: {all}");
    ensure!(
        all.contains("kafka.\"sasl.password\"") && all.contains("secrets/nope"),
        "the error names neither the key nor the file: {all}"
    );

    // A webhook CA file that is not a certificate: the webhook and the file are named.
    let ca = dir.join("tls/internal-ca.pem");
    std::fs::write(&ca, "not a certificate\n")?;
    let out = check_config(&collector_bin, &collector)?;
    let all = text(&out);
    ensure!(!out.status.success(), "a bad CA file passed: {all}");
    ensure!(
        all.contains("alerts.webhooks[0].ca_file")
            && all.contains("webhook `ops`")
            && all.contains("internal-ca.pem"),
        "the error names neither the webhook nor the file: {all}"
    );

    // An unknown key in each daemon's config.
    for (bin, config) in daemons {
        let typo = dir.join("typo.toml");
        std::fs::write(
            &typo,
            std::fs::read_to_string(config)?
                .replace("[topics]", "flush_intervall = \"5s\"\n[topics]")
                .replace("[retention]", "[retention]\ndayz = 3")
                .replace("[idempotency]", "[idempotency]\nwindoww = \"1m\""),
        )?;
        let out = check_config(bin, &typo)?;
        let all = text(&out);
        ensure!(
            !out.status.success(),
            "{}: an unknown key passed",
            bin.display()
        );
        ensure!(
            all.contains("flush_intervall") || all.contains("dayz") || all.contains("windoww"),
            "the unknown key is not named: {all}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn every_binary_prints_its_version() -> anyhow::Result<()> {
    for (_, name) in UNITS {
        let out = Command::new(binary(name)?).arg("--version").output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || stdout.trim() != format!("{name} {}", env!("CARGO_PKG_VERSION"))
        {
            bail!("{name} --version: {} {}", out.status, text(&out));
        }
    }
    Ok(())
}
