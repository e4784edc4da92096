//! Arbitrary bytes from the network through ferro-blockd's replication
//! frame decoder: it must never panic, and whatever it accepts must encode
//! back to exactly the bytes it took.
//!
//! The first input byte picks a mode. Even: the rest goes in as it is, as a
//! hostile peer would send it. Odd: the rest has its CRCs fixed up first, so
//! the checks behind them (lengths, kinds, fields, messages) are explored
//! too instead of stopping at a CRC mismatch. Every kind is reached this
//! way, `Checksums` and `Sums` (resync) included.

#![no_main]

use ferro_blockd::wire::{crc32c, decode, encode, frame_len, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            let mut sealed = rest.to_vec();
            reseal(&mut sealed);
            check(&sealed);
        }
        Some((_, rest)) => check(rest),
        None => check(data),
    }
});

fn check(data: &[u8]) {
    let announced = frame_len(data);
    match decode(data) {
        Ok(Some((frame, used))) => {
            assert_eq!(announced, Ok(Some(used)));
            let again = encode(&frame).expect("a decoded frame encodes");
            assert_eq!(&again[..], &data[..used], "round trip changed the bytes");
        }
        // Waiting for more: the header seen so far is fine.
        Ok(None) => assert!(announced.is_ok()),
        Err(e) => {
            // The header alone may be fine when the payload is not; then
            // the whole frame was there.
            if let Ok(Some(n)) = announced {
                assert!(n <= data.len(), "{e}: failed before the frame was complete");
            }
        }
    }
}

/// Writes correct data and header CRCs into what is there of a frame.
fn reseal(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let vend = (HEADER_LEN + usize::from(b[7])).min(b.len());
    let len = u32::from_le_bytes([b[32], b[33], b[34], b[35]]) as usize;
    // Write, ReadData, Nack and Sums carry a payload.
    let plen = if matches!(b[5], 2 | 5 | 7 | 9) { len } else { 0 };
    let pend = vend.saturating_add(plen).min(b.len());
    let data_crc = crc32c(&b[vend..pend]);
    b[36..40].copy_from_slice(&data_crc.to_le_bytes());
    let mut covered = b[..40].to_vec();
    covered.extend_from_slice(&b[HEADER_LEN..vend]);
    let header_crc = crc32c(&covered);
    b[40..44].copy_from_slice(&header_crc.to_le_bytes());
}
