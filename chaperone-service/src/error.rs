//! Why the pipeline stops: the error every stage of it returns, kept apart so that the
//! stages (the consume loop, the transactions) import it from below instead of from one
//! another.

use rdkafka::error::KafkaError;

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A Kafka call failed in a way that leaves no safe way to continue.
    #[error("fatal kafka error while {action}: {source}")]
    Fatal {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: KafkaError,
    },
}

/// A Kafka failure that leaves no safe way to continue, while doing `action`.
pub(crate) fn fatal(action: &'static str, source: KafkaError) -> PipelineError {
    PipelineError::Fatal { action, source }
}
