//! The workspace's programs that the tests run as processes (so that they can be killed with
//! SIGKILL): `cargo test --workspace` builds them next to the test binaries.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};

/// A program `cargo test --workspace` builds next to this test binary: `path` below the
/// target directory, built by `build`.
pub fn built(path: &str, build: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no target directory")?;
    let path = debug.join(path);
    ensure!(
        path.exists(),
        "{} is missing: build it with `{build}` (cargo test --workspace builds it)",
        path.display()
    );
    Ok(path)
}
