//! The source of "now" for everything that depends on wall-clock time, injectable so tests
//! move time instead of sleeping.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The wall clock a daemon reads: the system's, or a function given by a test.
#[derive(Clone)]
pub struct Clock(Source);

#[derive(Clone)]
enum Source {
    System,
    Fn(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>),
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Source::System)
    }

    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Self(Source::Fn(Arc::new(f)))
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            Source::System => Utc::now(),
            Source::Fn(f) => f(),
        }
    }

    /// The current time in milliseconds since the Unix epoch. The system clock reads
    /// `SystemTime` directly, without chrono's conversion: chaperone-service reads it for
    /// batches of messages on its hot path.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Source::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Source::Fn(f) => f().timestamp_millis(),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_clock_is_read_in_both_forms() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).expect("valid");
        let c = Clock::from_fn(move || at);
        assert_eq!(c.now(), at);
        assert_eq!(c.now_ms(), 1_700_000_000_123);
        let sys = Clock::system();
        assert!((sys.now_ms() - sys.now().timestamp_millis()).abs() < 1_000);
    }
}
