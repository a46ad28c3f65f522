//! The one shape of the collector's periodic jobs (reconciliation, alert delivery, retention,
//! the leader's check of its session, and ingest's lag measurement and reachability probe
//! of each cluster): when the first run starts, how the next one is
//! paced, what happens to a run in progress at shutdown, and a counter of runs by result.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How runs follow one another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// A run every period; a run that takes longer delays the next one (missed runs are
    /// not made up).
    Every(Duration),
    /// Each run a period after the previous one ended.
    After(Duration),
}

/// When the first run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// At once.
    Now,
    /// One period after the job starts.
    AfterPeriod,
}

/// A periodic job.
#[derive(Debug, Clone)]
pub struct Periodic {
    /// What is logged when a run fails (the job goes on at its next run); `None` when the
    /// run logs its own failures.
    pub failed: Option<&'static str>,
    /// What is logged when a run is dropped at shutdown after `finish_within`.
    pub abandoned: &'static str,
    /// How runs follow one another.
    pub pace: Pace,
    /// When the first run starts.
    pub first: First,
    /// How long a run in progress at shutdown may go on to finish; `None` drops it at once
    /// (what it had not committed rolls back).
    pub finish_within: Option<Duration>,
    /// Runs by `result` (`ok`, `error`); `None` when the job counts its runs itself.
    pub runs: Option<IntCounterVec>,
}

impl Periodic {
    /// Runs `once` on the job's pace until `shutdown` is cancelled.
    pub async fn run<F, Fut, E>(&self, shutdown: &CancellationToken, mut once: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let period = match self.pace {
            Pace::Every(p) | Pace::After(p) => p,
        };
        let start = match self.first {
            First::Now => tokio::time::Instant::now(),
            First::AfterPeriod => tokio::time::Instant::now() + period,
        };
        let mut ticker = tokio::time::interval_at(start, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ran = false;
        loop {
            match self.pace {
                Pace::Every(_) => {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        _ = ticker.tick() => {}
                    }
                }
                Pace::After(_) => {
                    if ran || self.first == First::AfterPeriod {
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(period) => {}
                        }
                    } else if shutdown.is_cancelled() {
                        break;
                    }
                }
            }
            ran = true;
            let run = once();
            tokio::pin!(run);
            let result = tokio::select! {
                biased;
                result = &mut run => result,
                () = shutdown.cancelled() => {
                    let Some(grace) = self.finish_within else { break };
                    match tokio::time::timeout(grace, run).await {
                        Ok(result) => {
                            self.done(result);
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(
                                grace_ms = grace.as_millis() as u64,
                                "{}", self.abandoned
                            );
                            break;
                        }
                    }
                }
            };
            self.done(result);
        }
    }

    fn done<E: Display>(&self, result: Result<(), E>) {
        let label = if result.is_ok() { "ok" } else { "error" };
        if let Some(runs) = &self.runs {
            runs.with_label_values(&[label]).inc();
        }
        if let (Err(error), Some(failed)) = (result, self.failed) {
            tracing::warn!(%error, "{}", failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use prometheus::Opts;

    use super::*;

    fn job(pace: Pace, finish_within: Option<Duration>) -> Periodic {
        Periodic {
            failed: Some("test run failed"),
            abandoned: "test run abandoned",
            pace,
            first: First::Now,
            finish_within,
            runs: Some(IntCounterVec::new(Opts::new("runs_total", "runs"), &["result"]).unwrap()),
        }
    }

    fn count(job: &Periodic, result: &str) -> u64 {
        job.runs
            .as_ref()
            .unwrap()
            .with_label_values(&[result])
            .get()
    }

    #[tokio::test]
    async fn runs_until_cancelled_and_counts_failures() {
        for pace in [
            Pace::Every(Duration::from_millis(1)),
            Pace::After(Duration::from_millis(1)),
        ] {
            let job = job(pace, None);
            let shutdown = CancellationToken::new();
            let calls = AtomicU32::new(0);
            let (calls_ref, stop) = (&calls, &shutdown);
            job.run(&shutdown, move || async move {
                let n = calls_ref.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 3 {
                    stop.cancel();
                }
                if n == 2 { Err("refused") } else { Ok(()) }
            })
            .await;
            assert_eq!(calls.load(Ordering::SeqCst), 3, "{pace:?}");
            assert_eq!(count(&job, "ok"), 2, "{pace:?}");
            assert_eq!(count(&job, "error"), 1, "{pace:?}");
        }
    }

    #[tokio::test]
    async fn a_run_at_shutdown_finishes_within_its_grace_or_is_dropped() {
        for (finish_within, counted) in [(Some(Duration::from_secs(60)), 1), (None, 0)] {
            let job = job(Pace::After(Duration::from_millis(1)), finish_within);
            let shutdown = CancellationToken::new();
            let stop = &shutdown;
            job.run(&shutdown, move || async move {
                stop.cancel();
                tokio::task::yield_now().await;
                Ok::<_, &str>(())
            })
            .await;
            assert_eq!(count(&job, "ok"), counted, "{finish_within:?}");
        }
    }

    #[tokio::test]
    async fn nothing_runs_once_shut_down() {
        let job = job(Pace::After(Duration::from_millis(1)), None);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        job.run(&shutdown, || async { Ok::<_, &str>(()) }).await;
        assert_eq!(count(&job, "ok") + count(&job, "error"), 0);
    }
}
