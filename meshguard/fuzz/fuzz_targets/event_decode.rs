//! Ring-buffer records come from the kernel, but a mismatched or corrupted one must be refused,
//! never misread or a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::event::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode(data) {
        if let Some(sample) = event.sample {
            assert!(sample.bytes.len() <= data.len());
        }
    }
});
