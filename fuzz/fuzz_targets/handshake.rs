//! Arbitrary bytes from a dialer into the acceptor's handshake and session:
//! never a panic, never a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachecast::fuzz::acceptor(data);
});
