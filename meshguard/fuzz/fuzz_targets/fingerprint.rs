//! The payload fingerprint reads bytes straight off the wire: it must never panic or read past
//! its input, whatever they are.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::fingerprint::{fingerprint, Fingerprint};

fuzz_target!(|data: &[u8]| {
    if let Fingerprint::Tls(info) = fingerprint(data) {
        // Whatever was read came from the input.
        if let Some(sni) = info.sni {
            assert!(sni.len() <= data.len() * 3);
        }
    }
});
