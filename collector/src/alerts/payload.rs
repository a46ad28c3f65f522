//! What a notification says: the data stored in the outbox and the two wire formats built
//! from it (the documented JSON body and a Slack-compatible `{"text": ...}` body).

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::model::VerdictStatus;

/// Outbox event data, written by the reconciler in the transaction of the verdict change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventData {
    pub incident_id: i64,
    pub topic: String,
    pub edge: String,
    pub from_tier: String,
    pub to_tier: String,
    /// `None` for edges summed over datacenters.
    pub datacenter: Option<String>,
    pub status: VerdictStatus,
    pub silent_tier: Option<String>,
    pub bucket_start_ms: i64,
    pub bucket_width_ms: i64,
    pub expected: i64,
    pub actual: i64,
    pub incident_first_bucket_start_ms: i64,
    pub incident_last_bucket_start_ms: i64,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

impl EventData {
    /// Messages missing downstream (zero unless downstream saw fewer).
    pub fn missing(&self) -> i64 {
        (self.expected - self.actual).max(0)
    }
}

/// Whether a notification announces trouble or its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// An incident opened (for this webhook: its first bucket that passed the filters).
    Firing,
    /// Every bucket of the incident is complete again.
    Resolved,
}

impl NotificationKind {
    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Firing => "firing",
            NotificationKind::Resolved => "resolved",
        }
    }
}

/// The documented JSON body of a `json` webhook (see the collector README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    /// Body format version.
    pub version: u32,
    /// `firing` or `resolved`.
    pub event: NotificationKind,
    /// Incident id: a firing and its resolved notification share it.
    pub incident_id: i64,
    /// Logical topic.
    pub topic: String,
    /// Edge name, for example `producer->regional`.
    pub edge: String,
    /// Upstream tier of the edge.
    pub from_tier: String,
    /// Downstream tier of the edge.
    pub to_tier: String,
    /// Datacenter compared, or null when the edge sums over datacenters.
    pub datacenter: Option<String>,
    /// Verdict of the bucket: `missing`, `duplicated`, `tier_silent` or (resolved) `complete`.
    pub status: VerdictStatus,
    /// For `tier_silent`: the tier that did not report progress past the bucket.
    pub silent_tier: Option<String>,
    /// Start of the bucket, RFC 3339 UTC.
    pub bucket: String,
    /// Start of the bucket, epoch ms.
    pub bucket_start_ms: i64,
    /// Width of the bucket, ms.
    pub bucket_width_ms: i64,
    /// Messages counted by the upstream tier.
    pub expected: i64,
    /// Messages counted by the downstream tier.
    pub actual: i64,
    /// `actual - expected`: negative when messages are missing, positive when duplicated.
    pub difference: i64,
    /// First and last bucket (epoch ms) that belonged to the incident so far.
    pub incident_first_bucket_start_ms: i64,
    /// See `incident_first_bucket_start_ms`.
    pub incident_last_bucket_start_ms: i64,
    /// When the incident opened, RFC 3339.
    pub opened_at: String,
    /// When it resolved (resolved notifications only), RFC 3339.
    pub resolved_at: Option<String>,
    /// Where to look: the collector's status page of the incident (its buckets, expected vs
    /// actual, and the notifications sent), or null when `alerts.public_url` is not set.
    pub link: Option<String>,
}

fn rfc3339_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Builds the JSON body.
pub(crate) fn json_body(
    kind: NotificationKind,
    data: &EventData,
    public_url: Option<&str>,
) -> WebhookBody {
    WebhookBody {
        version: 1,
        event: kind,
        incident_id: data.incident_id,
        topic: data.topic.clone(),
        edge: data.edge.clone(),
        from_tier: data.from_tier.clone(),
        to_tier: data.to_tier.clone(),
        datacenter: data.datacenter.clone(),
        status: data.status,
        silent_tier: data.silent_tier.clone(),
        bucket: rfc3339_ms(data.bucket_start_ms),
        bucket_start_ms: data.bucket_start_ms,
        bucket_width_ms: data.bucket_width_ms,
        expected: data.expected,
        actual: data.actual,
        difference: data.actual - data.expected,
        incident_first_bucket_start_ms: data.incident_first_bucket_start_ms,
        incident_last_bucket_start_ms: data.incident_last_bucket_start_ms,
        opened_at: data.opened_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        resolved_at: data
            .resolved_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        link: link(data, public_url),
    }
}

/// The status page of the incident.
fn link(data: &EventData, public_url: Option<&str>) -> Option<String> {
    let base = public_url?.trim_end_matches('/');
    Some(format!("{base}/incidents/{}", data.incident_id))
}

