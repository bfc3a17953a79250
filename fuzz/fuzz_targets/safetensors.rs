#![no_main]
//! See `beit::fuzzing::safetensors`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beit::fuzzing::safetensors(data);
});
