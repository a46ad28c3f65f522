//! The pages themselves: pure functions from what was read to HTML (maud), so they can be
//! tested and measured without a server. Every number a test or a person may compare with
//! the API is also written in a `data-` attribute of its element.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::chart::{self, BadBucketMark};
use super::format::{duration_ms, time, time_ms, utc_ms};
use crate::alerts::Incident;
use crate::reconcile::{Verdict, VerdictChange, VerdictStatus};
use crate::store::read::TierWatermark;
use crate::store::{BucketSummary, LatencySummary, ParkedRow, TierSummary};

/// Topics on one page of `/`.
pub const PAGE_SIZE: usize = 100;

const CSS: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}header form{margin-left:auto}
main{padding:1rem 1.2rem;max-width:1400px}h1{font-size:1.3rem;margin:.2rem 0 .8rem}h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:.8rem}
th,td{border-bottom:1px solid #e3e6ea;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 .45rem;border-radius:.6rem;font-size:.85em;font-weight:600;background:#d9dde3}
.complete{background:#d3f2dc;color:#125c2b}.missing{background:#fbd5d5;color:#8a1111}
.duplicated{background:#ffe6c7;color:#7a4300}.tier_silent,.lagging,.upstream_incomplete,.redelivered{background:#fff3bf;color:#6b5300}
.open{background:#fbd5d5;color:#8a1111}.resolved{background:#d3f2dc;color:#125c2b}.superseded{background:#e4e0f5}
.pending{background:#fff3bf;color:#6b5300}.sent{background:#d3f2dc;color:#125c2b}.parked{background:#fbd5d5;color:#8a1111}
.rel{color:#5c6670}.muted{color:#5c6670}.err{color:#8a1111;font-weight:600}
form.filters{display:flex;gap:.5rem;align-items:center;margin-bottom:.8rem;flex-wrap:wrap}
input,select,button{font:inherit;padding:.2rem .4rem}
svg.chart{width:100%;height:auto;background:#fff;border:1px solid #e3e6ea}
svg .axis{stroke:#9aa3ad}svg .tick,svg .legend{font-size:11px;fill:#5c6670}
svg .series{fill:none;stroke-width:1.8}svg .mark rect{fill:#f5a3a3;opacity:.45}
svg .mark.duplicated rect{fill:#ffc27a}svg .mark text{font-size:11px;font-weight:700;fill:#8a1111}
nav.pages a,nav.pages span{margin-right:.6rem}dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dl.facts dt{font-weight:600}dl.facts dd{margin:0}details{margin:.4rem 0}
"#;

/// The frame of every page: embedded CSS, a header linking home and, when a token is in use,
/// a logout button.
pub fn layout(title: &str, with_logout: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Chaperone" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a href="/" { "Chaperone" }
                    span.muted { "audit status" }
                    @if with_logout {
                        form method="post" action="/logout" { button type="submit" { "Log out" } }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A verdict status as a coloured badge.
pub fn badge(status: &str) -> Markup {
    html! { span.badge.(status) { (status.replace('_', " ")) } }
}

/// How bad a topic's worst verdict is, worst highest.
pub fn severity(status: Option<VerdictStatus>) -> u8 {
    match status {
        Some(VerdictStatus::Missing) => 6,
        Some(VerdictStatus::Duplicated) => 5,
        Some(VerdictStatus::TierSilent) => 4,
        Some(VerdictStatus::UpstreamIncomplete) => 3,
        Some(VerdictStatus::Lagging | VerdictStatus::Redelivered) => 2,
        Some(VerdictStatus::Complete) => 1,
        None => 0,
    }
}

fn edge_label(edge: &str, datacenter: Option<&str>) -> String {
    match datacenter {
        Some(dc) if !dc.is_empty() => format!("{edge} ({dc})"),
        _ => edge.to_owned(),
    }
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// One topic's line on `/`.
#[derive(Debug, Clone)]
pub struct TopicLine {
    /// Logical topic.
    pub topic: String,
    /// When the collector last stored a record of it.
    pub last_seen_at: DateTime<Utc>,
    /// Latest bucket with counts.
    pub last_bucket_start_ms: Option<i64>,
    /// Latest topic-level verdict per edge and datacenter (as `/api/v1/topics`).
    pub verdicts: Vec<Verdict>,
    /// Open incidents of the topic (as `/api/v1/alerts?status=open`).
    pub open_incidents: Vec<Incident>,
    /// Watermark of every tier.
    pub watermarks: Vec<TierWatermark>,
}

impl TopicLine {
    /// The worst of the latest verdicts, `None` before the first.
    pub fn worst(&self) -> Option<VerdictStatus> {
        self.verdicts
            .iter()
            .map(|v| v.status)
            .max_by_key(|s| severity(Some(*s)))
    }

    /// Messages missing in the latest verdicts.
    pub fn latest_missing(&self) -> i64 {
        self.verdicts.iter().map(|v| v.missing).sum()
    }
}

/// What `/` shows.
#[derive(Debug, Clone)]
pub struct IndexPage {
    /// The collector's clock.
    pub now: DateTime<Utc>,
    /// Topics of this page, worst first.
    pub lines: Vec<TopicLine>,
    /// Topics known.
    pub total: usize,
    /// Topics matching the filters.
    pub matching: usize,
    /// This page, from 1.
    pub page: usize,
    /// Pages of matching topics.
    pub pages: usize,
    /// `status` filter as given.
    pub status: Option<String>,
    /// `q` filter as given.
    pub q: Option<String>,
    /// Open incidents, newest first (the first few are listed).
    pub open: Vec<Incident>,
    /// Records the dead-letter topic did not take: how many are parked, and the latest.
    pub parked: (i64, Vec<ParkedRow>),
    /// Show the logout button.
    pub with_logout: bool,
}

/// Query string of `/` for `page` keeping the filters.
fn index_query(status: Option<&str>, q: Option<&str>, page: usize) -> String {
    let mut parts = Vec::new();
    if let Some(s) = status {
        parts.push(format!("status={}", super::format::encode(s)));
    }
    if let Some(q) = q {
        parts.push(format!("q={}", super::format::encode(q)));
    }
    if page > 1 {
        parts.push(format!("page={page}"));
    }
    if parts.is_empty() {
        "/".to_owned()
    } else {
        format!("/?{}", parts.join("&"))
    }
}

fn watermark_cells(now: DateTime<Utc>, marks: &[TierWatermark]) -> Markup {
    html! {
        @for w in marks {
            @let lag = now.timestamp_millis() - w.watermark_ms;
            div.lag data-tier=(w.tier) data-lag-ms=(lag) title=(format!("watermark {}", utc_ms(w.watermark_ms))) {
                (w.tier) ": " (duration_ms(lag.max(0))) " behind"
            }
        }
    }
}

/// `/`: every topic with its latest verdict per edge, worst first.
pub fn index(p: &IndexPage) -> Markup {
    let statuses: Vec<&str> = std::iter::once("bad")
        .chain(VerdictStatus::ALL.iter().map(|s| s.as_str()))
        .chain(std::iter::once("unjudged"))
        .collect();
    let body = html! {
        h1 { "Topics" }
        p.muted {
            (p.total) " topics, " (p.matching) " matching; "
            span #open-incidents data-open=(p.open.len()) { (p.open.len()) " open incidents" }
            "; as of " (time(p.now, p.now))
        }
        form.filters method="get" action="/" {
            label { "Status "
                select name="status" {
                    option value="" selected[p.status.is_none()] { "any" }
                    @for s in &statuses {
                        option value=(s) selected[p.status.as_deref() == Some(*s)] { (s.replace('_', " ")) }
                    }
                }
            }
            label { "Topic " input type="search" name="q" value=(p.q.as_deref().unwrap_or("")) placeholder="part of the name"; }
            button type="submit" { "Filter" }
        }
        @if !p.open.is_empty() {
            h2 { "Open incidents" }
            table #incidents {
                tr { th { "Incident" } th { "Topic" } th { "Edge" } th.n { "Worst bucket missing" } th.n { "Bad buckets" } th { "Opened" } }
                @for a in p.open.iter().take(20) {
                    tr.incident data-id=(a.id) data-topic=(a.topic) data-max-missing=(a.max_missing) {
                        td { a href=(format!("/incidents/{}", a.id)) { "#" (a.id) } }
                        td { a href=(super::format::topic_href(&a.topic)) { (a.topic) } }
                        td { (edge_label(&a.edge, Some(&a.datacenter))) }
                        td.n { (a.max_missing) }
                        td.n { (a.bad_buckets) " of " (a.buckets) }
                        td { (time(p.now, a.opened_at)) }
                    }
                }
            }
            @if p.open.len() > 20 { p.muted { "and " (p.open.len() - 20) " more" } }
        }
        @if p.parked.0 > 0 {
            h2 { "Parked records" }
            p #parked data-parked=(p.parked.0) {
                strong.err { (p.parked.0) " rejected audit records" }
                " could not be dead-lettered and are parked in PostgreSQL (table "
                code { "ingest_parked" } ", " a href="/api/v1/parked" { "/api/v1/parked" } "); their counts are not stored."
            }
            table #parked-records {
                tr { th { "Source" } th { "Reason" } th { "Why the dead-letter topic did not take it" } th.n { "Bytes" } th { "Parked" } }
                @for r in &p.parked.1 {
                    tr.parked data-reason=(r.reason) {
                        td { (r.cluster) "/" (r.topic) "/" (r.partition) "@" (r.offset) }
                        td { span title=(r.error) { (r.reason) } }
                        td { (r.dlq_error) }
                        td.n { (r.payload_len.unwrap_or(0)) }
                        td { (time(p.now, r.parked_at)) }
                    }
                }
            }
        }
        h2 { "Latest verdicts" }
        table #topics {
            tr { th { "Topic" } th { "Latest verdict per edge" } th.n { "Open incidents" } th { "Watermark lag" } th { "Last seen" } }
            @for l in &p.lines {
                @let worst = l.worst();
                tr.topic data-topic=(l.topic) data-status=(worst.map_or("unjudged", |s| s.as_str()))
                    data-missing=(l.latest_missing()) data-open-incidents=(l.open_incidents.len()) {
                    td { a href=(super::format::topic_href(&l.topic)) { (l.topic) } }
                    td {
                        @if l.verdicts.is_empty() { span.muted { "no verdict yet" } }
                        @for v in &l.verdicts {
                            div.verdict data-edge=(v.edge) data-datacenter=(v.datacenter.as_deref().unwrap_or(""))
                                data-status=(v.status.as_str()) data-expected=(v.expected) data-actual=(v.actual)
                                data-missing=(v.missing) data-bucket=(v.bucket_start_ms) {
                                (edge_label(&v.edge, v.datacenter.as_deref())) " " (badge(v.status.as_str()))
                                @if v.missing > 0 { " " strong.err { (v.missing) " missing" } }
                                @if v.difference > 0 { " " strong { "+" (v.difference) " duplicated" } }
                                " " span.muted { "bucket " (time_ms(p.now, v.bucket_start_ms)) }
                            }
                        }
                    }
                    td.n {
                        @if l.open_incidents.is_empty() { "0" }
                        @else {
                            @for a in &l.open_incidents {
                                a.incident-link href=(format!("/incidents/{}", a.id)) { "#" (a.id) } " "
                            }
                            "(" (l.open_incidents.len()) ", worst bucket "
                            (l.open_incidents.iter().map(|a| a.max_missing).max().unwrap_or(0)) " missing)"
                        }
                    }
                    td { (watermark_cells(p.now, &l.watermarks)) }
                    td { (time(p.now, l.last_seen_at)) }
                }
            }
        }
        @if p.lines.is_empty() { p.muted { "No topic matches." } }
        nav.pages {
            @if p.page > 1 { a href=(index_query(p.status.as_deref(), p.q.as_deref(), p.page - 1)) { "← previous" } }
            span { "page " (p.page) " of " (p.pages.max(1)) }
            @if p.page < p.pages { a href=(index_query(p.status.as_deref(), p.q.as_deref(), p.page + 1)) { "next →" } }
        }
    };
    layout("Topics", p.with_logout, body)
}

/// What `/topics/{topic}` shows.
#[derive(Debug, Clone)]
pub struct TopicPage {
    /// The collector's clock.
    pub now: DateTime<Utc>,
    /// Logical topic.
    pub topic: String,
    /// Range start, epoch ms.
    pub from_ms: i64,
    /// Range end (exclusive), epoch ms.
    pub to_ms: i64,
    /// Counts per bucket and tier (as `/api/v1/topics/{topic}/buckets`).
    pub buckets: Vec<BucketSummary>,
    /// Every tier over the whole range, histograms merged exactly.
    pub range_tiers: Vec<TierSummary>,
    /// Current verdicts of the range, topic-level and per partition.
    pub verdicts: Vec<Verdict>,
    /// Every judgement and change of the range, oldest first.
    pub history: Vec<VerdictChange>,
    /// Watermark of every tier.
    pub watermarks: Vec<TierWatermark>,
    /// Show the logout button.
    pub with_logout: bool,
}

/// Per edge and datacenter: buckets, bad buckets, expected, actual, missing and duplicated
/// over the topic-level verdicts of the range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeTotals {
    /// Edge name.
    pub edge: String,
    /// Datacenter, '' when summed.
    pub datacenter: String,
    /// Buckets judged.
    pub buckets: usize,
    /// Buckets not complete.
    pub bad: usize,
    /// Upstream messages.
    pub expected: i64,
    /// Downstream messages.
    pub actual: i64,
    /// Messages missing downstream.
    pub missing: i64,
    /// Messages seen more than once downstream.
    pub duplicated: i64,
}

/// [`EdgeTotals`] of the topic-level verdicts among `verdicts`, by edge and datacenter.
pub fn edge_totals(verdicts: &[Verdict]) -> Vec<EdgeTotals> {
    let mut by: std::collections::BTreeMap<(&str, &str), EdgeTotals> = Default::default();
    for v in verdicts.iter().filter(|v| v.partition.is_none()) {
        let datacenter = v.datacenter.as_deref().unwrap_or("");
        let t = by
            .entry((&v.edge, datacenter))
            .or_insert_with(|| EdgeTotals {
                edge: v.edge.clone(),
                datacenter: datacenter.to_owned(),
                ..EdgeTotals::default()
            });
        t.buckets += 1;
        t.bad += usize::from(v.status != VerdictStatus::Complete);
        t.expected += v.expected;
        t.actual += v.actual;
        t.missing += v.missing;
        if v.status == VerdictStatus::Duplicated {
            t.duplicated += v.difference;
        }
    }
    by.into_values().collect()
}

fn latency_cells(l: &LatencySummary) -> Markup {
    html! {
        td.n { (l.samples) } td.n { (opt(l.p50)) } td.n { (opt(l.p95)) } td.n { (opt(l.p99)) } td.n { (opt(l.max)) }
    }
}

fn verdict_row(now: DateTime<Utc>, v: &Verdict) -> Markup {
    let datacenter = v.datacenter.as_deref().unwrap_or("");
    html! {
        tr.verdict data-edge=(v.edge) data-datacenter=(datacenter) data-partition=(v.partition.unwrap_or(-1))
            data-bucket=(v.bucket_start_ms) data-status=(v.status.as_str()) data-expected=(v.expected)
            data-actual=(v.actual) data-difference=(v.difference) data-missing=(v.missing)
            data-revisions=(v.revisions) {
            td { (time_ms(now, v.bucket_start_ms)) }
            td { (edge_label(&v.edge, Some(datacenter))) }
            @if let Some(partition) = v.partition { td.n { (partition) } }
            td { (badge(v.status.as_str()))
                @if let Some(t) = &v.silent_tier { " " span.muted { (t) " silent" } }
                @if let Some(l) = v.lag_ms { " " span.muted { (duration_ms(l)) " behind" } } }
            td.n { (v.expected) } td.n { (v.actual) } td.n { (chart::signed(v.difference)) }
            td.n { (v.revisions) }
            td { @if let Some(id) = v.incident_id { a href=(format!("/incidents/{id}")) { "#" (id) } } }
        }
    }
}

fn verdict_head(partition: bool) -> Markup {
    html! {
        tr { th { "Bucket" } th { "Edge" } @if partition { th.n { "Partition" } } th { "Verdict" }
             th.n { "Expected" } th.n { "Actual" } th.n { "Difference" } th.n { "Revisions" } th { "Incident" } }
    }
}

fn range_links(p: &TopicPage) -> Markup {
    let href = |minutes: i64| {
        let to = p.now.timestamp_millis();
        format!(
            "{}?from={}&to={}",
            super::format::topic_href(&p.topic),
            to - minutes * 60_000,
            to
        )
    };
    html! {
        form.filters method="get" action=(super::format::topic_href(&p.topic)) {
            label { "From " input name="from" value=(utc_rfc3339(p.from_ms)) size="24"; }
            label { "to " input name="to" value=(utc_rfc3339(p.to_ms)) size="24"; }
            button type="submit" { "Show" }
            span.muted { "last " }
            @for (m, label) in [(15, "15 min"), (60, "1 h"), (360, "6 h"), (1_440, "24 h")] {
                a href=(href(m)) { (label) }
            }
        }
    }
}

fn utc_rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// `/topics/{topic}`: chart, latency, verdicts and their history over a range.
pub fn topic(p: &TopicPage) -> Markup {
    let tiers: Vec<String> = p.range_tiers.iter().map(|t| t.tier.clone()).collect();
    let marks: Vec<BadBucketMark> = p
        .verdicts
        .iter()
        .filter(|v| {
            v.partition.is_none()
                && matches!(v.status, VerdictStatus::Missing | VerdictStatus::Duplicated)
        })
        .map(|v| BadBucketMark {
            bucket_start_ms: v.bucket_start_ms,
            bucket_width_ms: v.bucket_width_ms,
            status: v.status.as_str().to_owned(),
            edge: v.edge.clone(),
            difference: v.difference,
        })
        .collect();
    let totals = edge_totals(&p.verdicts);
    let (topic_level, partitions): (Vec<&Verdict>, Vec<&Verdict>) =
        p.verdicts.iter().partition(|v| v.partition.is_none());
    let bad_partitions = partitions
        .iter()
        .filter(|v| v.status != VerdictStatus::Complete)
        .count();
    let body = html! {
        h1 { "Topic " code { (p.topic) } }
        p.muted { "Buckets starting from " (time_ms(p.now, p.from_ms)) " to " (time_ms(p.now, p.to_ms)) }
        (range_links(p))
        h2 { "Summary of the range" }
        table #summary {
            tr { th { "Edge" } th.n { "Buckets judged" } th.n { "Not complete" } th.n { "Expected" } th.n { "Actual" } th.n { "Missing" } th.n { "Duplicated" } }
            @for t in &totals {
                tr.edge-summary data-edge=(t.edge) data-datacenter=(t.datacenter) data-buckets=(t.buckets)
                    data-expected=(t.expected) data-actual=(t.actual) data-missing=(t.missing) data-duplicated=(t.duplicated) {
                    td { (edge_label(&t.edge, Some(&t.datacenter))) }
                    td.n { (t.buckets) } td.n { (t.bad) } td.n { (t.expected) } td.n { (t.actual) }
                    td.n { @if t.missing > 0 { strong.err.missing-count { (t.missing) " missing" } } @else { span.none { "none missing" } } }
                    td.n { (t.duplicated) }
                }
            }
        }
        @if totals.is_empty() { p.muted { "No verdict in this range yet." } }
        div.watermarks { "Watermark lag: " (watermark_cells(p.now, &p.watermarks)) }
        h2 { "Messages per bucket" }
        (chart::chart(&p.buckets, &tiers, &marks, p.from_ms, p.to_ms))
        h2 { "Latency over the range (ms, event time to seen)" }
        table #latency {
            tr { th { "Tier" } th.n { "Messages" } th.n { "Samples" } th.n { "p50" } th.n { "p95" } th.n { "p99" } th.n { "max" } }
            @for t in &p.range_tiers {
                tr.tier-latency data-tier=(t.tier) data-count=(t.count) data-samples=(t.latency_ms.samples)
                    data-p50=(opt(t.latency_ms.p50)) data-p99=(opt(t.latency_ms.p99)) data-max=(opt(t.latency_ms.max)) {
                    td { (t.tier) } td.n { (t.count) } (latency_cells(&t.latency_ms))
                }
            }
        }
        h2 { "Verdicts (" (topic_level.len()) ")" }
        table #verdicts {
            (verdict_head(false))
            @for v in topic_level.iter().rev() { (verdict_row(p.now, v)) }
        }
        @if !partitions.is_empty() {
            details #partitions open[bad_partitions > 0] {
                summary { "Partition-level verdicts: " (partitions.len()) ", " (bad_partitions) " not complete" }
                table { (verdict_head(true)) @for v in partitions.iter().rev() { (verdict_row(p.now, v)) } }
            }
        }
        h2 { "Buckets (" (p.buckets.len()) ")" }
        table #buckets {
            tr { th { "Bucket" } th { "Tier" } th.n { "Messages" } th.n { "Bytes" } th { "Datacenters" } th.n { "Samples" } th.n { "p50" } th.n { "p95" } th.n { "p99" } th.n { "max" } }
            @for b in p.buckets.iter().rev() {
                @for t in &b.tiers {
                    tr.bucket-tier data-bucket=(b.bucket_start_ms) data-tier=(t.tier) data-count=(t.count)
                        data-p50=(opt(t.latency_ms.p50)) data-p95=(opt(t.latency_ms.p95))
                        data-p99=(opt(t.latency_ms.p99)) data-max=(opt(t.latency_ms.max)) {
                        td { (utc_ms(b.bucket_start_ms)) } td { (t.tier) } td.n { (t.count) } td.n { (t.bytes) }
                        td { (t.datacenters.join(", ")) } (latency_cells(&t.latency_ms))
                    }
                }
            }
        }
        details #history {
            summary { "Verdict history: " (p.history.len()) " judgements and changes" }
            table {
                tr { th { "When" } th { "Bucket" } th { "Edge" } th.n { "Partition" } th { "Change" } th.n { "Expected" } th.n { "Actual" } th { "Why final" } }
                @for h in p.history.iter().rev() {
                    tr.change data-bucket=(h.bucket_start_ms) data-edge=(h.edge) data-status=(h.status) {
                        td { (time(p.now, h.changed_at)) } td { (utc_ms(h.bucket_start_ms)) }
                        td { (edge_label(&h.edge, Some(&h.datacenter))) }
                        td.n { @if h.partition >= 0 { (h.partition) } }
                        td { @if let Some(o) = &h.old_status { (badge(o)) " → " } (badge(&h.status)) }
                        td.n { (h.expected) } td.n { (h.actual) } td { (h.final_reason) }
                    }
                }
            }
        }
    };
    layout(&p.topic, p.with_logout, body)
}

/// What `/incidents/{id}` shows.
#[derive(Debug, Clone)]
pub struct IncidentPage {
    /// The collector's clock.
    pub now: DateTime<Utc>,
    /// The incident, with its webhook notifications.
    pub incident: Incident,
    /// Topic-level verdicts of its buckets.
    pub verdicts: Vec<Verdict>,
    /// Show the logout button.
    pub with_logout: bool,
}

/// `/incidents/{id}`: the incident's buckets and its notifications.
pub fn incident(p: &IncidentPage) -> Markup {
    let i = &p.incident;
    let count = |state: &str| i.deliveries.iter().filter(|d| d.state == state).count();
    let (sent, pending, parked) = (count("sent"), count("pending"), count("parked"));
    let missing: i64 = p.verdicts.iter().map(|v| v.missing).sum();
    let topic_range = format!(
        "{}?from={}&to={}",
        super::format::topic_href(&i.topic),
        i.first_bucket_start_ms - 10 * i.bucket_width_ms,
        i.last_bucket_start_ms + 11 * i.bucket_width_ms
    );
    let body = html! {
        h1 { "Incident #" (i.id) " " (badge(&i.status)) }
        dl.facts #incident data-id=(i.id) data-status=(i.status) data-buckets=(i.buckets)
            data-bad-buckets=(i.bad_buckets) data-max-missing=(i.max_missing) data-missing=(missing)
            data-notifications-sent=(sent) data-notifications-pending=(pending)
            data-notifications-parked=(parked) {
            dt { "Topic" } dd { a href=(topic_range) { (i.topic) } }
            dt { "Edge" } dd { (edge_label(&i.edge, Some(&i.datacenter))) }
            dt { "Opened" } dd { (time(p.now, i.opened_at)) }
            dt { "Resolved" } dd { @if let Some(r) = i.resolved_at { (time(p.now, r)) } @else { "not yet" } }
            dt { "Buckets" } dd { (i.buckets) " (" (i.bad_buckets) " still bad), from " (utc_ms(i.first_bucket_start_ms)) " to " (utc_ms(i.last_bucket_start_ms)) }
            dt { "Missing now" } dd { strong.err { (missing) } " messages over its buckets; worst bucket " (i.max_missing) }
            dt { "Notifications" } dd { (sent) " sent, " (pending) " pending" @if parked > 0 { ", " strong.err { (parked) " parked" } " (not tried again)" } }
        }
        h2 { "Buckets" }
        table #incident-buckets {
            tr { th { "Bucket" } th { "Verdict" } th.n { "Expected" } th.n { "Actual" } th.n { "Difference" } th.n { "Missing" } th.n { "Revisions" } th { "Changed" } }
            @for v in &p.verdicts {
                tr.verdict data-bucket=(v.bucket_start_ms) data-status=(v.status.as_str()) data-expected=(v.expected)
                    data-actual=(v.actual) data-difference=(v.difference) data-missing=(v.missing) data-revisions=(v.revisions) {
                    td { (time_ms(p.now, v.bucket_start_ms)) } td { (badge(v.status.as_str())) }
                    td.n { (v.expected) } td.n { (v.actual) } td.n { (chart::signed(v.difference)) }
                    td.n { (v.missing) } td.n { (v.revisions) } td { (time(p.now, v.changed_at)) }
                }
            }
        }
        h2 { "Notifications" }
        @if i.deliveries.is_empty() { p.muted { "No webhook was notified (none configured, or none whose filters pass)." } }
        @else {
            table #deliveries {
                tr { th { "Webhook" } th { "Event" } th { "State" } th.n { "Attempts" } th { "Sent" } th { "Next attempt" } th.n { "Last status" } th { "Last error" } }
                @for d in &i.deliveries {
                    @let state = d.state.as_str();
                    tr.delivery data-webhook=(d.webhook) data-kind=(d.kind) data-state=(state) data-attempts=(d.attempts)
                        data-last-status=[d.last_status] {
                        td { (d.webhook) } td { (d.kind) } td { (badge(state)) } td.n { (d.attempts) }
                        td { @if let Some(s) = d.sent_at { (time(p.now, s)) } }
                        td { @if let Some(at) = d.parked_at { "none: parked " (time(p.now, at)) } @else if d.sent_at.is_none() { (time(p.now, d.next_attempt_at)) } }
                        td.n { @if let Some(s) = d.last_status { (s) } }
                        td { @if let Some(e) = &d.last_error { code { (e) } } }
                    }
                }
            }
        }
    };
    layout(&format!("Incident #{}", i.id), p.with_logout, body)
}

/// The login form, with `error` when a wrong token was given.
pub fn login(next: &str, error: Option<&str>) -> Markup {
    let body = html! {
        h1 { "Log in" }
        p { "This collector requires its API token." }
        @if let Some(e) = error { p.err #login-error { (e) } }
        form method="post" action="/login" {
            input type="hidden" name="next" value=(next);
            label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
            " " button type="submit" { "Log in" }
        }
    };
    layout("Log in", false, body)
}

/// An error page.
pub fn error(title: &str, message: &str) -> Markup {
    layout(
        title,
        false,
        html! { h1 { (title) } p.err #error { (message) } p { a href="/" { "All topics" } } },
    )
}
