//! What the first payload bytes of a flow direction say about its encryption: a TLS record and,
//! for handshakes, the ClientHello's SNI, ALPN and offered versions or the ServerHello's chosen
//! version; otherwise a plaintext protocol hint. Pure and panic-free on any input, since the
//! bytes come off the wire.

use serde::Serialize;

/// How a payload sample reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fingerprint {
    Tls(TlsInfo),
    Plaintext(PlaintextHint),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TlsInfo {
    /// The negotiated version where the sample shows it (ServerHello), else the highest offered.
    pub version: Option<TlsVersion>,
    pub sni: Option<String>,
    /// Offered by the client, in its order.
    pub alpn: Vec<String>,
    #[serde(skip)]
    pub handshake: Option<Handshake>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    ClientHello,
    ServerHello,
}

/// A TLS protocol version as its wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsVersion(pub u16);

impl TlsVersion {
    pub fn name(self) -> String {
        match self.0 {
            0x0300 => "SSL 3.0".into(),
            0x0301 => "TLS 1.0".into(),
            0x0302 => "TLS 1.1".into(),
            0x0303 => "TLS 1.2".into(),
            0x0304 => "TLS 1.3".into(),
            other => format!("0x{other:04x}"),
        }
    }

    /// GREASE values (RFC 8701) are offered to keep peers honest, never negotiated.
    fn is_grease(self) -> bool {
        self.0 & 0x0f0f == 0x0a0a && self.0 >> 8 == self.0 & 0xff
    }
}

impl Serialize for TlsVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// The application protocol a plaintext sample looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaintextHint {
    /// An HTTP/1 request with its method and path. The path never carries its query string or
    /// fragment (they may hold tokens); `None` when the sample ends before the path does.
    HttpRequest {
        method: &'static str,
        path: Option<String>,
    },
    HttpResponse,
    /// The HTTP/2 connection preface (h2c, prior knowledge).
    Http2Preface,
    Ssh,
    Unknown,
}

impl PlaintextHint {
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::HttpRequest { .. } | Self::HttpResponse => "http/1",
            Self::Http2Preface => "h2c",
            Self::Ssh => "ssh",
            Self::Unknown => "unknown",
        }
    }
}

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

const HTTP_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn fingerprint(sample: &[u8]) -> Fingerprint {
    match tls(sample) {
        Some(info) => Fingerprint::Tls(info),
        None => Fingerprint::Plaintext(plaintext(sample)),
    }
}

/// A TLS record header: a known content type, major version 3, minor 0 to 4.
fn is_tls_record(b: &[u8]) -> bool {
    matches!(b, [20..=24, 3, 0..=4, ..])
}

fn tls(sample: &[u8]) -> Option<TlsInfo> {
    if sample.len() < 5 || !is_tls_record(sample) {
        return None;
    }
    let mut info = TlsInfo {
        version: Some(TlsVersion(u16::from_be_bytes([sample[1], sample[2]]))),
        ..TlsInfo::default()
    };
    if sample[0] == CONTENT_HANDSHAKE {
        // The sample may end inside the handshake: read what is there.
        let _ = handshake(&sample[5..], &mut info);
    }
    Some(info)
}

/// A cursor that never reads past its input: every read returns `None` at the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    /// A length-prefixed vector, whole or `None`.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u8()?);
        self.take(n).map(Reader)
    }
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        self.take(n).map(Reader)
    }
    /// A length-prefixed vector, cut short if the sample ends first: for the containers a
    /// sample may end inside (the extension block, an extension, a list).
    fn vec16_partial(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        Some(self.prefix(n))
    }
    fn prefix(&mut self, n: usize) -> Reader<'a> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Reader(head)
    }
}

