//! The topic page's chart, drawn on the server as SVG: messages per bucket of every tier as
//! lines over the chosen range, with the buckets an edge judged `missing` or `duplicated`
//! shaded and their difference written above them.

use std::fmt::Write as _;

use maud::{Markup, html};

use crate::store::BucketSummary;

/// A bad bucket to mark on the chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBucketMark {
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// `missing` or `duplicated`.
    pub status: String,
    /// Edge that judged it.
    pub edge: String,
    /// `actual - expected`.
    pub difference: i64,
}

const W: f64 = 960.0;
const H: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 28.0;
/// Up to this many buckets every count also gets a dot (a lone bucket is no line).
const MAX_DOTS: usize = 200;

/// Colour of a tier's line: the usual tiers keep theirs, others take the next free one.
pub fn tier_colour(tier: &str, index: usize) -> &'static str {
    const OTHERS: [&str; 4] = ["#8c564b", "#e377c2", "#7f7f7f", "#17becf"];
    match tier {
        "producer" => "#1f77b4",
        "regional" => "#2ca02c",
        "aggregate" => "#9467bd",
        _ => OTHERS[index % OTHERS.len()],
    }
}

/// `-12` or `+3`.
pub fn signed(n: i64) -> String {
    if n > 0 {
        format!("+{n}")
    } else {
        n.to_string()
    }
}

/// The chart of `buckets` over `[from_ms, to_ms)` with `marks`; `tiers` in legend order.
pub fn chart(
    buckets: &[BucketSummary],
    tiers: &[String],
    marks: &[BadBucketMark],
    from_ms: i64,
    to_ms: i64,
) -> Markup {
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |ms: i64| LEFT + (ms - from_ms) as f64 / span * (W - LEFT - RIGHT);
    let peak = buckets
        .iter()
        .flat_map(|b| b.tiers.iter().map(|t| t.count))
        .max()
        .unwrap_or(0)
        .max(1);
    let y = |count: i64| H - BOTTOM - count as f64 / peak as f64 * (H - TOP - BOTTOM);
    let lines: Vec<(String, &'static str, String)> = tiers
        .iter()
        .enumerate()
        .map(|(i, tier)| {
            let mut points = String::new();
            for b in buckets {
                if let Some(t) = b.tiers.iter().find(|t| &t.tier == tier) {
                    let centre = b.bucket_start_ms + b.bucket_width_ms / 2;
                    let _ = write!(points, "{:.1},{:.1} ", x(centre), y(t.count));
                }
            }
            (tier.clone(), tier_colour(tier, i), points)
        })
        .collect();
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img"
            aria-label="messages per bucket and tier" xmlns="http://www.w3.org/2000/svg" {
            @for m in marks {
                @let left = x(m.bucket_start_ms).max(LEFT);
                @let right = x(m.bucket_start_ms + m.bucket_width_ms).min(W - RIGHT);
                g.mark.(m.status) data-bucket=(m.bucket_start_ms) data-edge=(m.edge)
                    data-status=(m.status) data-difference=(m.difference) {
                    rect x=(format!("{left:.1}")) y=(TOP) width=(format!("{:.1}", (right - left).max(2.0)))
                        height=(H - TOP - BOTTOM) {}
                    text x=(format!("{:.1}", (left + right) / 2.0)) y=(TOP - 6.0)
                        text-anchor="middle" { (signed(m.difference)) }
                }
            }
            line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W - RIGHT) y2=(H - BOTTOM) {}
            line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) {}
            text.tick x=(LEFT - 6.0) y=(TOP + 4.0) text-anchor="end" { (peak) }
            text.tick x=(LEFT - 6.0) y=(H - BOTTOM + 4.0) text-anchor="end" { "0" }
            text.tick x=(LEFT) y=(H - 8.0) { (super::format::utc_ms(from_ms)) }
            text.tick x=(W - RIGHT) y=(H - 8.0) text-anchor="end" { (super::format::utc_ms(to_ms)) }
            @for (tier, colour, points) in &lines {
                polyline.series data-tier=(tier) points=(points.trim_end()) stroke=(colour) {}
                @if buckets.len() <= MAX_DOTS {
                    @for p in points.split_whitespace() {
                        @if let Some((cx, cy)) = p.split_once(',') {
                            circle cx=(cx) cy=(cy) r="2.5" fill=(colour) {}
                        }
                    }
                }
            }
            @for (i, (tier, colour, _)) in lines.iter().enumerate() {
                @let lx = LEFT + 10.0 + i as f64 * 130.0;
                rect x=(lx) y="6" width="12" height="4" fill=(colour) {}
                text.legend x=(lx + 16.0) y="12" { (tier) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LatencySummary, TierSummary};

    fn bucket(start: i64, counts: &[(&str, i64)]) -> BucketSummary {
        BucketSummary {
            bucket_start_ms: start,
            bucket_width_ms: 10_000,
            tiers: counts
                .iter()
                .map(|(tier, count)| TierSummary {
                    tier: (*tier).into(),
                    count: *count,
                    bytes: 0,
                    no_timestamp: 0,
                    malformed: 0,
                    min_event_ms: None,
                    max_event_ms: None,
                    datacenters: Vec::new(),
                    latency_ms: LatencySummary {
                        samples: 0,
                        p50: None,
                        p95: None,
                        p99: None,
                        max: None,
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn lines_per_tier_and_marked_buckets() {
        let buckets = [
            bucket(0, &[("producer", 100), ("regional", 88)]),
            bucket(10_000, &[("producer", 50), ("regional", 50)]),
        ];
        let tiers = vec!["producer".to_owned(), "regional".to_owned()];
        let marks = [BadBucketMark {
            bucket_start_ms: 0,
            bucket_width_ms: 10_000,
            status: "missing".into(),
            edge: "producer->regional".into(),
            difference: -12,
        }];
        let svg = chart(&buckets, &tiers, &marks, 0, 20_000).into_string();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        // The producer's 100 is the top of the plot, its 50 half way down.
        assert!(svg.contains("points=\"285.0,28.0 727.0,130.0\""), "{svg}");
        assert!(svg.contains("data-difference=\"-12\""), "{svg}");
        assert!(svg.contains(">-12</text>"), "{svg}");
        assert_eq!(signed(3), "+3");
    }

    #[test]
    fn an_empty_range_still_draws_axes() {
        let svg = chart(&[], &[], &[], 0, 60_000).into_string();
        assert!(svg.contains("<svg"), "{svg}");
        assert!(!svg.contains("<polyline"), "{svg}");
    }
}
