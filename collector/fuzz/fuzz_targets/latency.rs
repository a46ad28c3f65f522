//! Fuzzes the `latency` field's decoder, `Latency::from_bytes`, with structured V2 headers:
//! plain or compressed, with declared payload lengths near and far from the real one, and
//! any precision and bounds. It must never panic, never allocate for what a header only
//! declares (run it with `-malloc_limit_mb=32`: one such allocation fails the run), and
//! whatever it accepts must survive `from_bytes(to_bytes(h)) == h`.

#![no_main]

use std::io::Write as _;

use chaperone_audit::Latency;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Header {
    compressed: bool,
    /// 0 keeps the V2 cookie, anything else flips bits of it.
    cookie_flip: u8,
    /// Added to the real payload length in the header.
    declared_delta: i32,
    normalizing_offset: u8,
    sigfig: u8,
    low: u64,
    high: u64,
    ratio_is_one: bool,
    payload: Vec<u8>,
}

fn plain(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(40 + h.payload.len());
    b.extend((0x1c84_9313u32 ^ u32::from(h.cookie_flip)).to_be_bytes());
    let declared = (h.payload.len() as i64 + i64::from(h.declared_delta)).clamp(0, u32::MAX.into());
    b.extend((declared as u32).to_be_bytes());
    b.extend(u32::from(h.normalizing_offset % 2).to_be_bytes());
    b.extend(u32::from(h.sigfig).to_be_bytes());
    b.extend(h.low.to_be_bytes());
    b.extend(h.high.to_be_bytes());
    b.extend(if h.ratio_is_one { 1.0f64 } else { 2.0 }.to_be_bytes());
    b.extend(&h.payload);
    b
}

fn compressed(inner: &[u8], declared_delta: i32) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(inner).expect("writes to a Vec");
    let packed = z.finish().expect("writes to a Vec");
    let declared = (packed.len() as i64 + i64::from(declared_delta)).clamp(0, u32::MAX.into());
    let mut b = 0x1c84_9314u32.to_be_bytes().to_vec();
    b.extend((declared as u32).to_be_bytes());
    b.extend(packed);
    b
}

fuzz_target!(|h: Header| {
    let inner = plain(&h);
    let bytes = if h.compressed {
        compressed(&inner, h.declared_delta / 2)
    } else {
        inner
    };
    if let Ok(l) = Latency::from_bytes(&bytes) {
        let again = Latency::from_bytes(&l.to_bytes()).expect("a re-encoded histogram decodes");
        assert_eq!(again, l, "from_bytes(to_bytes(h)) == h");
    }
});
