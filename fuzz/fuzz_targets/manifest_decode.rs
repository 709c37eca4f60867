#![no_main]
//! Remote manifests are read from a bucket anyone with write access to it can change: decoding
//! arbitrary bytes must never panic, and whatever decodes must encode back to a manifest that
//! decodes to the same thing. Two inputs per run: the raw bytes as a manifest, and the raw
//! bytes as a body wrapped in a valid envelope (magic, format, length, checksum), so the
//! fuzzer reaches the column decoding instead of stopping at the checksum.

use libfuzzer_sys::fuzz_target;

#[path = "../../strata/src/remote/manifest.rs"]
#[allow(dead_code)]
mod manifest;

fn envelope(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(b"STRATAMF");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    for bytes in [data.to_vec(), envelope(data)] {
        if let Ok(m) = manifest::Manifest::decode(&bytes) {
            let again = m.encode().expect("a decoded manifest encodes");
            assert_eq!(manifest::Manifest::decode(&again).expect("re-decodes"), m);
        }
    }
});
