//! Decoding what is read from an audit topic: each message becomes a record or a rejection
//! with a short, bounded reason (the metric label and the dead letter's reason header).

use chaperone_audit::{AuditRecord, DecodeError};
use rdkafka::Message;

use super::rate_limit::RateLimit;

/// Every reason a record can be rejected for: the labels of [`reason_label`], `empty` (no
/// payload), and those of [`data_error_label`](crate::store::data_error_label).
pub const REJECTION_REASONS: [&str; 22] = [
    "too_large",
    "json",
    "no_version",
    "unsupported_version",
    "unknown_kind",
    "missing_field",
    "unknown_field",
    "negative",
    "out_of_range",
    "timestamp",
    "string_length",
    "nul_character",
    "inconsistent",
    "histogram",
    "other",
    "empty",
    "db_out_of_range",
    "db_invalid_text",
    "db_untranslatable_character",
    "db_data_exception",
    "db_integrity",
    "db_program_limit",
];

/// Short, bounded label for a validation failure (used as metric label and DLQ header).
pub fn reason_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge(_) => "too_large",
        DecodeError::Json(_) => "json",
        DecodeError::NoVersion => "no_version",
        DecodeError::UnsupportedVersion(_) => "unsupported_version",
        DecodeError::UnknownKind(_) => "unknown_kind",
        DecodeError::MissingField(_) => "missing_field",
        DecodeError::UnknownField(_) => "unknown_field",
        DecodeError::Negative { .. } => "negative",
        DecodeError::OutOfRange { .. } => "out_of_range",
        DecodeError::Timestamp { .. } => "timestamp",
        DecodeError::StringLength { .. } => "string_length",
        DecodeError::NulCharacter { .. } => "nul_character",
        DecodeError::Inconsistent { .. } => "inconsistent",
        DecodeError::Histogram(_) => "histogram",
        _ => "other",
    }
}

/// Why a record is not stored.
#[derive(Debug)]
pub(super) struct Rejected {
    /// Short label: [`reason_label`] or [`data_error_label`](crate::store::data_error_label).
    pub(super) reason: &'static str,
    /// The full message.
    pub(super) error: String,
}

/// Where a message was read, and its bytes as read (what a dead letter carries).
#[derive(Debug, Clone)]
pub(super) struct Origin {
    pub(super) source: usize,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Option<Vec<u8>>,
}

/// One message taken from an audit topic.
#[derive(Debug)]
pub(super) struct Consumed {
    pub(super) origin: Origin,
    pub(super) record: Result<AuditRecord, Rejected>,
}

/// Decodes the message `m` read from source number `source` (cluster `alias`), logging a
/// rejection through `poison_log`.
pub(super) fn decode(
    source: usize,
    alias: &str,
    poison_log: &RateLimit,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Consumed {
    // The bytes are kept with valid records too: the store may still refuse one (see
    // `Writer::store`), and its dead letter carries the record as read.
    let origin = Origin {
        source,
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
    };
    let record = match &origin.payload {
        None => Err(Rejected {
            reason: "empty",
            error: "record has no payload".to_owned(),
        }),
        Some(p) => AuditRecord::decode(p).map_err(|e| {
            if let Some(suppressed) = poison_log.allow() {
                tracing::warn!(
                    cluster = %alias,
                    partition = m.partition(),
                    offset = m.offset(),
                    error = %e,
                    suppressed,
                    "invalid audit record sent to the dead-letter topic"
                );
            }
            Rejected {
                reason: reason_label(&e),
                error: e.to_string(),
            }
        }),
    };
    Consumed { origin, record }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, StoreError, data_error_label};

    #[test]
    fn every_rejection_label_is_listed() {
        let decode = [
            DecodeError::TooLarge(0),
            DecodeError::NoVersion,
            DecodeError::NulCharacter { field: "host" },
            DecodeError::Histogram(chaperone_audit::histogram::HistogramError::TooLarge(0)),
        ];
        for e in &decode {
            assert!(REJECTION_REASONS.contains(&reason_label(e)), "{e}");
        }
        for code in ["22003", "22021", "22P05", "22001", "23514", "54000"] {
            let label = store::classify_code_label(code);
            assert!(REJECTION_REASONS.contains(&label), "{code}");
        }
    }

    #[test]
    fn only_data_exceptions_are_data_errors() {
        assert_eq!(
            data_error_label(&StoreError::Database(sqlx::Error::PoolClosed)),
            None
        );
        assert_eq!(
            reason_label(&DecodeError::NulCharacter { field: "host" }),
            "nul_character"
        );
    }
}