fn handshake(body: &[u8], info: &mut TlsInfo) -> Option<()> {
    let mut r = Reader(body);
    let kind = r.u8()?;
    let _len = r.u24()?;
    let legacy_version = TlsVersion(r.u16()?);
    info.version = Some(legacy_version);
    r.take(32)?; // random
    r.vec8()?; // session id
    match kind {
        HANDSHAKE_CLIENT_HELLO => {
            info.handshake = Some(Handshake::ClientHello);
            r.vec16()?; // cipher suites
            r.vec8()?; // compression methods
        }
        HANDSHAKE_SERVER_HELLO => {
            info.handshake = Some(Handshake::ServerHello);
            r.u16()?; // cipher suite
            r.u8()?; // compression method
        }
        _ => return None,
    }
    let mut extensions = r.vec16_partial()?;
    while let (Some(ext), Some(len)) = (extensions.u16(), extensions.u16()) {
        let mut data = extensions.prefix(usize::from(len));
        match ext {
            EXT_SERVER_NAME => {
                let mut names = data.vec16_partial()?;
                while let Some(name_type) = names.u8() {
                    let name = names.vec16()?;
                    if name_type == 0 {
                        info.sni = Some(String::from_utf8_lossy(name.0).into_owned());
                    }
                }
            }
            EXT_ALPN => {
                let mut protocols = data.vec16_partial()?;
                while let Some(p) = protocols.vec8() {
                    if p.0.is_empty() {
                        break;
                    }
                    info.alpn.push(String::from_utf8_lossy(p.0).into_owned());
                }
            }
            EXT_SUPPORTED_VERSIONS if kind == HANDSHAKE_CLIENT_HELLO => {
                let mut versions = data.vec8()?;
                while let Some(v) = versions.u16() {
                    let v = TlsVersion(v);
                    if !v.is_grease() && Some(v) > info.version {
                        info.version = Some(v);
                    }
                }
            }
            EXT_SUPPORTED_VERSIONS => info.version = data.u16().map(TlsVersion),
            _ => {}
        }
    }
    Some(())
}

fn plaintext(sample: &[u8]) -> PlaintextHint {
    if sample.starts_with(HTTP2_PREFACE) {
        return PlaintextHint::Http2Preface;
    }
    if sample.starts_with(b"HTTP/1.") {
        return PlaintextHint::HttpResponse;
    }
    if sample.starts_with(b"SSH-") {
        return PlaintextHint::Ssh;
    }
    for method in HTTP_METHODS {
        if sample.starts_with(method.as_bytes()) && sample.get(method.len()) == Some(&b' ') {
            return PlaintextHint::HttpRequest {
                method,
                path: request_path(&sample[method.len() + 1..]),
            };
        }
    }
    PlaintextHint::Unknown
}

/// Longest path kept, in characters.
const MAX_PATH: usize = 256;

/// The request target's path, without query string or fragment, from the bytes after the
/// method: only when its end is in the sample, and only printable ASCII (escaped otherwise).
fn request_path(target: &[u8]) -> Option<String> {
    let end = target.iter().position(|&b| b == b' ' || b == b'\r')?;
    let target = &target[..end];
    let path_end = target
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let mut path = String::new();
    for &b in &target[..path_end] {
        if path.len() >= MAX_PATH {
            path.push('…');
            break;
        }
        if b.is_ascii_graphic() {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("\\x{b:02x}"));
        }
    }
    Some(path)
}

