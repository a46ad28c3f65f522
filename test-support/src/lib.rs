//! What the integration tests of every crate share, written once: where the stack of
//! `dev/stack up` listens, a database of its own per test, topic creation, unique names,
//! polling with a deadline and a webhook receiver. Not published, not linked by anything but
//! tests (`collector` as a dev-dependency, `chaperone-tests`).
//!
//! - [`stack`]: the stack's addresses (overridable through the variables `dev/stack env`
//!   prints), its secured listener, and `dev/stack` itself for tests that stop a part of it.
//! - [`clock`]: [`ManualClock`], a clock that moves only when a test moves it.
//! - [`db`]: [`TestDb`], a migrated PostgreSQL database per test.
//! - [`kafka`]: topic creation, waiting for topics (MirrorMaker's copies), end offsets.
//! - [`layering`]: [`assert_no_circles`], which fails on an import circle between the
//!   module files of a crate.
//! - [`poll`]: [`eventually`], the only way a test waits for a condition.
//! - [`process`]: [`TestProcess`], the test binary run again as one of its tests, to kill.
//! - [`proxy`]: [`FreezingProxy`], a TCP proxy that can freeze its connections open and
//!   silent, as a network partition does.
//! - [`webhook`]: [`Receiver`], a webhook endpoint recording every [`Notification`].
//!
//! What only one crate's tests need (record builders, in-process daemons) stays with those
//! tests. Every helper fails, never skips, when the stack is not there.

pub mod clock;
pub mod db;
pub mod kafka;
pub mod layering;
pub mod poll;
pub mod process;
pub mod proxy;
pub mod stack;
pub mod webhook;

pub use clock::ManualClock;
pub use db::TestDb;
pub use kafka::{create_topic, create_topics, end_offsets, wait_for_topics};
pub use layering::assert_no_circles;
pub use poll::eventually;
pub use process::TestProcess;
pub use proxy::FreezingProxy;
pub use stack::{
    SecureListener, aggregate_bootstrap, database_url, dev_stack, regional_bootstrap,
    regional2_bootstrap, secure_listener,
};
pub use webhook::{Notification, Receiver};

/// A name no other test uses: `<prefix>-<uuid>`, valid as a topic, group or schema suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
