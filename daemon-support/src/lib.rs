//! `chaperone-daemon-support`: the plumbing the daemons (chaperone-service, the collector, the
//! REST proxy) share, written once. Internal (`publish = false`) and kept out of
//! `chaperone-audit`, which producers link.
//!
//! - [`clock`]: [`Clock`], the injectable wall clock.
//! - [`backoff`]: [`Backoff`], capped exponential retry delays.
//! - [`kafka`]: [`kafka::client_config`], which layers user librdkafka properties under the
//!   safety settings a daemon forces and logs the result with secrets redacted (the rule is
//!   `chaperone_audit::config::is_secret_property`), and [`kafka::apply_env`], librdkafka
//!   properties from `<PREFIX><PROPERTY>` environment variables.
//! - [`secrets`]: `${file:PATH}` and `${env:VAR}` references in configuration values.
//! - [`process`]: tracing set-up and SIGTERM/SIGINT handling for the daemons' `main.rs`.
//!
//! Durations are not here: their one syntax is `chaperone_audit::duration`, because the
//! producers' configuration needs it too.

pub mod backoff;
pub mod clock;
pub mod kafka;
pub mod process;
pub mod secrets;

pub use backoff::Backoff;
pub use clock::Clock;
