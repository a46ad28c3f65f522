//! The Grafana dashboards in `dashboards/` are valid: every dashboard parses, every SQL query
//! runs against the schema the collector's migrations create, with data in it, and every
//! PromQL expression passes `promtool`.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context as _;
use chaperone_test_support::TestDb;
use serde_json::Value;

fn dashboards() -> anyhow::Result<Vec<(PathBuf, Value)>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            let json: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            out.push((path, json));
        }
    }
    anyhow::ensure!(!out.is_empty(), "no dashboards in {}", dir.display());
    Ok(out)
}

fn targets(dashboard: &Value) -> impl Iterator<Item = &Value> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
}

#[test]
fn dashboards_are_well_formed() -> anyhow::Result<()> {
    let mut uids = HashSet::new();
    for (path, d) in dashboards()? {
        let name = path.display();
        let uid = d["uid"]
            .as_str()
            .with_context(|| format!("{name}: no uid"))?;
        assert!(uids.insert(uid.to_owned()), "{name}: duplicate uid {uid}");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: no title"
        );
        let panels = d["panels"]
            .as_array()
            .with_context(|| format!("{name}: no panels"))?;
        assert!(!panels.is_empty(), "{name}: no panels");
        let mut ids = HashSet::new();
        for p in panels {
            assert!(
                ids.insert(p["id"].as_i64()),
                "{name}: duplicate panel id {}",
                p["id"]
            );
            assert!(
                p["title"].as_str().is_some(),
                "{name}: panel {} has no title",
                p["id"]
            );
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{name}: panel {} has no query",
                p["title"]
            );
        }
    }
    Ok(())
}

/// Replaces the Grafana macros and variables the dashboards use with literal values.
fn expand(sql: &str) -> String {
    let expanded = sql
        .replace("$__unixEpochFrom()", "1764000000")
        .replace("$__unixEpochTo()", "1764200000")
        .replace("$__timeFrom()", "'2025-11-24T16:00:00Z'")
        .replace("$topic", "orders");
    assert!(
        !expanded.contains('$'),
        "unexpanded macro or variable in:\n{sql}"
    );
    expanded
}

#[tokio::test]
async fn sql_panels_run_against_the_schema() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // One bucket of one topic at two tiers, a verdict, an incident and progress, so every query
    // has rows to chew on.
    sqlx::raw_sql(
        "INSERT INTO audit_topics (topic) VALUES ('orders');
         INSERT INTO audit_counts (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition, count, latency)
         VALUES ('orders', 1764000060000, 60000, 'producer', 'dc1', 'regional', 0, 10, ''::bytea),
                ('orders', 1764000060000, 60000, 'regional', 'dc1', 'regional', 0, 9, ''::bytea);
         INSERT INTO audit_progress (tier, cluster, datacenter, topic, physical_topic, partition, watermark_ms, bucket_width_ms, last_emitted_ms, host, instance)
         VALUES ('regional', 'regional', 'dc1', 'orders', 'orders', 0, 1764000120000, 60000, 1764000125000, 'h', 'i');
         INSERT INTO reconcile_verdicts (edge, topic, datacenter, partition, bucket_start_ms, bucket_width_ms, from_tier, to_tier, status, expected, actual, difference, missing, final_reason, first_judged_at, changed_at)
         VALUES ('producer->regional', 'orders', 'dc1', -1, 1764000060000, 60000, 'producer', 'regional', 'missing', 10, 9, -1, 1, 'progress', now(), now());
         INSERT INTO alert_incidents (topic, edge, datacenter, from_tier, to_tier, status, bucket_width_ms, first_bucket_start_ms, last_bucket_start_ms, opened_at)
         VALUES ('orders', 'producer->regional', 'dc1', 'producer', 'regional', 'open', 60000, 1764000060000, 1764000060000, now());",
    )
    .execute(&db.pool)
    .await
    .context("seeding the test database")?;

    let mut ran = 0;
    for (path, d) in dashboards()? {
        let mut queries: Vec<String> = targets(&d)
            .filter_map(|t| t["rawSql"].as_str().map(str::to_owned))
            .collect();
        for var in d["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "query"
                && var["datasource"]["type"] == "grafana-postgresql-datasource"
            {
                queries.push(var["query"].as_str().context("variable query")?.to_owned());
            }
        }
        for sql in queries {
            let rows = sqlx::raw_sql(&expand(&sql))
                .fetch_all(&db.pool)
                .await
                .with_context(|| format!("{}: query failed:\n{sql}", path.display()))?;
            assert!(
                !rows.is_empty(),
                "{}: query returned no rows on seeded data:\n{sql}",
                path.display()
            );
            ran += 1;
        }
    }
    assert!(
        ran >= 5,
        "expected the dashboards to hold SQL panels, ran {ran}"
    );
    db.drop_db().await
}

#[test]
fn promql_panels_pass_promtool() -> anyhow::Result<()> {
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    let mut n = 0;
    for (_, d) in dashboards()? {
        for expr in targets(&d).filter_map(|t| t["expr"].as_str()) {
            let quoted = serde_json::to_string(expr)?;
            rules.push_str(&format!(
                "      - record: dashboard:expr{n}\n        expr: {quoted}\n"
            ));
            n += 1;
        }
    }
    assert!(
        n >= 10,
        "expected the dashboards to hold PromQL panels, found {n}"
    );
    let dir = std::env::temp_dir().join(chaperone_test_support::unique("promtool"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("dashboards.rules.yml");
    std::fs::write(&file, rules)?;
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .context("running promtool (dev/test installs it from Debian's prometheus package)")?;
    assert!(
        out.status.success(),
        "promtool rejected a dashboard expression:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
