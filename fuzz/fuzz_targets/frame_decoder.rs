//! Arbitrary bytes into the frame decoder: never a panic; whatever decodes
//! re-encodes and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachecast::fuzz::frames(data);
});
