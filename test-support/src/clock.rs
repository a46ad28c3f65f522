//! A hand-moved [`Clock`] for tests: lateness, maximum waits and retry backoff are crossed by
//! moving it, never by sleeping. Not part of any daemon's API: the daemons take a [`Clock`],
//! and tests hand them [`ManualClock::clock`].

use std::sync::{Arc, Mutex};

use chaperone_daemon_support::Clock;
use chrono::{DateTime, Duration, Utc};

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }

    /// The time it shows.
    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the clock to `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// A [`Clock`] reading this one.
    pub fn clock(&self) -> Clock {
        let inner = Arc::clone(&self.0);
        Clock::from_fn(move || *inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