/// The Slack-compatible body: `{"text": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlackBody {
    /// The message.
    pub text: String,
}

/// Builds the Slack body.
pub(crate) fn slack_body(
    kind: NotificationKind,
    data: &EventData,
    public_url: Option<&str>,
) -> SlackBody {
    let whereabouts = match &data.datacenter {
        Some(dc) => format!("{} on `{}` ({dc})", data.topic, data.edge),
        None => format!("{} on `{}`", data.topic, data.edge),
    };
    let bucket = rfc3339_ms(data.bucket_start_ms);
    let mut text = match (kind, data.status) {
        (NotificationKind::Resolved, _) => format!(
            ":white_check_mark: resolved: {whereabouts}, every bucket from {} to {} is complete again",
            rfc3339_ms(data.incident_first_bucket_start_ms),
            rfc3339_ms(data.incident_last_bucket_start_ms),
        ),
        (_, VerdictStatus::Missing) => format!(
            ":red_circle: {} of {} messages missing: {whereabouts}, bucket {bucket}",
            data.missing(),
            data.expected
        ),
        (_, VerdictStatus::Duplicated) => format!(
            ":large_orange_circle: {} duplicated messages ({} expected, {} seen): {whereabouts}, bucket {bucket}",
            data.actual - data.expected,
            data.expected,
            data.actual
        ),
        (_, VerdictStatus::TierSilent) => format!(
            ":red_circle: tier `{}` is silent: {whereabouts}, bucket {bucket} ({} expected, {} seen)",
            data.silent_tier.as_deref().unwrap_or("?"),
            data.expected,
            data.actual
        ),
        (_, VerdictStatus::Lagging) => format!(
            ":hourglass: tier `{}` is behind: {whereabouts}, bucket {bucket} ({} expected, {} seen so far)",
            data.to_tier, data.expected, data.actual
        ),
        (_, VerdictStatus::UpstreamIncomplete) => format!(
            ":grey_question: counts of tier `{}` are incomplete: {whereabouts}, bucket {bucket} ({} counted, {} seen)",
            data.from_tier, data.expected, data.actual
        ),
        (_, VerdictStatus::Redelivered) => format!(
            ":repeat: {} messages processed again by at-least-once tier `{}`: {whereabouts}, bucket {bucket} ({} expected, {} seen)",
            data.actual - data.expected,
            data.to_tier,
            data.expected,
            data.actual
        ),
        (_, VerdictStatus::Complete) => {
            format!("{whereabouts}: bucket {bucket} is complete")
        }
    };
    if let Some(link) = link(data, public_url) {
        text.push_str(&format!(" <{link}|details>"));
    }
    SlackBody { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> EventData {
        EventData {
            incident_id: 7,
            topic: "orders".into(),
            edge: "producer->regional".into(),
            from_tier: "producer".into(),
            to_tier: "regional".into(),
            datacenter: Some("dc1".into()),
            status: VerdictStatus::Missing,
            silent_tier: None,
            bucket_start_ms: 1_764_067_200_000,
            bucket_width_ms: 60_000,
            expected: 100,
            actual: 88,
            incident_first_bucket_start_ms: 1_764_067_200_000,
            incident_last_bucket_start_ms: 1_764_067_200_000,
            opened_at: Utc.timestamp_millis_opt(1_764_067_500_000).unwrap(),
            resolved_at: None,
        }
    }

    #[test]
    fn json_body_has_the_documented_fields() {
        let body = json_body(
            NotificationKind::Firing,
            &data(),
            Some("http://collector:8080/"),
        );
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v["event"], "firing");
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["edge"], "producer->regional");
        assert_eq!(v["datacenter"], "dc1");
        assert_eq!(v["bucket"], "2025-11-25T10:40:00Z");
        assert_eq!(v["expected"], 100);
        assert_eq!(v["actual"], 88);
        assert_eq!(v["difference"], -12);
        assert_eq!(v["status"], "missing");
        assert_eq!(v["link"], "http://collector:8080/incidents/7");
        let back: WebhookBody = serde_json::from_value(v).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn slack_body_is_one_text_field() {
        let v = serde_json::to_value(slack_body(NotificationKind::Firing, &data(), None)).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("12 of 100 messages missing"), "{text}");
        assert!(text.contains("orders"), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 1);
        let mut resolved = data();
        resolved.status = VerdictStatus::Complete;
        let v = slack_body(NotificationKind::Resolved, &resolved, Some("http://c")).text;
        assert!(v.starts_with(":white_check_mark: resolved"), "{v}");
        assert!(v.contains("<http://c/incidents/7|details>"), "{v}");
    }
}