/// The opt-in redacted evidence (`--evidence redacted`) of an HTTP/1 sample: its first line
/// (a request's path without query string) and its header names, every header value replaced
/// by `<redacted>`, never a body. Nothing for anything else: TLS is fully described by its
/// fingerprint, and unknown plaintext cannot be redacted safely.
pub fn redacted(sample: &[u8]) -> Option<String> {
    let head = match fingerprint(sample) {
        Fingerprint::Plaintext(PlaintextHint::HttpRequest { method, path }) => {
            format!("{method} {} HTTP/1.x", path.as_deref().unwrap_or("…"))
        }
        Fingerprint::Plaintext(PlaintextHint::HttpResponse) => {
            let line = sample.split(|&b| b == b'\r' || b == b'\n').next()?;
            // "HTTP/1.1 200 OK": the version and the status code; the reason phrase is free text.
            let mut words = line.splitn(3, |&b| b == b' ');
            let version = words
                .next()
                .filter(|w| w.iter().all(u8::is_ascii_graphic))?;
            let code = words
                .next()
                .filter(|c| c.len() == 3 && c.iter().all(u8::is_ascii_digit))?;
            format!(
                "{} {}",
                String::from_utf8_lossy(version),
                String::from_utf8_lossy(code)
            )
        }
        _ => return None,
    };
    let mut out = head;
    // Header lines after the first, up to the blank line; the last one may be cut short.
    for line in sample.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            break;
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-') {
            break;
        }
        out.push_str(&format!("\n{}: <redacted>", String::from_utf8_lossy(name)));
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a ClientHello record the way real clients lay it out.
    pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&str], versions: &[u16]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            push_ext(&mut exts, EXT_SERVER_NAME, &with_len16(&list));
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(p.as_bytes());
            }
            push_ext(&mut exts, EXT_ALPN, &with_len16(&list));
        }
        if !versions.is_empty() {
            let mut list = vec![(versions.len() * 2) as u8];
            for v in versions {
                list.extend(v.to_be_bytes());
            }
            push_ext(&mut exts, EXT_SUPPORTED_VERSIONS, &list);
        }
        let mut body = vec![3, 3];
        body.extend([0x11; 32]);
        body.push(0);
        body.extend(with_len16(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]);
        body.extend(with_len16(&exts));
        record(HANDSHAKE_CLIENT_HELLO, &body)
    }

    pub(crate) fn server_hello(version: Option<u16>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(v) = version {
            push_ext(&mut exts, EXT_SUPPORTED_VERSIONS, &v.to_be_bytes());
        }
        let mut body = vec![3, 3];
        body.extend([0x22; 32]);
        body.push(0);
        body.extend([0x13, 0x01, 0]);
        body.extend(with_len16(&exts));
        record(HANDSHAKE_SERVER_HELLO, &body)
    }

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut hs = vec![kind];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend(with_len16(&hs));
        rec
    }

    fn with_len16(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend(b);
        v
    }

    fn push_ext(exts: &mut Vec<u8>, kind: u16, data: &[u8]) {
        exts.extend(kind.to_be_bytes());
        exts.extend((data.len() as u16).to_be_bytes());
        exts.extend(data);
    }

    fn tls_info(
        version: u16,
        sni: Option<&str>,
        alpn: &[&str],
        hs: Option<Handshake>,
    ) -> Fingerprint {
        Fingerprint::Tls(TlsInfo {
            version: Some(TlsVersion(version)),
            sni: sni.map(str::to_string),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            handshake: hs,
        })
    }

    #[test]
    fn reads_handshakes() {
        let ch = Some(Handshake::ClientHello);
        let istio_alpn = ["istio-peer-exchange", "istio"];
        let istio_sni = "outbound_.80_._.web.shop.svc.cluster.local";
        let cases: Vec<(&str, Vec<u8>, Fingerprint)> = vec![
            (
                "TLS 1.3 ClientHello with SNI and ALPN",
                client_hello(Some("svc.test"), &["h2", "http/1.1"], &[0x0304, 0x0303]),
                tls_info(0x0304, Some("svc.test"), &["h2", "http/1.1"], ch),
            ),
            (
                "Istio sidecar mTLS",
                client_hello(Some(istio_sni), &istio_alpn, &[0x0304]),
                tls_info(0x0304, Some(istio_sni), &istio_alpn, ch),
            ),
            (
                "TLS 1.2 only, no extensions",
                client_hello(None, &[], &[]),
                tls_info(0x0303, None, &[], ch),
            ),
            (
                "GREASE is not a version",
                client_hello(None, &[], &[0x7a7a, 0x0303]),
                tls_info(0x0303, None, &[], ch),
            ),
            (
                "ServerHello picks TLS 1.3",
                server_hello(Some(0x0304)),
                tls_info(0x0304, None, &[], Some(Handshake::ServerHello)),
            ),
            (
                "application data record",
                vec![23, 3, 3, 0, 5, 1, 2, 3, 4, 5],
                tls_info(0x0303, None, &[], None),
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(fingerprint(&bytes), want, "{name}");
        }
    }

    #[test]
    fn reads_plaintext() {
        let cases: [(&[u8], PlaintextHint); 7] = [
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                PlaintextHint::HttpRequest {
                    method: "GET",
                    path: Some("/".into()),
                },
            ),
            (
                b"POST /api HTTP/1.1\r\n",
                PlaintextHint::HttpRequest {
                    method: "POST",
                    path: Some("/api".into()),
                },
            ),
            (b"HTTP/1.0 200 OK\r\n", PlaintextHint::HttpResponse),
            (HTTP2_PREFACE, PlaintextHint::Http2Preface),
            (b"SSH-2.0-OpenSSH_9.2\r\n", PlaintextHint::Ssh),
            (b"GETTER", PlaintextHint::Unknown),
            (b"\x16\x03\x09 not tls", PlaintextHint::Unknown),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                fingerprint(bytes),
                Fingerprint::Plaintext(want),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn http_paths_lose_their_query_strings() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (b"GET /orders?token=s3cret HTTP/1.1\r\n", Some("/orders")),
            (b"POST /pay#frag HTTP/1.1\r\n", Some("/pay")),
            (b"GET /a%20b HTTP/1.1\r\n", Some("/a%20b")),
            (b"GET http://h/x?y HTTP/1.1\r\n", Some("http://h/x")),
            (b"GET /cut-before-its-end", None),
            (b"GET /\x01 HTTP/1.1\r\n", Some("/\\x01")),
        ];
        for (sample, want) in cases {
            let Fingerprint::Plaintext(PlaintextHint::HttpRequest { path, .. }) =
                fingerprint(sample)
            else {
                panic!("{sample:?}: not an HTTP request")
            };
            assert_eq!(path.as_deref(), want, "{sample:?}");
        }
    }

    #[test]
    fn redacted_evidence_keeps_names_and_drops_values() {
        let cases: [(&[u8], Option<&str>); 5] = [
            (
                b"GET /orders?token=s3cret HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer abc\r\n\r\nbody",
                Some("GET /orders HTTP/1.x\nHost: <redacted>\nAuthorization: <redacted>"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nSet-Cookie: id=1\r\n\r\n",
                Some("HTTP/1.1 200\nSet-Cookie: <redacted>"),
            ),
            (b"GET / HTTP/1.1\r\nX-Cut: par", Some("GET / HTTP/1.x\nX-Cut: <redacted>")),
            (&[22, 3, 1, 0, 5, 1, 0, 0, 1, 3], None),
            (b"\x00\x01binary", None),
        ];
        for (sample, want) in cases {
            assert_eq!(redacted(sample).as_deref(), want, "{sample:?}");
            let out = redacted(sample).unwrap_or_default();
            for secret in ["s3cret", "Bearer", "abc", "id=1", "shop", "body", "par"] {
                assert!(!out.contains(secret), "{sample:?} leaks {secret}: {out}");
            }
        }
    }

    #[test]
    fn truncated_client_hello_keeps_what_it_read() {
        let full = client_hello(Some("a.example"), &["h2"], &[0x0304]);
        // Every prefix parses without panicking; the SNI appears once its bytes are all there.
        let sni_end = full.windows(9).position(|w| w == b"a.example").unwrap() + 9;
        for cut in 0..full.len() {
            let fp = fingerprint(&full[..cut]);
            if cut >= 5 {
                let Fingerprint::Tls(info) = fp else {
                    panic!("cut {cut}: not TLS")
                };
                assert_eq!(info.sni.is_some(), cut >= sni_end, "cut {cut}");
            }
        }
    }
}
