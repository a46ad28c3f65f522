//! [`TestProcess`]: the test binary run again as one of its own tests, in a process of its
//! own, so that a test can kill it with `kill -9` (a consumer group's member, for example).

use std::process::{Child, Command, Stdio};

/// A process running `test` of the current test binary (an `#[ignore]`d test that reads its
/// settings from `env`). It stops cleanly when its stdin closes ([`TestProcess::stop`]).
#[derive(Debug)]
pub struct TestProcess {
    child: Child,
}

impl TestProcess {
    /// Starts `test` of this binary with `env` set.
    pub fn start(test: &str, env: (&str, String)) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(env.0, env.1)
            .stdin(Stdio::piped())
            .spawn()?;
        Ok(Self { child })
    }

    /// Clean stop: closes stdin and waits for the process to finish its test successfully.
    pub fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "test process exited with {status}");
        Ok(())
    }

    /// `kill -9`.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
