//! What the first stream bytes of a flow direction say about its encryption: a TLS record and,
//! for handshakes, the ClientHello's SNI, ALPN and offered versions or the ServerHello's chosen
//! version; SSH, QUIC or DTLS; otherwise a plaintext protocol hint. Also how many stream bytes
//! the kernel samples for that, and how the agent puts its samples back in order. Pure and
//! panic-free on any input, since the bytes come off the wire.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::wire::wire_enum;

// The kernel's `skb.rs` applies the same sampling rule (`stream_want`) to the same first bytes,
// with the same limits, shared through `meshguard-ebpf`.
pub use meshguard_ebpf::{HELLO_MAX, PLAIN_SAMPLE};

// Reassembly keeps offsets as u16.
const _: () = assert!(HELLO_MAX <= u16::MAX as usize);

/// How many bytes of a TCP direction's stream to sample, from its first payload bytes (at least
/// the first 9 when the packet has them): for a TLS handshake record, the record and the header
/// of the record after it (which tells a real handshake from a fake one followed by plaintext),
/// or `HELLO_MAX` when its ClientHello or ServerHello spans records; else `PLAIN_SAMPLE`.
pub fn sample_want(first: &[u8]) -> usize {
    let Some(record) = handshake_record_len(first) else {
        return PLAIN_SAMPLE;
    };
    let spans = matches!(
        first[5..],
        [HANDSHAKE_CLIENT_HELLO | HANDSHAKE_SERVER_HELLO, a, b, c, ..] if u24([a, b, c]) + 4 > record
    );
    if spans {
        HELLO_MAX
    } else {
        (RECORD_HEADER + record + RECORD_HEADER).min(HELLO_MAX)
    }
}

/// The length the first record announces, when `stream` starts with a TLS handshake record.
fn handshake_record_len(stream: &[u8]) -> Option<usize> {
    match stream {
        [CONTENT_HANDSHAKE, 3, _, hi, lo, ..] => Some(usize::from(u16::from_be_bytes([*hi, *lo]))),
        _ => None,
    }
}

/// Most separate byte ranges a `Reassembly` holds: the kernel sends a handful of samples per
/// direction, so more islands than this come from a broken or hostile sender; further ones are
/// dropped, which only leaves a gap.
const MAX_SPANS: usize = 8;

/// The sampled stream bytes of one TCP direction, put back together from sample events that
/// each carry their offset in the stream. Retransmitted, overlapping and reordered samples are
/// fine: the first bytes seen for an offset stay. Holds at most `HELLO_MAX` bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reassembly {
    /// By stream offset; zero where nothing arrived yet.
    bytes: Vec<u8>,
    /// The offset ranges held: sorted, neither overlapping nor touching.
    spans: Vec<(u16, u16)>,
}

impl Reassembly {
    /// Adds the bytes sampled at `offset` in the stream. Bytes past `HELLO_MAX`, and samples
    /// whose end would overflow the offset, are dropped.
    pub fn add(&mut self, offset: u32, bytes: &[u8]) {
        let Some(end) = u32::try_from(bytes.len())
            .ok()
            .and_then(|len| offset.checked_add(len))
        else {
            return;
        };
        let kept = |at: u32| usize::try_from(at).map_or(HELLO_MAX, |at| at.min(HELLO_MAX));
        let (start, end) = (kept(offset), kept(end));
        if start >= end {
            return;
        }
        // The spans this one overlaps or touches, merged into one below.
        let first = self.spans.partition_point(|s| usize::from(s.1) < start);
        let last = self.spans.partition_point(|s| usize::from(s.0) <= end);
        if first == last && self.spans.len() >= MAX_SPANS {
            return;
        }
        if self.bytes.len() < end {
            // Exactly: the buffer never outgrows the furthest byte kept.
            self.bytes.reserve_exact(end - self.bytes.len());
            self.bytes.resize(end, 0);
        }
        let mut at = start;
        for &(held_start, held_end) in &self.spans[first..last] {
            let held_start = usize::from(held_start);
            if at < held_start {
                self.bytes[at..held_start].copy_from_slice(&bytes[at - start..held_start - start]);
            }
            at = at.max(usize::from(held_end));
        }
        if at < end {
            self.bytes[at..end].copy_from_slice(&bytes[at - start..end - start]);
        }
        // Both fit in u16: they are at most HELLO_MAX.
        let (mut lo, mut hi) = (start as u16, end as u16);
        if first < last {
            lo = lo.min(self.spans[first].0);
            hi = hi.max(self.spans[last - 1].1);
        }
        self.spans.splice(first..last, [(lo, hi)]);
    }

    /// The stream's first bytes, up to the first gap.
    pub fn contiguous(&self) -> &[u8] {
        match self.spans.first() {
            Some(&(0, end)) => &self.bytes[..usize::from(end)],
            _ => &[],
        }
    }

    /// All the kernel samples of the direction are here: the contiguous bytes hold what
    /// `sample_want` asks of them, or any bytes at all when they do not start with a TLS
    /// handshake record (those come from one packet).
    pub fn complete(&self) -> bool {
        let held = self.contiguous();
        match handshake_record_len(held) {
            Some(_) => held.len() >= sample_want(held),
            None => !held.is_empty(),
        }
    }

    /// Bytes are held past a hole (or before the stream's start arrived).
    pub fn has_gap(&self) -> bool {
        self.spans.len() > 1 || self.spans.first().is_some_and(|s| s.0 > 0)
    }
}

/// What carried the bytes: TLS rides TCP, QUIC and DTLS ride UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// How a payload sample reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fingerprint {
    Tls(TlsInfo),
    /// Encrypted by a protocol other than TLS.
    Encrypted(EncryptedProtocol),
    Plaintext(PlaintextHint),
}

wire_enum! {
    /// What the wire showed of a flow's encryption: TLS, another encrypted protocol, or
    /// plaintext.
    pub enum Encryption ("encryption") {
        Tls = "tls",
        /// DTLS records (over UDP).
        Dtls = "dtls",
        /// QUIC long-header packets of a known version (over UDP).
        Quic = "quic",
        /// The SSH protocol: banner and key exchange, then encrypted.
        Ssh = "ssh",
        Plaintext = "plaintext",
        /// No payload seen yet.
        Unknown = "unknown",
    }
}

impl Encryption {
    /// Encrypted on the wire, whatever the protocol.
    pub fn is_encrypted(self) -> bool {
        matches!(self, Self::Tls | Self::Dtls | Self::Quic | Self::Ssh)
    }

