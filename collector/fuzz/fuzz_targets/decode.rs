//! Fuzzes `AuditRecord::decode`, the first code that touches bytes read from an audit topic
//! in the collector: it must never panic, and whatever it accepts must survive a round trip
//! through `encode` unchanged.

#![no_main]

use chaperone_audit::AuditRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = AuditRecord::decode(data) {
        let again = AuditRecord::decode(&record.encode()).expect("a re-encoded record decodes");
        assert_eq!(again, record, "decode(encode(r)) == r");
    }
});
