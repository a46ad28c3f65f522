//! `chaperone-service`: the daemon that runs alongside one Kafka cluster (regional or
//! aggregate), reads every audited topic and emits audit records for its tier, exactly once.