    /// How a sentence names it.
    pub fn word(self) -> &'static str {
        match self {
            Self::Tls => "TLS",
            Self::Dtls => "DTLS",
            Self::Quic => "QUIC",
            Self::Ssh => "SSH",
            Self::Plaintext | Self::Unknown => "plaintext",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncryptedProtocol {
    /// Its identification string and key exchange go in the clear, everything after encrypted.
    Ssh,
    Quic,
    Dtls,
}

impl EncryptedProtocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ssh => "ssh",
            Self::Quic => "quic",
            Self::Dtls => "dtls",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// The negotiated version where the sample shows it (ServerHello), else the highest offered.
    pub version: Option<TlsVersion>,
    pub sni: Option<String>,
    /// Offered by the client, in its order.
    pub alpn: Vec<String>,
    #[serde(skip)]
    pub handshake: Option<Handshake>,
    /// The first handshake message (or, if the stream starts with another record, that record)
    /// lay whole in the stream. When false, the SNI and ALPN past the cut are unknown.
    #[serde(skip)]
    pub complete: bool,
    /// Whether a TLS record header follows the record(s) carrying the first handshake message:
    /// `Some(false)` is a handshake faked ahead of something else (plaintext), `None` that the
    /// stream ends before telling.
    #[serde(skip)]
    pub then_tls: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    ClientHello,
    ServerHello,
}

/// A TLS protocol version as its wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsVersion(pub u16);

/// The versions with a name, as records show them; any other is shown as its number in hex.
const TLS_VERSION_NAMES: [(u16, &str); 5] = [
    (0x0300, "SSL 3.0"),
    (0x0301, "TLS 1.0"),
    (0x0302, "TLS 1.1"),
    (0x0303, "TLS 1.2"),
    (0x0304, "TLS 1.3"),
];

impl TlsVersion {
    pub fn name(self) -> String {
        match TLS_VERSION_NAMES.iter().find(|(v, _)| *v == self.0) {
            Some((_, name)) => (*name).to_string(),
            None => format!("0x{:04x}", self.0),
        }
    }

    /// The version [`TlsVersion::name`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        let named = TLS_VERSION_NAMES.iter().find(|(_, n)| *n == name);
        let number = || {
            let hex = name.strip_prefix("0x").filter(|h| h.len() == 4)?;
            u16::from_str_radix(hex, 16).ok()
        };
        named.map(|(v, _)| *v).or_else(number).map(Self)
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

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = Cow::<str>::deserialize(d)?;
        Self::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("{name:?} is not a TLS version")))
    }
}

wire_enum! {
    /// The application protocol of plaintext, as records name it.
    pub enum PlaintextProtocol ("plaintext protocol") {
        /// HTTP/1, a request or a response.
        Http1 = "http/1",
        /// The HTTP/2 connection preface (h2c, prior knowledge).
        H2c = "h2c",
        Unknown = "unknown",
    }
}

/// The application protocol a plaintext sample looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaintextHint {
    /// An HTTP/1 request with its method and path. The path never carries its query string,
    /// fragment, path parameters or userinfo (they may hold tokens); `None` unless the sample
    /// holds a whole, well-formed request line.
    HttpRequest {
        method: &'static str,
        path: Option<String>,
    },
    HttpResponse,
    /// The HTTP/2 connection preface (h2c, prior knowledge).
    Http2Preface,
    Unknown,
}

impl PlaintextHint {
    pub fn protocol(&self) -> PlaintextProtocol {
        match self {
            Self::HttpRequest { .. } | Self::HttpResponse => PlaintextProtocol::Http1,
            Self::Http2Preface => PlaintextProtocol::H2c,
            Self::Unknown => PlaintextProtocol::Unknown,
        }
    }
}

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// Longest SSH identification line, CR LF included (RFC 4253 4.2).
const SSH_ID_MAX: usize = 255;
/// Longest SSH binary packet every implementation must take (RFC 4253 6.1).
const SSH_PACKET_MAX: u32 = 35_000;
const SSH_MSG_KEXINIT: u8 = 20;

const QUIC_V1: u32 = 0x0000_0001;
const QUIC_V2: u32 = 0x6b33_43cf;
/// Drafts are 0xff0000xx.
const QUIC_DRAFT: u32 = 0xff00_0000;
const QUIC_CID_MAX: usize = 20;

const DTLS_RECORD_HEADER: usize = 13;
/// DTLS 1.0, 1.2 and 1.3 (whose records, past the handshake, say 1.2 anyway).
const DTLS_VERSIONS: [u16; 3] = [0xfeff, 0xfefd, 0xfefc];
/// Longest DTLS record fragment (RFC 6347 4.1).
const DTLS_FRAGMENT_MAX: usize = (1 << 14) + 2048;

const HTTP_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a direction's first stream bytes (for UDP, its first datagram's). TLS records say TLS
/// over TCP only; QUIC and DTLS are looked for over UDP only.
pub fn fingerprint(stream: &[u8], transport: Transport) -> Fingerprint {
    let encrypted = match transport {
        Transport::Tcp => {
            if let Some(info) = tls(stream) {
                return Fingerprint::Tls(info);
            }
            ssh(stream).then_some(EncryptedProtocol::Ssh)
        }
        Transport::Udp => {
            if quic(stream) {
                Some(EncryptedProtocol::Quic)
            } else {
                dtls(stream).then_some(EncryptedProtocol::Dtls)
            }
        }
    };
    match encrypted {
        Some(protocol) => Fingerprint::Encrypted(protocol),
        None => Fingerprint::Plaintext(plaintext(stream)),
    }
}

/// A TLS record header: a known content type, major version 3, minor 0 to 4.
fn is_tls_record(b: &[u8]) -> bool {
    matches!(b, [20..=24, 3, 0..=4, ..])
}

/// Whether `rest`, the bytes after a TLS record, start another record: `None` while too few of
/// them are there to tell.
fn record_follows(rest: &[u8]) -> Option<bool> {
    // The bytes not there yet stand in as a plausible header.
    let mut header = [CONTENT_HANDSHAKE, 3, 3];
    let n = rest.len().min(header.len());
    header[..n].copy_from_slice(&rest[..n]);
    match (is_tls_record(&header), n == header.len()) {
        (false, _) => Some(false),
        (true, true) => Some(true),
        (true, false) => None,
    }
}

fn tls(stream: &[u8]) -> Option<TlsInfo> {
    if stream.len() < RECORD_HEADER || !is_tls_record(stream) {
        return None;
    }
    let mut info = TlsInfo {
        version: Some(TlsVersion(u16::from_be_bytes([stream[1], stream[2]]))),
        ..TlsInfo::default()
    };
    let records_end = if stream[0] == CONTENT_HANDSHAKE {
        let first = FirstHandshake::gather(stream);
        // The stream may end inside the message: read what is there.
        let _ = handshake(&first.message, &mut info);
        info.complete = first.whole();
        first.records_end
    } else {
        let end = RECORD_HEADER + usize::from(u16::from_be_bytes([stream[3], stream[4]]));
        info.complete = stream.len() >= end;
        end
    };
    info.then_tls = stream.get(records_end..).and_then(record_follows);
    Some(info)
}

