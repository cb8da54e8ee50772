//! Arbitrary bytes from a Redis-protocol client into the request parser:
//! never a panic, and the same requests however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachecast::fuzz::resp_requests(data);
});
