//! What crossed the wire, captured on the node's bridge and read without meshguard: each TCP connection's
//! bytes in both directions (from tshark), and the layout of a TLS ClientHello as a sampler of
//! the first payload bytes sees it (where each extension starts, counted from the first byte
//! of the connection's payload).

use std::{collections::BTreeMap, net::IpAddr, path::Path, process::Command};

use anyhow::Context as _;

use super::Node;
use crate::run;

pub const EXT_SUPPORTED_GROUPS: u16 = 10;
pub const EXT_SESSION_TICKET: u16 = 35;
pub const EXT_ALPN: u16 = 16;
pub const EXT_KEY_SHARE: u16 = 51;
pub const EXT_PRE_SHARED_KEY: u16 = 41;
pub const X25519: u16 = 0x001d;
/// Hybrid post-quantum key-exchange groups (the ML-KEM codepoints and the Kyber draft's).
pub const POST_QUANTUM_GROUPS: [u16; 4] = [0x11ec, 0x11eb, 0x11ed, 0x6399];

/// One TCP connection as captured: who opened it, and the payload each way in order.
#[derive(Clone, Debug, Default)]
pub struct TcpStream {
    pub client: Option<(IpAddr, u16)>,
    pub server: Option<(IpAddr, u16)>,
    pub to_server: Vec<u8>,
    pub to_client: Vec<u8>,
}

impl TcpStream {
    /// The ClientHello the connection opened with, if it opened with one.
    pub fn client_hello(&self) -> Option<ClientHello> {
        ClientHello::parse(&self.to_server)
    }

    pub fn between(&self, client: IpAddr, server: IpAddr, port: u16) -> bool {
        self.client.is_some_and(|(ip, _)| ip == client) && self.server == Some((server, port))
    }
}

/// Every TCP connection in `pcap` whose opening (SYN) was captured, in the order they opened.
pub fn tcp_streams(pcap: &Path) -> anyhow::Result<Vec<TcpStream>> {
    let out = run(Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-Y", "tcp", "-T", "fields", "-E", "occurrence=f"])
        .args([
            "-e",
            "tcp.stream",
            "-e",
            "ip.src",
            "-e",
            "ipv6.src",
            "-e",
            "tcp.srcport",
        ])
        .args(["-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.dstport"])
        .args([
            "-e",
            "tcp.flags.syn",
            "-e",
            "tcp.flags.ack",
            "-e",
            "tcp.payload",
        ]))?;
    let mut streams: BTreeMap<u64, TcpStream> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [stream, src4, src6, sport, dst4, dst6, dport, syn, ack, payload] = f[..] else {
            continue;
        };
        let addr = |v4: &str, v6: &str, port: &str| -> anyhow::Result<(IpAddr, u16)> {
            let ip = if v4.is_empty() { v6 } else { v4 };
            Ok((ip.parse().context("address")?, port.parse()?))
        };
        let (src, dst) = (addr(src4, src6, sport)?, addr(dst4, dst6, dport)?);
        let s = streams.entry(stream.parse()?).or_default();
        if is_set(syn) && !is_set(ack) {
            s.client = Some(src);
            s.server = Some(dst);
        }
        let bytes = hex(payload)?;
        if s.client == Some(src) {
            s.to_server.extend(bytes);
        } else if s.client == Some(dst) {
            s.to_client.extend(bytes);
        }
    }
    Ok(streams
        .into_values()
        .filter(|s| s.client.is_some())
        .collect())
}

fn is_set(flag: &str) -> bool {
    flag == "1" || flag == "True"
}

fn hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    (0..digits.len() / 2)
        .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).context("payload hex"))
        .collect()
}

/// A ClientHello's layout: its size on the wire and where each extension lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The bytes of the TLS record that carries it, header included.
    pub len: usize,
    /// `(type, offset of its type field from the first payload byte, body)` in wire order.
    pub extensions: Vec<(u16, usize, Vec<u8>)>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl ClientHello {
    /// The ClientHello at the start of a connection's payload, when it is one and whole.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        // Record header (type 22, version, length), handshake header (type 1, 24-bit length).
        if payload.first() != Some(&22) || payload.get(5) != Some(&1) {
            return None;
        }
        let len = 5 + usize::from(u16_at(payload, 3)?);
        let hello = payload.get(..len)?;
        // version (2), random (32), then the session id, cipher suites and compression methods.
        let mut at = 5 + 4 + 2 + 32;
        at += 1 + usize::from(*hello.get(at)?);
        at += 2 + usize::from(u16_at(hello, at)?);
        at += 1 + usize::from(*hello.get(at)?);
        let end = at + 2 + usize::from(u16_at(hello, at)?);
        at += 2;
        let mut extensions = Vec::new();
        while at + 4 <= end {
            let kind = u16_at(hello, at)?;
            let body_len = usize::from(u16_at(hello, at + 2)?);
            extensions.push((kind, at, hello.get(at + 4..at + 4 + body_len)?.to_vec()));
            at += 4 + body_len;
        }
        Some(Self { len, extensions })
    }

    pub fn extension(&self, kind: u16) -> Option<(usize, &[u8])> {
        self.extensions
            .iter()
            .find(|(k, ..)| *k == kind)
            .map(|(_, offset, body)| (*offset, body.as_slice()))
    }

    /// Where the ALPN extension starts in the payload.
    pub fn alpn_offset(&self) -> Option<usize> {
        self.extension(EXT_ALPN).map(|(offset, _)| offset)
    }

    pub fn alpn(&self) -> Vec<String> {
        let Some((_, body)) = self.extension(EXT_ALPN) else {
            return Vec::new();
        };
        let mut names = Vec::new();
        let mut at = 2;
        while let Some(&n) = body.get(at) {
            let Some(name) = body.get(at + 1..at + 1 + usize::from(n)) else {
                break;
            };
            names.push(String::from_utf8_lossy(name).into_owned());
            at += 1 + usize::from(n);
        }
        names
    }

    /// A session ticket offered for resumption (TLS 1.2), empty when none.
    pub fn session_ticket(&self) -> &[u8] {
        self.extension(EXT_SESSION_TICKET)
            .map_or(&[], |(_, body)| body)
    }

    /// Whether it resumes a session: with a TLS 1.2 ticket, or a TLS 1.3 pre-shared key.
    pub fn resumes(&self) -> bool {
        !self.session_ticket().is_empty() || self.extension(EXT_PRE_SHARED_KEY).is_some()
    }

    /// The groups offered in `supported_groups` and those with a key share.
    pub fn groups(&self) -> Vec<u16> {
        let mut groups = Vec::new();
        if let Some((_, body)) = self.extension(EXT_SUPPORTED_GROUPS) {
            groups.extend((2..body.len()).step_by(2).filter_map(|i| u16_at(body, i)));
        }
        if let Some((_, body)) = self.extension(EXT_KEY_SHARE) {
            let mut at = 2;
            while let (Some(group), Some(len)) = (u16_at(body, at), u16_at(body, at + 2)) {
                groups.push(group);
                at += 4 + usize::from(len);
            }
        }
        groups
    }
}