/// The first handshake message of a stream that starts with a handshake record, joined from
/// the fragments of the consecutive handshake records it spans (RFC 8446 5.1): at most
/// `HELLO_MAX` bytes of it, borrowed when one record holds it.
struct FirstHandshake<'a> {
    message: Cow<'a, [u8]>,
    /// Where the last record read ends in the stream (possibly past the stream's end).
    records_end: usize,
}

impl<'a> FirstHandshake<'a> {
    fn gather(stream: &'a [u8]) -> Self {
        let mut message: Cow<'a, [u8]> = Cow::Borrowed(&[]);
        let mut at = 0;
        // Each pass moves past a record header: at most a pass per 5 bytes of the stream.
        while let Some(header) = stream.get(at..at + RECORD_HEADER) {
            if header[0] != CONTENT_HANDSHAKE || !is_tls_record(header) {
                break;
            }
            let start = at + RECORD_HEADER;
            at = start + usize::from(u16::from_be_bytes([header[3], header[4]]));
            let fragment = &stream[start..at.min(stream.len())];
            let wanted = Self::wanted(&message);
            let fragment = &fragment[..fragment.len().min(wanted.saturating_sub(message.len()))];
            message = match message {
                Cow::Borrowed([]) => Cow::Borrowed(fragment),
                Cow::Borrowed(held) => {
                    // Sized once: the copy never grows past what is wanted.
                    let mut joined = Vec::with_capacity(wanted);
                    joined.extend_from_slice(held);
                    joined.extend_from_slice(fragment);
                    Cow::Owned(joined)
                }
                Cow::Owned(mut joined) => {
                    joined.extend_from_slice(fragment);
                    Cow::Owned(joined)
                }
            };
            if message.len() >= Self::wanted(&message) || at > stream.len() {
                break;
            }
        }
        // A fragment read before the message's header was whole may reach past the message.
        let len = message.len().min(Self::wanted(&message));
        match &mut message {
            Cow::Borrowed(held) => *held = &held[..len],
            Cow::Owned(joined) => joined.truncate(len),
        }
        Self {
            message,
            records_end: at,
        }
    }

    /// How many bytes of the message to gather: all, as its header says, up to `HELLO_MAX`.
    fn wanted(message: &[u8]) -> usize {
        match message {
            [_, a, b, c, ..] => (4 + u24([*a, *b, *c])).min(HELLO_MAX),
            _ => HELLO_MAX,
        }
    }

    fn whole(&self) -> bool {
        matches!(*self.message, [_, a, b, c, ..] if self.message.len() == 4 + u24([a, b, c]))
    }
}

fn u24(b: [u8; 3]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
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
        self.take(3).map(|b| u24([b[0], b[1], b[2]]))
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

fn handshake(message: &[u8], info: &mut TlsInfo) -> Option<()> {
    let mut r = Reader(message);
    let kind = r.u8()?;
    if kind != HANDSHAKE_CLIENT_HELLO && kind != HANDSHAKE_SERVER_HELLO {
        return None;
    }
    let _len = r.u24()?;
    let legacy_version = TlsVersion(r.u16()?);
    info.version = Some(legacy_version);
    r.take(32)?; // random
    r.vec8()?; // session id
    if kind == HANDSHAKE_CLIENT_HELLO {
        info.handshake = Some(Handshake::ClientHello);
        r.vec16()?; // cipher suites
        r.vec8()?; // compression methods
    } else {
        info.handshake = Some(Handshake::ServerHello);
        r.u16()?; // cipher suite
        r.u8()?; // compression method
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
                // The whole list or nothing: a cut one would misstate what was offered.
                let mut protocols = data.vec16()?;
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

/// An SSH identification string (RFC 4253 4.2): printable, on one line of at most 255 bytes.
/// Where the sample goes on past the line, it must go on with the binary packet that opens the
/// key exchange: a banner followed by anything else is a disguise.
fn ssh(stream: &[u8]) -> bool {
    if !stream.starts_with(b"SSH-") {
        return false;
    }
    let line = &stream[..stream.len().min(SSH_ID_MAX)];
    let printable = |b: &[u8]| b.iter().all(|&c| c == b' ' || c.is_ascii_graphic());
    let Some(end) = line.iter().position(|&b| b == b'\n') else {
        // Cut inside the line, or a line longer than any identification string.
        return stream.len() < SSH_ID_MAX && printable(line);
    };
    let id = &line[..end];
    printable(id.strip_suffix(b"\r").unwrap_or(id)) && key_exchange_follows(&stream[end + 1..])
}

/// `rest` is empty, too short to tell, or starts an SSH binary packet carrying KEXINIT.
fn key_exchange_follows(rest: &[u8]) -> bool {
    let [a, b, c, d, padding, message, ..] = *rest else {
        return true;
    };
    let length = u32::from_be_bytes([a, b, c, d]);
    (12..=SSH_PACKET_MAX).contains(&length)
        && padding >= 4
        && u32::from(padding) < length
        && message == SSH_MSG_KEXINIT
}

/// A QUIC long-header packet (RFC 9000 17.2; the form and fixed bits are never masked) of a
/// known version, with connection IDs of lengths QUIC allows.
fn quic(datagram: &[u8]) -> bool {
    let [first, v0, v1, v2, v3, dcid_len, ref rest @ ..] = *datagram else {
        return false;
    };
    let version = u32::from_be_bytes([v0, v1, v2, v3]);
    let known = version == QUIC_V1 || version == QUIC_V2 || version & !0xff == QUIC_DRAFT;
    let dcid_len = usize::from(dcid_len);
    first & 0xc0 == 0xc0
        && known
        && dcid_len <= QUIC_CID_MAX
        && rest
            .get(dcid_len)
            .is_some_and(|&scid_len| usize::from(scid_len) <= QUIC_CID_MAX)
}

/// A DTLS record header (RFC 6347 4.1, RFC 9147 4): a known content type (up to ACK) and
/// version, and a length that ends inside the datagram, or past the sample where the kernel
/// cut it.
fn dtls(datagram: &[u8]) -> bool {
    let Some(header) = datagram.get(..DTLS_RECORD_HEADER) else {
        return false;
    };
    let version = u16::from_be_bytes([header[1], header[2]]);
    let length = usize::from(u16::from_be_bytes([header[11], header[12]]));
    let fits = DTLS_RECORD_HEADER + length <= datagram.len()
        || (datagram.len() >= PLAIN_SAMPLE && length <= DTLS_FRAGMENT_MAX);
    matches!(header[0], 20..=25) && DTLS_VERSIONS.contains(&version) && fits
}

fn plaintext(sample: &[u8]) -> PlaintextHint {
    if sample.starts_with(HTTP2_PREFACE) {
        return PlaintextHint::Http2Preface;
    }
    if sample.starts_with(b"HTTP/1.") {
        return PlaintextHint::HttpResponse;
    }
    for method in HTTP_METHODS {
        if sample.starts_with(method.as_bytes()) && sample.get(method.len()) == Some(&b' ') {
            return PlaintextHint::HttpRequest {
                method,
                path: request_path(method, &sample[method.len() + 1..]),
            };
        }
    }
    PlaintextHint::Unknown
}

/// Longest path kept, in characters.
const MAX_PATH: usize = 256;

/// The path of a well-formed request line, `METHOD SP request-target SP HTTP/1.x CRLF`
/// (RFC 9112 3), from the bytes after the method and its space. None when the line's end is
/// not in the sample or the line is anything else: with a bare LF or another protocol's inline
/// command (Redis `GET key`), a header or a value would pass for the path.
fn request_path(method: &str, rest: &[u8]) -> Option<String> {
    let end = rest.iter().position(|&b| b == b'\n')?;
    let line = rest[..end].strip_suffix(b"\r")?;
    let space = line.iter().position(|&b| b == b' ')?;
    let (target, version) = (&line[..space], &line[space + 1..]);
    let http1 =
        version.len() == 8 && version.starts_with(b"HTTP/1.") && version[7].is_ascii_digit();
    if !http1 || target.is_empty() || !target.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let mut path = request_target(method, std::str::from_utf8(target).ok()?)?;
    if path.len() > MAX_PATH {
        path.truncate(MAX_PATH);
        path.push('…');
    }
    Some(path)
}

/// What a request target names (RFC 9112 3.2): origin-form `/path`, absolute-form
/// `http(s)://host/path`, `*` for OPTIONS, authority-form `host:port` for CONNECT. Without
/// what may hold a token or a password: the query and fragment, path parameters
/// (`;jsessionid=...`) and userinfo (`user:pass@`).
fn request_target(method: &str, target: &str) -> Option<String> {
    if method == "CONNECT" {
        let (host, port) = target.rsplit_once(':')?;
        let port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        return (port && is_host(host)).then(|| target.to_string());
    }
    if target == "*" {
        return (method == "OPTIONS").then(|| target.to_string());
    }
    let target = &target[..target.find(['?', '#']).unwrap_or(target.len())];
    if target.starts_with('/') {
        return Some(cleaned(target));
    }
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_userinfo, host)| host);
    is_host(host).then(|| format!("{scheme}://{host}{}", cleaned(path)))
}

/// A host (and port) as an authority names it, no userinfo or parameter in it.
fn is_host(host: &str) -> bool {
    !host.is_empty() && !host.contains(['@', ';', '/'])
}

/// `path` without what may hold a token: the parameters of its segments, and the userinfo of
/// URLs carried in it (`/fetch/http://user:pass@host/x` is `/fetch/http://host/x`).
fn cleaned(path: &str) -> String {
    let path = without_params(path);
    let mut out = String::with_capacity(path.len());
    let mut rest = path.as_str();
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find('/').unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host),
        );
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `path` without the parameters of its segments (`/a;v=1/b` is `/a/b`).
fn without_params(path: &str) -> String {
    let segments: Vec<&str> = path
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect();
    segments.join("/")
}

