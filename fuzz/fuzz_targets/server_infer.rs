#![no_main]
//! See `beit::fuzzing::server_infer`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::server_infer(data);
});
