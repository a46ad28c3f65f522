//! Capped exponential backoff: the delay doubles after every failure up to a cap, so a
//! dependency that is down for hours is still retried every `max`.

use std::time::Duration;

/// The delay after `failures` + 1 failures in a row: `initial * 2^failures`, at most `max`.
pub fn delay(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .saturating_mul(2u32.saturating_pow(failures.min(31)))
        .min(max)
}

/// The delays of one run of failures: `initial`, `2 * initial`, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A run that starts at `initial` and never waits longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The delay to wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.initial, self.max, self.failures);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Waits the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn doubles_and_is_capped() {
        assert_eq!(delay(s(1), s(60), 0), s(1));
        assert_eq!(delay(s(1), s(60), 1), s(2));
        assert_eq!(delay(s(1), s(60), 5), s(32));
        assert_eq!(delay(s(1), s(60), 6), s(60));
        assert_eq!(delay(s(1), s(60), u32::MAX), s(60));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(250));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 250, 250]);
    }
}
