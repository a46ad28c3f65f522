//! Cross-component integration and end-to-end tests. They run against the real stack
//! started by `dev/stack up` (two Apache Kafka clusters, MirrorMaker 2, PostgreSQL) and
//! fail, never skip, when it is not there.
