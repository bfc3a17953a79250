#![no_main]
//! See `beit::fuzzing::config`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::config(data);
});
