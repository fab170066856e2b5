//! The payload fingerprint, the stream reassembly and the redacted evidence read bytes straight
//! off the wire: they must never panic or read past their input, whatever it is; reassembly
//! gives back the stream it was fed, never more than `HELLO_MAX` of it; what the fingerprint
//! names comes from its input; and redaction never echoes a header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::fingerprint::{
    fingerprint, redacted, sample_want, Fingerprint, Reassembly, Transport, HELLO_MAX,
};

fuzz_target!(|data: &[u8]| {
    read(data);
    if let Some(head) = redacted(data) {
        for line in head.lines().skip(1) {
            assert!(line.ends_with(": <redacted>"), "{line}");
        }
    }
    reassemble(data);
});

/// Fingerprints `stream` over both transports.
fn read(stream: &[u8]) {
    for transport in [Transport::Tcp, Transport::Udp] {
        if let Fingerprint::Tls(info) = fingerprint(stream, transport) {
            assert_eq!(transport, Transport::Tcp, "TLS over UDP");
            for name in info.sni.iter().chain(&info.alpn) {
                assert!(from_input(name, stream), "{name:?} is not in the input");
            }
        }
    }
    assert!(sample_want(stream) <= HELLO_MAX);
}

/// A name's bytes appear in the input, in order: a handshake message joined from several
/// records' fragments need not hold them side by side. Names with bytes that are not UTF-8
/// (replaced in the string) are let through.
fn from_input(name: &str, input: &[u8]) -> bool {
    if name.contains(char::REPLACEMENT_CHARACTER) {
        return true;
    }
    let mut rest = input.iter();
    name.bytes().all(|b| rest.any(|&c| c == b))
}

/// Splits the input into a stream and, from its tail, the samples of it to reassemble: the
/// last byte counts the 4-byte samples before it (offset, length; both u16) and, with bit 5,
/// asks for the whole stream then a conflicting copy of it. Offsets with their top bit set are
/// moved to where the stream offset would overflow.
fn reassemble(data: &[u8]) {
    let Some((&control, rest)) = data.split_last() else {
        return;
    };
    let Some(stream_len) = rest.len().checked_sub(usize::from(control % 32) * 4) else {
        return;
    };
    let (stream, samples) = rest.split_at(stream_len);
    let mut r = Reassembly::default();
    for sample in samples.chunks_exact(4) {
        let offset = u16::from_be_bytes([sample[0], sample[1]]);
        let len = usize::from(u16::from_be_bytes([sample[2], sample[3]]));
        if offset & 0x8000 != 0 {
            // Past u32 or past HELLO_MAX: dropped either way.
            r.add(
                u32::MAX - u32::from(offset & 0xff),
                &stream[..len.min(stream.len())],
            );
            continue;
        }
        let start = usize::from(offset);
        if start <= stream.len() {
            r.add(
                u32::from(offset),
                &stream[start..start.saturating_add(len).min(stream.len())],
            );
        }
    }
    if control & 0x20 != 0 {
        r.add(0, stream);
        assert!(!r.has_gap());
        assert_eq!(r.contiguous().len(), stream.len().min(HELLO_MAX));
        let before = r.contiguous().to_vec();
        let conflicting: Vec<u8> = stream.iter().map(|b| !b).collect();
        r.add(0, &conflicting);
        assert_eq!(r.contiguous(), before, "the first bytes seen stay");
    }
    let held = r.contiguous();
    assert!(held.len() <= HELLO_MAX);
    assert_eq!(
        held,
        &stream[..held.len()],
        "reassembly gives back the stream"
    );
    assert!(!r.complete() || !held.is_empty());
    read(held);
}
