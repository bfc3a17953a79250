#![no_main]
//! See `beit::fuzzing::image`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::image(data);
});
