#![no_main]
//! See `beit::fuzzing::server_request`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::server_request(data);
});
