//! The duplicate filter of numbered counts records: per (topic, stream), the sequence numbers
//! applied so far, stored as one `int8multirange` in `audit_record_ranges`.
//!
//! audit-lib and chaperone-service give each counts record an id that names its stream (one
//! per process and topic) and its number in it ([`chaperone_audit::sequence`]). Membership
//! in the set of applied numbers is exactly "this id was applied", whatever order records
//! arrive in, so the filter drops the same records as one stored id per record would. Since
//! a stream's records are numbered in the order they are made, its set is nearly always one
//! range: a batch locks and rewrites one small row per stream instead of inserting an index
//! entry per record. Records with any other id go through `audit_record_seen`.

use std::collections::{BTreeMap, HashSet};

use sqlx::{Postgres, Transaction};

/// A set of sequence numbers as sorted, disjoint, non-adjacent half-open ranges `[lo, hi)`,
/// the canonical form of a PostgreSQL `int8multirange`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied(Vec<(i64, i64)>);

impl Applied {
    /// Adds `n`; `false` when it was already in the set.
    pub fn insert(&mut self, n: i64) -> bool {
        // The first range that ends after n.
        let i = self.0.partition_point(|&(_, hi)| hi <= n);
        if i < self.0.len() && self.0[i].0 <= n {
            return false;
        }
        let joins_prev = i > 0 && self.0[i - 1].1 == n;
        let joins_next = i < self.0.len() && self.0[i].0 == n + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = n + 1,
            (false, true) => self.0[i].0 = n,
            (false, false) => self.0.insert(i, (n, n + 1)),
        }
        true
    }

    /// The set in PostgreSQL's text form, `{[1,5),[7,8)}`.
    pub fn to_text(&self) -> String {
        let ranges: Vec<String> = self
            .0
            .iter()
            .map(|(lo, hi)| format!("[{lo},{hi})"))
            .collect();
        format!("{{{}}}", ranges.join(","))
    }

    /// Reads PostgreSQL's text form of an `int8multirange` (always canonical: `[lo,hi)`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("not an int8multirange in canonical form: {text:?}");
        let inner = text
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(bad)?;
        let mut ranges = Vec::new();
        for range in inner.split("),").filter(|r| !r.is_empty()) {
            let range = range.strip_prefix('[').ok_or_else(bad)?;
            let range = range.strip_suffix(')').unwrap_or(range);
            let (lo, hi) = range.split_once(',').ok_or_else(bad)?;
            let (lo, hi) = (
                lo.parse::<i64>().map_err(|_| bad())?,
                hi.parse::<i64>().map_err(|_| bad())?,
            );
            ranges.push((lo, hi));
        }
        Ok(Self(ranges))
    }
}

/// The numbers of one batch per (topic, stream), in key order (the order rows are locked in,
/// so that two writers never deadlock on them).
pub type Claims<'a> = BTreeMap<(&'a str, i64), Vec<i64>>;

/// Locks the existing rows of `(topics[i], streams[i])`, in key order, and returns their sets
/// in text form.
async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[&str],
    streams: &[i64],
) -> Result<BTreeMap<(String, i64), String>, sqlx::Error> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT r.topic, r.stream, r.ranges::text FROM audit_record_ranges r \
         JOIN UNNEST($1::text[], $2::int8[]) AS u(topic, stream) USING (topic, stream) \
         ORDER BY 1, 2 FOR UPDATE OF r",
    )
    .bind(topics)
    .bind(streams)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(t, s, r)| ((t, s), r)).collect())
}

