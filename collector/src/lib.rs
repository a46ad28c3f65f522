//! `chaperone-collector`: consumes audit records from every cluster, stores them in
//! PostgreSQL exactly once, reconciles tiers bucket by bucket and raises alerts.
