#![no_main]
//! See `beit::fuzzing::pickle`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::pickle(data);
});
