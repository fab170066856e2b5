//! The payload fingerprint, the stream reassembly and the redacted evidence read bytes straight
//! off the wire: they must never panic or read past their input, whatever it is; reassembly
//! gives back the stream it was fed, never more than `HELLO_MAX` of it; what the fingerprint
//! names comes from its input (an HTTP path from a well-formed first line, without query,
//! parameters or userinfo); redaction never echoes a header value; and nothing of it reaches a
//! person's terminal with a control character in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::{
    cli::display::{has_unsafe, printable},
    fingerprint::{
        fingerprint, redacted, sample_want, Fingerprint, PlaintextHint, Reassembly, Transport,
        HELLO_MAX,
    },
};

fuzz_target!(|data: &[u8]| {
    read(data);
    if let Some(head) = redacted(data) {
        redaction(&head, data);
    }
    reassemble(data);
});

/// Fingerprints `stream` over both transports.
fn read(stream: &[u8]) {
    for transport in [Transport::Tcp, Transport::Udp] {
        match fingerprint(stream, transport) {
            Fingerprint::Tls(info) => {
                assert_eq!(transport, Transport::Tcp, "TLS over UDP");
                for name in info.sni.iter().chain(&info.alpn) {
                    assert!(from_input(name, stream), "{name:?} is not in the input");
                    shown(name);
                }
            }
            Fingerprint::Plaintext(PlaintextHint::HttpRequest {
                path: Some(path), ..
            }) => {
                http_path(&path, stream);
                shown(&path);
            }
            _ => {}
        }
    }
    assert!(sample_want(stream) <= HELLO_MAX);
}

/// What a table or `explain` would print of `text` holds no control character, and is `text`
/// itself when it had none.
fn shown(text: &str) {
    let shown = printable(text);
    assert!(!has_unsafe(&shown), "{text:?} shown as {shown:?}");
    assert_eq!(has_unsafe(text), shown != text, "{text:?}");
}

/// A reported path: from the request target of a first line ending in CR LF, in order (the
/// query, parameters and userinfo cut out of it), and nothing that may hold a token.
fn http_path(path: &str, stream: &[u8]) {
    let line = stream.split(|&b| b == b'\n').next().unwrap_or_default();
    assert!(
        stream.len() > line.len() && line.ends_with(b"\r"),
        "{path:?} from a line without CR LF"
    );
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let kept = path.strip_suffix('…').unwrap_or(path);
    let mut rest = target.iter();
    assert!(
        kept.bytes().all(|b| rest.any(|&c| c == b)),
        "{path:?} is not in the first line's target"
    );
    assert!(
        kept.bytes().all(|b| b.is_ascii_graphic()),
        "{path:?}: a control character or space"
    );
    assert!(
        !kept.contains(['?', '#', ';']),
        "{path:?}: a query or parameter"
    );
    let authority = match kept.split_once("://") {
        Some((_, rest)) => rest.split('/').next().unwrap_or_default(),
        None if kept.starts_with('/') => "",
        None => kept,
    };
    assert!(!authority.contains('@'), "{path:?}: userinfo");
}

/// A redacted head: the first line as the fingerprint read it, then header names only, each
/// value `<redacted>`.
fn redaction(head: &str, sample: &[u8]) {
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or_default();
    match fingerprint(sample, Transport::Tcp) {
        Fingerprint::Plaintext(PlaintextHint::HttpRequest { method, path }) => assert_eq!(
            first,
            format!("{method} {} HTTP/1.x", path.as_deref().unwrap_or("…"))
        ),
        Fingerprint::Plaintext(PlaintextHint::HttpResponse) => {
            let (version, code) = first.split_once(' ').expect("a status line");
            assert!(version.bytes().all(|b| b.is_ascii_graphic()), "{first:?}");
            assert!(
                code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()),
                "{first:?}"
            );
        }
        other => panic!("a redacted head for {other:?}"),
    }
    for line in lines {
        let name = line.strip_suffix(": <redacted>").expect(line);
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{line:?}"
        );
    }
    for line in head.split('\n') {
        assert!(!has_unsafe(line), "{line:?}");
    }
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