/// Captures the packets on `node`'s bridge that `filter` takes into `pcap` while `work` runs;
/// fails if tcpdump dropped any (ground truth with holes in it would be none).
pub fn capture(node: &Node, pcap: &Path, filter: &str, work: impl FnOnce()) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut tcpdump = node.cgroup.spawn(
        node.command("tcpdump")
            .args([
                "-i",
                "br0",
                "-U",
                "-n",
                "--immediate-mode",
                "-B",
                "16384",
                "-w",
            ])
            .arg(pcap)
            .arg(filter),
    )?;
    // tcpdump says "listening on" once it captures.
    let mut stderr = tcpdump.stderr.take().context("tcpdump's stderr")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        let n = stderr.read(&mut buf)?;
        anyhow::ensure!(n > 0, "tcpdump exited: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    work();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    anyhow::ensure!(tcpdump.wait()?.success(), "tcpdump failed");
    stderr.read_to_end(&mut seen)?;
    let stats = String::from_utf8_lossy(&seen);
    anyhow::ensure!(
        stats.lines().any(|l| l == "0 packets dropped by kernel"),
        "tcpdump lost packets: {stats}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with these extensions, in this order.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (kind, body) in extensions {
            exts.extend(kind.to_be_bytes());
            exts.extend((body.len() as u16).to_be_bytes());
            exts.extend(body);
        }
        let mut body = vec![3, 3];
        body.extend([7; 32]);
        body.extend([0, 0, 2, 0x13, 1, 1, 0]); // no session id, one suite, null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut handshake = vec![1, 0];
        handshake.extend((body.len() as u16).to_be_bytes());
        handshake.extend(body);
        let mut record = vec![22, 3, 1];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    #[test]
    fn extensions_are_found_where_they_lie() {
        let alpn = b"\x00\x0c\x05istio\x05other".to_vec();
        let bytes = hello(&[
            (EXT_SESSION_TICKET, vec![0xaa; 1100]),
            (EXT_ALPN, alpn),
            (EXT_SUPPORTED_GROUPS, vec![0, 4, 0x11, 0xec, 0, 0x1d]),
            (EXT_KEY_SHARE, vec![0, 6, 0, 0x1d, 0, 2, 9, 9]),
        ]);
        let mut payload = bytes.clone();
        payload.extend(b"more bytes after the hello");
        let h = ClientHello::parse(&payload).unwrap();
        assert_eq!(h.len, bytes.len());
        // Record and handshake headers, version, random, the three lists, the extensions'
        // length, then the ticket's header and body.
        let first = 5 + 4 + 2 + 32 + 1 + 4 + 2 + 2;
        assert_eq!(h.extensions[0].1, first);
        assert_eq!(h.alpn_offset(), Some(first + 4 + 1100));
        assert_eq!(h.alpn(), ["istio", "other"]);
        assert_eq!(h.session_ticket().len(), 1100);
        assert_eq!(h.groups(), [0x11ec, X25519, X25519]);
    }

    #[test]
    fn not_a_whole_client_hello_is_none() {
        let bytes = hello(&[(EXT_ALPN, b"\x00\x03\x02h2".to_vec())]);
        assert!(ClientHello::parse(&bytes[..bytes.len() - 1]).is_none());
        assert!(ClientHello::parse(b"GET / HTTP/1.1\r\n\r\n").is_none());
        assert!(ClientHello::parse(&[]).is_none());
    }

    #[test]
    fn hex_payloads_read_with_or_without_colons() {
        assert_eq!(hex("16:03:01").unwrap(), [0x16, 3, 1]);
        assert_eq!(hex("160301").unwrap(), [0x16, 3, 1]);
        assert!(hex("").unwrap().is_empty());
    }
}