/// Locks the rows of `claims` (creating missing ones), adds the batch's numbers and returns
/// those that were not applied before, each once (a number repeated in the batch is new at
/// most once).
pub async fn claim<'a>(
    tx: &mut Transaction<'_, Postgres>,
    claims: &Claims<'a>,
) -> Result<HashSet<(&'a str, i64, i64)>, sqlx::Error> {
    let topics: Vec<&str> = claims.keys().map(|(t, _)| *t).collect();
    let streams: Vec<i64> = claims.keys().map(|(_, s)| *s).collect();
    let mut stored = lock(tx, &topics, &streams).await?;
    // Streams seen for the first time: their rows are created (empty), then locked like the
    // others; a row another writer created meanwhile is locked as it is. (Two writers of the
    // same streams, which the consumer group avoids, may then deadlock: PostgreSQL aborts one,
    // and a deadlock is transient, so its batch is retried.)
    let (new_topics, new_streams): (Vec<&str>, Vec<i64>) = claims
        .keys()
        .filter(|(t, s)| !stored.contains_key(&((*t).to_owned(), *s)))
        .copied()
        .unzip();
    if !new_topics.is_empty() {
        sqlx::query(
            "INSERT INTO audit_record_ranges (topic, stream, ranges) \
             SELECT t, s, '{}' FROM UNNEST($1::text[], $2::int8[]) AS u(t, s) \
             ON CONFLICT (topic, stream) DO NOTHING",
        )
        .bind(&new_topics)
        .bind(&new_streams)
        .execute(&mut **tx)
        .await?;
        stored.extend(lock(tx, &new_topics, &new_streams).await?);
    }
    let mut fresh = HashSet::new();
    let mut updated = Vec::with_capacity(claims.len());
    for (&(topic, stream), numbers) in claims {
        let text = stored
            .remove(&(topic.to_owned(), stream))
            .unwrap_or_else(|| "{}".to_owned());
        let mut applied = Applied::parse(&text).map_err(|e| sqlx::Error::Decode(e.into()))?;
        let mut changed = false;
        for &n in numbers {
            if applied.insert(n) {
                fresh.insert((topic, stream, n));
                changed = true;
            }
        }
        if changed {
            updated.push((topic, stream, applied.to_text()));
        }
    }
    if !updated.is_empty() {
        let topics: Vec<&str> = updated.iter().map(|u| u.0).collect();
        let streams: Vec<i64> = updated.iter().map(|u| u.1).collect();
        let ranges: Vec<&str> = updated.iter().map(|u| u.2.as_str()).collect();
        sqlx::query(
            "UPDATE audit_record_ranges r SET ranges = u.ranges::int8multirange, updated_at = now() \
             FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS u(topic, stream, ranges) \
             WHERE r.topic = u.topic AND r.stream = u.stream",
        )
        .bind(&topics)
        .bind(&streams)
        .bind(&ranges)
        .execute(&mut **tx)
        .await?;
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inserting_joins_neighbours() {
        let mut a = Applied::default();
        for n in [1, 2, 3, 7, 5] {
            assert!(a.insert(n));
        }
        assert_eq!(a.to_text(), "{[1,4),[5,6),[7,8)}");
        assert!(a.insert(6));
        assert_eq!(a.to_text(), "{[1,4),[5,8)}");
        assert!(a.insert(4));
        assert_eq!(a.to_text(), "{[1,8)}");
        assert!(!a.insert(3));
        assert!(!a.insert(7));
        assert!(a.insert(8));
        assert!(a.insert(0));
        assert_eq!(a.to_text(), "{[0,9)}");
    }

    #[test]
    fn text_form_round_trips() {
        for text in [
            "{}",
            "{[1,2)}",
            "{[1,4),[5,8),[4611686018427387903,4611686018427387904)}",
        ] {
            assert_eq!(Applied::parse(text).unwrap().to_text(), text);
        }
        for bad in ["", "[1,2)", "{[1,2]", "{(1,2)}", "{[a,2)}", "{[1)}"] {
            assert!(Applied::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// The set answers like a `HashSet` of the numbers, whatever their order, and stays
        /// canonical.
        #[test]
        fn behaves_like_a_set(numbers in proptest::collection::vec(0i64..200, 0..300)) {
            let mut applied = Applied::default();
            let mut model = HashSet::new();
            for n in numbers {
                prop_assert_eq!(applied.insert(n), model.insert(n));
            }
            for w in applied.0.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "ranges overlap or touch: {:?}", applied);
            }
            prop_assert!(applied.0.iter().all(|(lo, hi)| lo < hi));
            let size: i64 = applied.0.iter().map(|(lo, hi)| hi - lo).sum();
            prop_assert_eq!(size as usize, model.len());
            prop_assert_eq!(Applied::parse(&applied.to_text()).unwrap(), applied);
        }
    }
}
