//! Cross-component integration and end-to-end tests. They run against the real stack
//! started by `dev/stack up` (two Apache Kafka clusters, MirrorMaker 2, PostgreSQL) and
//! fail, never skip, when it is not there.
//!
//! What every crate's tests share (the stack's addresses, test databases, topics, polling,
//! the webhook receiver) is in `chaperone-test-support`. This library holds what only the
//! tests in `tests/tests/` share: [`pipeline`] runs the daemons in the test process,
//! [`programs`] finds the workspace's programs to run as processes, [`producer`] sends
//! numbered messages through an audited producer, [`group`] runs the members of an audited
//! consumer group as processes to kill, and [`verdicts`] sums what the collector judged.

pub mod group;
pub mod pipeline;
pub mod producer;
pub mod programs;
pub mod verdicts;
