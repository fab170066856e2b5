//! The payload fingerprint and the redacted evidence read bytes straight off the wire: they must
//! never panic or read past their input, whatever it is, and redaction never echoes a header
//! value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::fingerprint::{fingerprint, redacted, Fingerprint};

fuzz_target!(|data: &[u8]| {
    if let Fingerprint::Tls(info) = fingerprint(data) {
        // Whatever was read came from the input.
        if let Some(sni) = info.sni {
            assert!(sni.len() <= data.len() * 3);
        }
    }
    if let Some(head) = redacted(data) {
        for line in head.lines().skip(1) {
            assert!(line.ends_with(": <redacted>"), "{line}");
        }
    }
});
