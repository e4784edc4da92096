//! Arbitrary bytes from the network through ferro-blockd's replication
//! frame decoder: it must never panic, and whatever it accepts must encode
//! back to exactly the bytes it took.

#![no_main]

use ferro_blockd::wire::{decode, encode, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