/// The opt-in redacted evidence (`--evidence redacted`) of an HTTP/1 sample: its first line
/// (a request's path without query string) and its header names, every header value replaced
/// by `<redacted>`, never a body. Nothing for anything else: TLS is fully described by its
/// fingerprint, and unknown plaintext cannot be redacted safely.
pub fn redacted(sample: &[u8]) -> Option<String> {
    let head = match fingerprint(sample, Transport::Tcp) {
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

    /// Streams captured on loopback: OpenSSL 3.0 `s_client` and OpenSSH 9.2 `ssh` (TCP, cut
    /// where the kernel's sample would end), aioquic 1.7 and OpenSSL DTLS 1.2 (first datagrams).
    macro_rules! captured {
        ($name:literal) => {
            include_bytes!(concat!("../fuzz/corpus/fingerprint/", $name)).as_slice()
        };
    }

    const ISTIO_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
    const ISTIO_SNI: &str = "outbound_.80_._.web.shop.svc.cluster.local";

    /// Builds a ClientHello record the way real clients lay it out.
    pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&str], versions: &[u16]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            exts.push(sni_ext(name));
        }
        if !alpn.is_empty() {
            exts.push(alpn_ext(alpn));
        }
        if !versions.is_empty() {
            exts.push(versions_ext(versions));
        }
        handshake_records(&client_hello_message(&exts), usize::MAX)
    }

    /// A ClientHello as Envoy 1.40 (BoringSSL) or OpenSSL 3.5 send it when resuming a session:
    /// a session ticket and an X25519MLKEM768 key share (1216 bytes) ahead of the ALPN, some
    /// 1.9 KB in all. The handshake message alone: `handshake_records` puts it in records.
    pub(crate) fn post_quantum_client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        const X25519_MLKEM768: u16 = 0x11ec;
        const X25519: u16 = 0x001d;
        let mut shares = Vec::new();
        for (group, len) in [(X25519_MLKEM768, 1216), (X25519, 32)] {
            shares.extend(group.to_be_bytes());
            shares.extend(with_len16(&vec![0x33; len]));
        }
        let groups = with_len16(&[0x11, 0xec, 0x00, 0x1d, 0x00, 0x17]);
        let signatures = with_len16(&[0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
        client_hello_message(&[
            sni_ext(sni),
            (23, vec![]),              // extended_master_secret
            (0xff01, vec![0]),         // renegotiation_info
            (10, groups),              // supported_groups
            (11, vec![1, 0]),          // ec_point_formats
            (35, vec![0x5a; 400]),     // session_ticket
            (13, signatures),          // signature_algorithms
            (51, with_len16(&shares)), // key_share
            (45, vec![1, 1]),          // psk_key_exchange_modes
            alpn_ext(alpn),
            versions_ext(&[0x0304, 0x0303]),
        ])
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
        handshake_records(&message(HANDSHAKE_SERVER_HELLO, &body), usize::MAX)
    }

    fn client_hello_message(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (kind, data) in exts {
            push_ext(&mut block, *kind, data);
        }
        let mut body = vec![3, 3];
        body.extend([0x11; 32]);
        body.push(0);
        body.extend(with_len16(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]);
        body.extend(with_len16(&block));
        message(HANDSHAKE_CLIENT_HELLO, &body)
    }

    fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut list = vec![0u8];
        list.extend(with_len16(name.as_bytes()));
        (EXT_SERVER_NAME, with_len16(&list))
    }

    fn alpn_ext(alpn: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend(p.as_bytes());
        }
        (EXT_ALPN, with_len16(&list))
    }

    fn versions_ext(versions: &[u16]) -> (u16, Vec<u8>) {
        let mut list = vec![(versions.len() * 2) as u8];
        for v in versions {
            list.extend(v.to_be_bytes());
        }
        (EXT_SUPPORTED_VERSIONS, list)
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut hs = vec![kind];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        hs
    }

    /// Handshake records carrying `message` in fragments of at most `fragment` bytes.
    pub(crate) fn handshake_records(message: &[u8], fragment: usize) -> Vec<u8> {
        let mut records = Vec::new();
        for part in message.chunks(fragment.min(1 << 14)) {
            records.extend([CONTENT_HANDSHAKE, 3, 1]);
            records.extend(with_len16(part));
        }
        records
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

    fn tls(stream: &[u8]) -> TlsInfo {
        match fingerprint(stream, Transport::Tcp) {
            Fingerprint::Tls(info) => info,
            other => panic!("not TLS: {other:?}"),
        }
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
            complete: true,
            then_tls: None,
        })
    }

    #[test]
    fn samples_the_first_record_and_the_next_header_or_a_spanning_hello_whole() {
        let envoy = captured!("202c5b59f613b685");
        let cases: [(&str, &[u8], usize); 13] = [
            ("nothing yet", b"", PLAIN_SAMPLE),
            ("HTTP", b"GET / HTTP/1.1\r\n", PLAIN_SAMPLE),
            ("too short to be a record", &[22, 3, 1], PLAIN_SAMPLE),
            ("a record header alone", &[22, 3, 1, 0, 200], 210),
            (
                "a ClientHello in one record",
                &[22, 3, 1, 0, 200, 1, 0, 0, 196],
                210,
            ),
            (
                "a ClientHello filling its record",
                &[22, 3, 1, 0, 204, 1, 0, 0, 200],
                214,
            ),
            (
                "a ClientHello spanning records",
                &[22, 3, 1, 0, 200, 1, 0, 0, 200],
                HELLO_MAX,
            ),
            (
                "a ServerHello spanning records",
                &[22, 3, 3, 2, 0, 2, 0, 5, 0],
                HELLO_MAX,
            ),
            (
                "another message spanning records",
                &[22, 3, 3, 0, 9, 11, 0, 9, 0],
                19,
            ),
            (
                "a record longer than the sample",
                &[22, 3, 3, 0xff, 0xff, 11],
                HELLO_MAX,
            ),
            ("application data", &[23, 3, 3, 0, 10, 1, 2], PLAIN_SAMPLE),
            (
                "not TLS major version 3",
                &[22, 2, 0, 0, 10, 1, 0, 0, 6],
                PLAIN_SAMPLE,
            ),
            (
                "Envoy's post-quantum ClientHello, captured",
                envoy,
                5 + 0x5e8 + 5,
            ),
        ];
        for (what, first, want) in cases {
            assert_eq!(sample_want(first), want, "{what}");
        }
    }

    #[test]
    fn reassembly_puts_samples_back_in_order() {
        let stream: Vec<u8> = (0..=255).cycle().take(HELLO_MAX + 100).collect();
        let at = |offset: usize, len: usize| (offset as u32, stream[offset..offset + len].to_vec());
        // (what, samples as (offset, bytes), contiguous length, has_gap)
        type Case = (&'static str, Vec<(u32, Vec<u8>)>, usize, bool);
        let cases: Vec<Case> = vec![
            ("nothing", vec![], 0, false),
            ("in order", vec![at(0, 100), at(100, 50)], 150, false),
            ("reordered", vec![at(100, 50), at(0, 100)], 150, false),
            (
                "overlapping",
                vec![at(0, 100), at(60, 90), at(20, 10)],
                150,
                false,
            ),
            (
                "retransmitted",
                vec![at(0, 100), at(0, 100), at(50, 50)],
                100,
                false,
            ),
            ("a hole", vec![at(0, 100), at(200, 50)], 100, true),
            ("the start missing", vec![at(10, 100)], 0, true),
            (
                "a hole filled",
                vec![at(0, 10), at(20, 10), at(10, 10)],
                30,
                false,
            ),
            (
                "holes bridged",
                vec![at(10, 5), at(30, 5), at(0, 40)],
                40,
                false,
            ),
            ("empty samples", vec![at(0, 0), at(5, 0)], 0, false),
            (
                "cut at HELLO_MAX",
                vec![at(0, HELLO_MAX + 100)],
                HELLO_MAX,
                false,
            ),
            (
                "past HELLO_MAX",
                vec![at(0, 10), at(HELLO_MAX, 50)],
                10,
                false,
            ),
            (
                "overflowing offset",
                vec![at(0, 10), (u32::MAX - 3, vec![7; 8])],
                10,
                false,
            ),
            ("at the last offset", vec![(u32::MAX, vec![7])], 0, false),
        ];
        for (what, samples, len, gap) in cases {
            let mut r = Reassembly::default();
            for (offset, bytes) in &samples {
                r.add(*offset, bytes);
            }
            assert_eq!(r.contiguous(), &stream[..len], "{what}");
            assert_eq!(r.has_gap(), gap, "{what}");
        }
    }

    #[test]
    fn reassembly_keeps_the_first_bytes_seen() {
        let mut r = Reassembly::default();
        r.add(10, &[1; 10]);
        r.add(0, &[2; 30]);
        r.add(25, &[3; 10]);
        let want = [&[2; 10][..], &[1; 10], &[2; 10], &[3; 5]].concat();
        assert_eq!(r.contiguous(), want);
    }

    #[test]
    fn reassembly_stays_small_under_scattered_samples() {
        let mut r = Reassembly::default();
        // A byte at every other offset: only the first islands are kept.
        for offset in (1..HELLO_MAX as u32).step_by(2) {
            r.add(offset, &[9]);
        }
        assert_eq!(r.spans.len(), MAX_SPANS);
        assert!(r.bytes.len() <= 2 * MAX_SPANS);
        // Samples joining what is held are always taken: the stream still comes together.
        r.add(0, &[1; HELLO_MAX * 2]);
        assert_eq!(r.contiguous().len(), HELLO_MAX);
        assert_eq!(r.spans.len(), 1);
        assert_eq!(r.contiguous()[..4], [1, 9, 1, 9], "the islands kept stay");
        assert_eq!(
            r.contiguous()[2 * MAX_SPANS + 1..][..2],
            [1, 1],
            "the dropped ones are gone"
        );
    }

    #[test]
    fn reassembly_is_complete_when_the_kernel_has_sent_all_it_samples() {
        let ffdhe = captured!("tls-openssl-ffdhe8192-client-hello");
        let split = captured!("tls-openssl-client-hello-in-512-byte-records");
        let ssh = captured!("ssh-openssh-client");
        // (what, stream, samples as (offset, length), complete after each)
        type Case<'a> = (&'static str, &'a [u8], &'a [(u32, usize)], &'static [bool]);
        let cases: [Case; 6] = [
            (
                "a ClientHello in three TCP segments, then the next record's header",
                ffdhe,
                &[(0, 548), (1096, 250), (548, 548), (1346, 5)],
                &[false, false, false, true],
            ),
            (
                "a ClientHello spanning records is sampled up to HELLO_MAX",
                split,
                &[(0, 548), (548, 548), (1096, split.len() - 1096)],
                &[false, false, false],
            ),
            (
                "plaintext comes in one sample",
                b"GET / HTTP/1.1\r\n",
                &[(0, 16)],
                &[true],
            ),
            ("so does SSH's identification", ssh, &[(0, 41)], &[true]),
            (
                "a sample past a hole is not enough",
                ffdhe,
                &[(548, 548)],
                &[false],
            ),
            (
                "a stream too short to be TLS is whole",
                &[22, 3],
                &[(0, 2)],
                &[true],
            ),
        ];
        for (what, stream, samples, want) in cases {
            let mut r = Reassembly::default();
            let complete: Vec<bool> = samples
                .iter()
                .map(|&(offset, len)| {
                    let start = offset as usize;
                    r.add(offset, &stream[start..start + len]);
                    r.complete()
                })
                .collect();
            assert_eq!(complete, want, "{what}");
        }
    }

    #[test]
    fn reads_handshakes() {
        let ch = Some(Handshake::ClientHello);
        let cases: Vec<(&str, Vec<u8>, Fingerprint)> = vec![
            (
                "TLS 1.3 ClientHello with SNI and ALPN",
                client_hello(Some("svc.test"), &["h2", "http/1.1"], &[0x0304, 0x0303]),
                tls_info(0x0304, Some("svc.test"), &["h2", "http/1.1"], ch),
            ),
            (
                "Istio sidecar mTLS",
                client_hello(Some(ISTIO_SNI), &ISTIO_ALPN, &[0x0304]),
                tls_info(0x0304, Some(ISTIO_SNI), &ISTIO_ALPN, ch),
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
            assert_eq!(fingerprint(&bytes, Transport::Tcp), want, "{name}");
        }
    }

    #[test]
    fn reads_large_and_split_client_hellos() {
        let pq = post_quantum_client_hello(ISTIO_SNI, &ISTIO_ALPN);
        assert!(pq.len() > 1800, "{} bytes", pq.len());
        let alpn_at = pq.windows(5).position(|w| w == b"istio").unwrap();
        let ccs = [20, 3, 3, 0, 1, 1];
        let with_ccs = |mut records: Vec<u8>| {
            records.extend(ccs);
            records
        };
        let envoy = captured!("202c5b59f613b685");
        // (what, stream, ALPN read, complete, then_tls)
        type Case = (&'static str, Vec<u8>, bool, bool, Option<bool>);
        let cases: Vec<Case> = vec![
            (
                "in one record",
                handshake_records(&pq, usize::MAX),
                true,
                true,
                None,
            ),
            (
                "in records of 1 KB",
                handshake_records(&pq, 1024),
                true,
                true,
                None,
            ),
            (
                "the ALPN across two records",
                handshake_records(&pq, alpn_at + 3),
                true,
                true,
                None,
            ),
            (
                "a record per byte of its header",
                // Eleven one-byte records and most of a twelfth's header.
                handshake_records(&pq, 1)[..11 * 6 + 4].to_vec(),
                false,
                false,
                Some(true),
            ),
            (
                "then ChangeCipherSpec",
                with_ccs(handshake_records(&pq, 1024)),
                true,
                true,
                Some(true),
            ),
            (
                "cut where the kernel used to stop (1024 bytes), before its ALPN",
                handshake_records(&pq, usize::MAX)[..1024].to_vec(),
                false,
                false,
                None,
            ),
            (
                "its second record missing",
                handshake_records(&pq, 1024)[..1029].to_vec(),
                false,
                false,
                None,
            ),
            (
                "Envoy's, captured at 1024 bytes: its ALPN comes before the key share",
                envoy.to_vec(),
                true,
                false,
                None,
            ),
        ];
        for (what, stream, alpn_read, complete, then_tls) in cases {
            let info = tls(&stream);
            let alpn: &[&str] = if alpn_read { &ISTIO_ALPN } else { &[] };
            assert_eq!(info.alpn, alpn, "{what}");
            assert_eq!(info.complete, complete, "{what}");
            assert_eq!(info.then_tls, then_tls, "{what}");
            if what.starts_with("Envoy") {
                assert_eq!(
                    info.sni.as_deref(),
                    Some("outbound_.8080_._.api.shop.svc.cluster.local")
                );
            } else if !what.starts_with("a record per byte") {
                assert_eq!(info.sni.as_deref(), Some(ISTIO_SNI), "{what}");
            }
            if complete {
                assert_eq!(info.version, Some(TlsVersion(0x0304)), "{what}");
            }
        }
    }

    #[test]
    fn reads_captured_client_hellos() {
        // (capture, records, then_tls)
        let cases: [(&[u8], &str, Option<bool>); 4] = [
            (
                captured!("tls-openssl-client-hello-then-ccs"),
                "one",
                Some(true),
            ),
            (
                captured!("tls-openssl-resumed-client-hello"),
                "one, with a ticket",
                Some(true),
            ),
            (
                captured!("tls-openssl-ffdhe8192-client-hello"),
                "one of 1341 bytes",
                Some(true),
            ),
            (
                captured!("tls-openssl-client-hello-in-512-byte-records"),
                "three",
                Some(true),
            ),
        ];
        for (stream, what, then_tls) in cases {
            let info = tls(stream);
            assert_eq!(info.sni.as_deref(), Some(ISTIO_SNI), "{what}");
            assert_eq!(info.alpn, ISTIO_ALPN, "{what}");
            assert_eq!(info.version, Some(TlsVersion(0x0304)), "{what}");
            assert_eq!(info.handshake, Some(Handshake::ClientHello), "{what}");
            assert!(info.complete, "{what}");
            assert_eq!(info.then_tls, then_tls, "{what}");
        }
        // Its first record alone: the ALPN is in it, the rest of the message is not.
        let split = captured!("tls-openssl-client-hello-in-512-byte-records");
        let first = tls(&split[..517]);
        assert_eq!((first.alpn.len(), first.complete), (2, false));
    }

    #[test]
    fn what_follows_the_handshake_tells_it_from_a_disguise() {
        let hello = client_hello(Some("svc.test"), &["h2"], &[0x0304]);
        let split = handshake_records(&post_quantum_client_hello("svc.test", &["h2"]), 1024);
        let then = |records: &[u8], rest: &[u8]| [records, rest].concat();
        let cases: [(&str, Vec<u8>, Option<bool>); 10] = [
            ("nothing after it", hello.clone(), None),
            (
                "ChangeCipherSpec",
                then(&hello, &[20, 3, 3, 0, 1, 1]),
                Some(true),
            ),
            ("an alert", then(&hello, &[21, 3, 3, 0, 2]), Some(true)),
            (
                "a header cut after its version",
                then(&hello, &[23, 3, 3]),
                Some(true),
            ),
            (
                "a header cut before its version",
                then(&hello, &[23, 3]),
                None,
            ),
            (
                "plaintext HTTP",
                then(&hello, b"GET / HTTP/1.1\r\n"),
                Some(false),
            ),
            ("one byte of plaintext", then(&hello, b"G"), Some(false)),
            (
                "a record of TLS major version 2",
                then(&hello, &[23, 2, 0]),
                Some(false),
            ),
            (
                "plaintext after a split hello",
                then(&split, b"GET /"),
                Some(false),
            ),
            (
                "plaintext after an alert",
                then(&[21, 3, 3, 0, 2, 2, 40], b"GET /"),
                Some(false),
            ),
        ];
        for (what, stream, want) in cases {
            assert_eq!(tls(&stream).then_tls, want, "{what}");
        }
    }

    #[test]
    fn every_cut_of_a_client_hello_reads_only_what_is_there() {
        let pq = post_quantum_client_hello(ISTIO_SNI, &ISTIO_ALPN);
        let hellos = [
            client_hello(Some(ISTIO_SNI), &ISTIO_ALPN, &[0x0304]),
            handshake_records(&pq, usize::MAX),
            handshake_records(&pq, 700),
            captured!("tls-openssl-client-hello-in-512-byte-records")[..1356].to_vec(),
        ];
        for full in hellos {
            for cut in 0..=full.len() {
                let fp = fingerprint(&full[..cut], Transport::Tcp);
                if cut < RECORD_HEADER {
                    assert!(matches!(fp, Fingerprint::Plaintext(_)), "cut {cut}");
                    continue;
                }
                let Fingerprint::Tls(info) = fp else {
                    panic!("cut {cut}: not TLS")
                };
                assert_eq!(info.complete, cut == full.len(), "cut {cut}");
                assert!(info.alpn.is_empty() || info.alpn == ISTIO_ALPN, "cut {cut}");
                assert!(
                    info.sni.is_none() || info.sni.as_deref() == Some(ISTIO_SNI),
                    "cut {cut}"
                );
                if info.complete {
                    assert_eq!(info.alpn, ISTIO_ALPN);
                }
            }
        }
    }

    #[test]
    fn truncated_client_hello_keeps_what_it_read() {
        let full = client_hello(Some("a.example"), &["h2"], &[0x0304]);
        // The SNI appears once its bytes are all there.
        let sni_end = full.windows(9).position(|w| w == b"a.example").unwrap() + 9;
        for cut in RECORD_HEADER..full.len() {
            assert_eq!(tls(&full[..cut]).sni.is_some(), cut >= sni_end, "cut {cut}");
        }
    }

    #[test]
    fn reads_encrypted_protocols() {
        use EncryptedProtocol::{Dtls, Quic, Ssh};
        use Transport::{Tcp, Udp};
        let ssh = captured!("ssh-openssh-client");
        let banner = &ssh[..41];
        let quic_v1 = captured!("quic-v1-client-initial");
        let dtls = captured!("dtls-openssl-client-hello");
        let with = |head: &[u8], rest: &[u8]| [head, rest].concat();
        let quic_header = |first: u8, version: u32, dcid: u8| {
            let mut p = vec![first];
            p.extend(version.to_be_bytes());
            p.push(dcid);
            p.extend(vec![0xaa; usize::from(dcid)]);
            p.extend([8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x44, 0xe0]);
            p
        };
        let dtls_header = |kind: u8, version: u16, len: u16| {
            let mut r = vec![kind];
            r.extend(version.to_be_bytes());
            r.extend([0; 8]);
            r.extend(len.to_be_bytes());
            r.extend([0x5c; 40]);
            r
        };
        let long_line = with(b"SSH-2.0-", &[b'a'; 300]);
        // (what, bytes, transport, the protocol or None for plaintext)
        let cases: Vec<(&str, Vec<u8>, Transport, Option<EncryptedProtocol>)> = vec![
            (
                "OpenSSH's identification, captured",
                banner.to_vec(),
                Tcp,
                Some(Ssh),
            ),
            ("and its KEXINIT after it", ssh.to_vec(), Tcp, Some(Ssh)),
            (
                "an identification cut short",
                b"SSH-2.0-Open".to_vec(),
                Tcp,
                Some(Ssh),
            ),
            (
                "an identification then HTTP",
                with(banner, b"GET / HTTP/1.1\r\n\r\n"),
                Tcp,
                None,
            ),
            (
                "an identification then a bare LF line",
                with(banner, b"\n\n\n\n\n\n"),
                Tcp,
                None,
            ),
            (
                "a line longer than any identification",
                long_line,
                Tcp,
                None,
            ),
            (
                "control bytes in the line",
                b"SSH-2.0-\x01\r\n".to_vec(),
                Tcp,
                None,
            ),
            ("SSH over UDP", banner.to_vec(), Udp, None),
            (
                "aioquic's QUIC v1 Initial, captured",
                quic_v1.to_vec(),
                Udp,
                Some(Quic),
            ),
            (
                "its QUIC v2 Initial",
                captured!("quic-v2-client-initial").to_vec(),
                Udp,
                Some(Quic),
            ),
            (
                "a 1-RTT short header",
                captured!("quic-v1-short-header").to_vec(),
                Udp,
                None,
            ),
            (
                "QUIC draft 29",
                quic_header(0xc3, 0xff00_001d, 8),
                Udp,
                Some(Quic),
            ),
            (
                "a 20-byte connection ID",
                quic_header(0xc0, QUIC_V1, 20),
                Udp,
                Some(Quic),
            ),
            (
                "a 21-byte connection ID",
                quic_header(0xc0, QUIC_V1, 21),
                Udp,
                None,
            ),
            (
                "an unknown version",
                quic_header(0xc0, 0x0a1a_2a3a, 8),
                Udp,
                None,
            ),
            ("version negotiation", quic_header(0xc0, 0, 8), Udp, None),
            ("fixed bit clear", quic_header(0x80, QUIC_V1, 8), Udp, None),
            (
                "cut before the source CID length",
                quic_header(0xc0, QUIC_V1, 8)[..14].to_vec(),
                Udp,
                None,
            ),
            ("QUIC over TCP", quic_v1.to_vec(), Tcp, None),
            (
                "OpenSSL's DTLS ClientHello, captured",
                dtls.to_vec(),
                Udp,
                Some(Dtls),
            ),
            (
                "its HelloVerifyRequest",
                captured!("dtls-openssl-hello-verify-request").to_vec(),
                Udp,
                Some(Dtls),
            ),
            (
                "its ServerHello",
                captured!("dtls-openssl-server-hello").to_vec(),
                Udp,
                Some(Dtls),
            ),
            (
                "a DTLS 1.3 ACK",
                dtls_header(25, 0xfefc, 40),
                Udp,
                Some(Dtls),
            ),
            (
                "an unknown content type",
                dtls_header(26, 0xfefd, 40),
                Udp,
                None,
            ),
            ("an unknown version", dtls_header(22, 0xfefe, 40), Udp, None),
            (
                "a length past the datagram",
                dtls_header(23, 0xfefd, 41),
                Udp,
                None,
            ),
            ("DTLS over TCP", dtls.to_vec(), Tcp, None),
        ];
        for (what, bytes, transport, want) in cases {
            let got = fingerprint(&bytes, transport);
            match want {
                Some(p) => assert_eq!(got, Fingerprint::Encrypted(p), "{what}"),
                None => assert!(matches!(got, Fingerprint::Plaintext(_)), "{what}: {got:?}"),
            }
        }
        // A DTLS record cut where the kernel's sample ends.
        let mut long = dtls_header(23, 0xfefd, 1400);
        long.resize(PLAIN_SAMPLE, 0x5c);
        assert_eq!(fingerprint(&long, Udp), Fingerprint::Encrypted(Dtls));
        assert_eq!(Ssh.name(), "ssh");
        assert_eq!(Quic.name(), "quic");
        assert_eq!(Dtls.name(), "dtls");
    }

    #[test]
    fn tls_records_over_udp_are_not_tls() {
        let hello = client_hello(Some("svc.test"), &["h2"], &[0x0304]);
        assert_eq!(
            fingerprint(&hello, Transport::Udp),
            Fingerprint::Plaintext(PlaintextHint::Unknown)
        );
        assert_eq!(
            fingerprint(b"GET / HTTP/1.1\r\n", Transport::Udp),
            fingerprint(b"GET / HTTP/1.1\r\n", Transport::Tcp)
        );
    }

    #[test]
    fn reads_plaintext() {
        let cases: [(&[u8], PlaintextHint); 6] = [
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
            (b"GETTER", PlaintextHint::Unknown),
            (b"\x16\x03\x09 not tls", PlaintextHint::Unknown),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                fingerprint(bytes, Transport::Tcp),
                Fingerprint::Plaintext(want),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn http_paths_come_only_from_a_well_formed_request_line() {
        let cases: [(&[u8], Option<&str>); 34] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Some("/")),
            (b"GET /orders?token=s3cret HTTP/1.1\r\n", Some("/orders")),
            (b"POST /pay#frag HTTP/1.1\r\n", Some("/pay")),
            (b"GET /a%20b HTTP/1.0\r\n", Some("/a%20b")),
            (b"GET /users/@me HTTP/1.1\r\n", Some("/users/@me")),
            (b"GET http://h/x?y HTTP/1.1\r\n", Some("http://h/x")),
            (b"GET HTTPS://h:8443 HTTP/1.1\r\n", Some("HTTPS://h:8443")),
            (b"OPTIONS * HTTP/1.1\r\n", Some("*")),
            (b"CONNECT db.shop:5432 HTTP/1.1\r\n", Some("db.shop:5432")),
            (b"CONNECT [::1]:443 HTTP/1.1\r\n", Some("[::1]:443")),
            // Path parameters and userinfo may hold a session or a password.
            (b"GET /a;jsessionid=s3cret/b;v=1 HTTP/1.1\r\n", Some("/a/b")),
            (
                b"GET http://user:s3cret@host/x;jsessionid=s3cret?q=1 HTTP/1.1\r\n",
                Some("http://host/x"),
            ),
            (
                b"GET https://s3cret@host HTTP/1.1\r\n",
                Some("https://host"),
            ),
            (b"CONNECT user:s3cret@db:5432 HTTP/1.1\r\n", None),
            // A URL carried in the path keeps its host, not its password.
            (
                b"GET /fetch/http://user:s3cret@host/x HTTP/1.1\r\n",
                Some("/fetch/http://host/x"),
            ),
            (
                b"GET http://h/go/https://s3cret@other HTTP/1.1\r\n",
                Some("http://h/go/https://other"),
            ),
            // Cut short: the line's end is not in the sample.
            (b"GET /cut-before-its-end", None),
            (b"GET / HTTP/1.1", None),
            (b"GET / HTTP/1.1\r", None),
            // Not a request line: a bare LF lets the next line pass for the path.
            (b"GET /a\nCookie: sid=s3cret\r\n", None),
            (b"GET /a HTTP/1.1\nCookie: sid=s3cret\r\n", None),
            // Another protocol's inline command (Redis `GET key`, `DELETE key value`).
            (b"GET s3cret\r\n", None),
            (b"GET key s3cret\r\n", None),
            (b"DELETE /key s3cret\r\n", None),
            (b"GET /\x01 HTTP/1.1\r\n", None),
            (b"GET /caf\xc3\xa9 HTTP/1.1\r\n", None),
            (b"GET  / HTTP/1.1\r\n", None),
            (b"GET / HTTP/1.1 s3cret\r\n", None),
            (b"GET / HTTP/2.0\r\n", None),
            (b"GET * HTTP/1.1\r\n", None),
            (b"GET db:5432 HTTP/1.1\r\n", None),
            (b"CONNECT /x HTTP/1.1\r\n", None),
            (b"GET ftp://h/x HTTP/1.1\r\n", None),
            (b"GET http:///x HTTP/1.1\r\n", None),
        ];
        for (sample, want) in cases {
            // Every one still reads as an HTTP request, as before: only its path is in doubt.
            let Fingerprint::Plaintext(PlaintextHint::HttpRequest { path, .. }) =
                fingerprint(sample, Transport::Tcp)
            else {
                panic!("{sample:?}: not an HTTP request")
            };
            let line = String::from_utf8_lossy(sample);
            assert_eq!(path.as_deref(), want, "{line:?}");
            assert!(!path.unwrap_or_default().contains("s3cret"), "{line:?}");
        }
        assert_eq!(
            fingerprint(b"SET key s3cret\r\n", Transport::Tcp),
            Fingerprint::Plaintext(PlaintextHint::Unknown)
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(400));
        let Fingerprint::Plaintext(PlaintextHint::HttpRequest {
            path: Some(path), ..
        }) = fingerprint(long.as_bytes(), Transport::Tcp)
        else {
            panic!("a long path")
        };
        assert_eq!(path, format!("/{}…", "a".repeat(MAX_PATH - 1)));
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

    /// Writes the synthetic seeds of the fuzz corpus: the large and split ClientHellos no
    /// client here sends. Run by hand when they change:
    /// `cargo test -p meshguard --lib fingerprint -- --ignored write_fuzz_seeds`.
    #[test]
    #[ignore = "writes meshguard/fuzz/corpus; run by hand"]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/fingerprint");
        let pq = post_quantum_client_hello(ISTIO_SNI, &ISTIO_ALPN);
        let ccs = [20, 3, 3, 0, 1, 1];
        let seeds = [
            (
                "tls-post-quantum-client-hello",
                [handshake_records(&pq, usize::MAX), ccs.to_vec()].concat(),
            ),
            (
                "tls-post-quantum-client-hello-in-1k-records",
                [handshake_records(&pq, 1024), ccs.to_vec()].concat(),
            ),
            (
                "tls-client-hello-then-plaintext",
                [
                    client_hello(Some(ISTIO_SNI), &ISTIO_ALPN, &[0x0304]),
                    b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                ]
                .concat(),
            ),
        ];
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
