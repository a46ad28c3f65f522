//! Record ids that number records: what lets the collector remember which records it has
//! applied as a few ranges per stream instead of one stored id per record.
//!
//! A counts record's id is any unique string (see [`crate::record`]). audit-lib and
//! chaperone-service write it as a version 8 UUID (RFC 9562, the layout left to the
//! application) in canonical lowercase form, laid out as:
//!
//! - the 60 free bits of the first half: the **stream**, random, drawn once per process and
//!   logical topic;
//! - the 62 free bits of the second half: the record's **sequence number** in its stream,
//!   counting from 1.
//!
//! The mapping between such an id and its (stream, sequence) pair is one to one, so a
//! reader that keeps, per topic and stream, the set of sequence numbers it has applied drops
//! exactly the records an id filter would drop, whatever order they come in. Records of a
//! stream are numbered in the order they are made and re-sent with their ids unchanged, so
//! that set is nearly always one range.

use std::collections::HashMap;

use uuid::Uuid;

/// Largest sequence number an id can carry (62 bits).
pub const MAX_SEQUENCE: u64 = (1 << 62) - 1;

/// Largest stream an id can carry (60 bits).
pub const MAX_STREAM: u64 = (1 << 60) - 1;

/// `id` as a UUID when it is one in canonical form: lowercase hex, hyphenated (as audit-lib and
/// chaperone-service write ids). Any other form, even of a valid UUID, is `None`.
pub fn canonical_uuid(id: &str) -> Option<Uuid> {
    let canonical = id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    if canonical {
        Uuid::parse_str(id).ok()
    } else {
        None
    }
}

/// A record id's stream and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequencedId {
    /// The stream: one process's records of one logical topic.
    pub stream: u64,
    /// The record's number in its stream.
    pub sequence: u64,
}

impl SequencedId {
    /// Reads `id` as a sequenced id: a canonical lowercase version 8 UUID (variant RFC 9562).
    /// Any other id, including other UUIDs, is `None`.
    pub fn parse(id: &str) -> Option<Self> {
        let uuid = canonical_uuid(id)?;
        if uuid.get_version_num() != 8 || uuid.get_variant() != uuid::Variant::RFC4122 {
            return None;
        }
        let (high, low) = uuid.as_u64_pair();
        Some(Self {
            stream: (high >> 16) << 12 | (high & 0x0fff),
            sequence: low & MAX_SEQUENCE,
        })
    }

    /// The id, in canonical lowercase form. `stream` and `sequence` must fit their bits.
    pub fn to_id(self) -> String {
        debug_assert!(self.stream <= MAX_STREAM && self.sequence <= MAX_SEQUENCE);
        let high = (self.stream >> 12) << 16 | 0x8000 | (self.stream & 0x0fff);
        let low = 0x8000_0000_0000_0000 | (self.sequence & MAX_SEQUENCE);
        Uuid::from_u64_pair(high, low).hyphenated().to_string()
    }
}

/// Makes the ids of one process's counts records: a stream per logical topic, drawn at its
/// first record, and numbers counting from 1 in each.
#[derive(Debug, Default)]
pub struct SequenceIds {
    streams: HashMap<String, SequencedId>,
}

impl SequenceIds {
    /// No stream drawn yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the next counts record of `topic`.
    pub fn next(&mut self, topic: &str) -> String {
        let next = match self.streams.get_mut(topic) {
            Some(s) if s.sequence < MAX_SEQUENCE => {
                s.sequence += 1;
                *s
            }
            // A new topic, or (after 2^62 records) a stream used up: a new stream.
            _ => {
                let s = SequencedId {
                    stream: Uuid::new_v4().as_u64_pair().1 & MAX_STREAM,
                    sequence: 1,
                };
                self.streams.insert(topic.to_owned(), s);
                s
            }
        };
        next.to_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_number_each_topic_from_one_in_a_stream_of_its_own() {
        let mut ids = SequenceIds::new();
        let a: Vec<SequencedId> = (0..3)
            .map(|_| SequencedId::parse(&ids.next("a")).unwrap())
            .collect();
        let b = SequencedId::parse(&ids.next("b")).unwrap();
        assert_eq!(
            a.iter().map(|s| s.sequence).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(a.iter().all(|s| s.stream == a[0].stream));
        assert_eq!(b.sequence, 1);
        assert_ne!(b.stream, a[0].stream);
        let again = SequencedId::parse(&SequenceIds::new().next("a")).unwrap();
        assert_ne!(
            again.stream, a[0].stream,
            "a new process draws a new stream"
        );
    }

    #[test]
    fn ids_are_version_8_uuids() {
        let id = SequenceIds::new().next("t");
        let uuid = Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 8);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id, uuid.hyphenated().to_string());
    }

    #[test]
    fn other_ids_are_not_sequenced() {
        for id in [
            "0193a0b4-2f1c-7c3e-9a51-3b8f0f6d2a10", // version 7
            "8a3b2c1d-0000-4000-8000-000000000001", // version 4
            "8A3B2C1D-0000-8000-8000-000000000001", // uppercase
            "8a3b2c1d00008000800000000000000a",     // not hyphenated
            "8a3b2c1d-0000-8000-c000-000000000001", // variant 110
            "p-1",
            "",
        ] {
            assert_eq!(SequencedId::parse(id), None, "{id}");
        }
    }

    proptest! {
        #[test]
        fn parse_inverts_to_id(stream in 0..=MAX_STREAM, sequence in 0..=MAX_SEQUENCE) {
            let s = SequencedId { stream, sequence };
            prop_assert_eq!(SequencedId::parse(&s.to_id()), Some(s));
        }
    }
}
