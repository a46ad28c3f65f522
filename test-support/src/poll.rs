//! Waiting for a condition: tests poll with a deadline, never sleep a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// How long [`eventually`] waits between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Some`, failing with `what` once `timeout` has passed; an
/// error of `check` fails at once.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
