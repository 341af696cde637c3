//! Fuzzes the frame decoder: any bytes, as a frame on a connection whose
//! next sequence number is the first input byte. The decoder must refuse or
//! accept, never panic. Run: `cargo +nightly fuzz run frame_decoder`
//! (from crates/fabric). CI runs the deterministic stand-in in wire.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_fabric::wire::{decode_frame, MacKey};

fuzz_target!(|data: &[u8]| {
    let key = MacKey::new(b"fuzz");
    let seq = data.first().copied().unwrap_or(0) as u64;
    let _ = decode_frame(data, &key, seq, 1 << 20);
});
