//! What the collector judged and notified, summed the way the end-to-end tests check it.

/// Topic-level verdicts of one edge and status: (edge, status, buckets, expected, actual).
pub type VerdictSums = (String, String, i64, i64, i64);

/// Topic-level verdicts of `topic` summed per (edge, status), ordered by edge and status.
pub async fn verdicts(pool: &sqlx::PgPool, topic: &str) -> anyhow::Result<Vec<VerdictSums>> {
    Ok(sqlx::query_as(
        "SELECT edge, status, count(*), sum(expected)::bigint, sum(actual)::bigint
         FROM reconcile_verdicts WHERE topic = $1 AND partition = -1
         GROUP BY edge, status ORDER BY edge, status",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?)
}

/// (expected, actual) of `edge` over every status of `rows`.
pub fn edge_totals(rows: &[VerdictSums], edge: &str) -> (i64, i64) {
    rows.iter()
        .filter(|r| r.0 == edge)
        .fold((0, 0), |(e, a), r| (e + r.3, a + r.4))
}

/// Notifications the collector has queued but not yet delivered.
pub async fn unsent_notifications(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM alert_deliveries WHERE sent_at IS NULL")
            .fetch_one(pool)
            .await?,
    )
}
