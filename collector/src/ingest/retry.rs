//! The one retry loop of ingest's writes (a batch to PostgreSQL, a dead letter to Kafka, a
//! parked record): capped exponential backoff between attempts, failures logged at the
//! first and at every power of two, and a shutdown grace period past which the writer gives
//! up (what it held is read again at the next start).

use std::time::{Duration, Instant};

use chaperone_daemon_support::Backoff;
use tokio_util::sync::CancellationToken;

/// A batch could not be made durable before the shutdown grace period ended.
#[derive(Debug)]
pub(super) struct GaveUp;

/// How every write of ingest is retried.
#[derive(Debug, Clone)]
pub(super) struct RetryPolicy {
    /// First delay between attempts.
    pub(super) min: Duration,
    /// Longest delay between attempts.
    pub(super) max: Duration,
    /// How long retries go on once `shutdown` is cancelled.
    pub(super) grace: Duration,
    /// The daemon's shutdown.
    pub(super) shutdown: CancellationToken,
}

impl RetryPolicy {
    /// The retries of one operation.
    pub(super) fn start(&self) -> Retry<'_> {
        Retry {
            policy: self,
            delay: Backoff::new(self.min, self.max),
            failures: 0,
        }
    }
}

/// The retries of one operation.
#[derive(Debug)]
pub(super) struct Retry<'p> {
    policy: &'p RetryPolicy,
    delay: Backoff,
    failures: u32,
}

impl Retry<'_> {
    /// Counts a failed attempt; returns its number when it is one to log (the first and
    /// every power of two), so that a long outage logs a few lines, not one per attempt.
    pub(super) fn failed(&mut self) -> Option<u32> {
        self.failures += 1;
        (self.failures == 1 || self.failures.is_power_of_two()).then_some(self.failures)
    }

    /// Failed attempts so far.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// Waits before the next attempt; `Err` when shutting down for longer than the grace
    /// period. `shutdown_since` is shared by every operation of one batch.
    pub(super) async fn wait(
        &mut self,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        if self.policy.shutdown.is_cancelled() {
            let since = *shutdown_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.policy.grace {
                return Err(GaveUp);
            }
        }
        self.delay.wait().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_logged_at_powers_of_two() {
        let policy = RetryPolicy {
            min: Duration::from_millis(1),
            max: Duration::from_millis(1),
            grace: Duration::ZERO,
            shutdown: CancellationToken::new(),
        };
        let mut retry = policy.start();
        let logged: Vec<u32> = (0..9).filter_map(|_| retry.failed()).collect();
        assert_eq!(logged, [1, 2, 4, 8]);
        assert_eq!(retry.failures(), 9);
    }

    #[tokio::test]
    async fn gives_up_once_shutdown_outlasts_the_grace_period() {
        let policy = RetryPolicy {
            min: Duration::from_millis(1),
            max: Duration::from_millis(1),
            grace: Duration::ZERO,
            shutdown: CancellationToken::new(),
        };
        let mut since = None;
        assert!(policy.start().wait(&mut since).await.is_ok());
        policy.shutdown.cancel();
        assert!(policy.start().wait(&mut since).await.is_err());
    }
}
