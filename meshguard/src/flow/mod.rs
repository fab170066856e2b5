//! The agent's flows: what it knows of each one, merged from the kernel's events, and what its
//! payload samples say once put back together. Data goes one way through the folder and past
//! it: [`table`] keeps the flows, keyed by the kernel's flow key, and applies decoded kernel
//! events to them; the judging stage ([`crate::judge`]) turns them into the [`record`]s that
//! are published.

pub mod record;
pub mod table;

use std::{net::SocketAddr, time::SystemTime};

use meshguard_ebpf::{flags, FlowState, DIRECTION_EGRESS, DIRECTION_INGRESS, HEAD_LEN};

use crate::{
    event::ip_addr,
    fingerprint::{
        fingerprint, EncryptedProtocol, Encryption, Fingerprint, Handshake, PlaintextHint,
        Reassembly, TlsInfo, Transport,
    },
    verdict::{Direction, Evidence, Owner, Verdict},
};

/// One flow as the agent knows it.
#[derive(Clone, Debug)]
pub struct Flow {
    /// The kernel's flow key: the socket cookie, or for an unconnected UDP socket's later
    /// peers, their `peer_key`.
    pub cookie: u64,
    /// The kernel's view, merged from every event seen so far.
    pub kernel: FlowState,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub closed: bool,
    pub encryption: Encryption,
    /// What its payload samples said; boxed, since a node keeps many flows that have not
    /// carried any yet (the table's memory is mostly this struct, once per open flow).
    pub payload: Option<Box<Payload>>,
    /// Learnt from the kernel's flow map by reconciliation, not from its events (which were
    /// lost to a full ring buffer, or went to an agent that has since restarted).
    pub recovered: bool,
    /// The verdict and reason of the flow's first published record: what metrics counted, and
    /// what a later record must either repeat or correct out loud.
    pub published: Option<(Verdict, &'static str)>,
    /// `published` was restored from the kernel's `REPORTED` map: an agent before this one
    /// judged the flow on the evidence it saw (this one may see only the map's first bytes).
    pub restored: bool,
    /// Kernel time of its first payload sample: the evidence it still waits for is waited for
    /// from then, and for a bounded time only.
    pub sampled_ns: u64,
    /// A record says what enforcement did to it (refused, or would have).
    pub acted: bool,
}

/// What a flow's payload samples said.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    pub tls: Option<TlsInfo>,
    pub plaintext: Option<PlaintextHint>,
    /// The redacted evidence of its first HTTP/1 sample (`--evidence redacted`).
    pub redacted: Option<String>,
    /// The ClientHello was seen whole, with the header of the record after it: its SNI and
    /// ALPN are all it offered, and what followed it is known to be TLS (or not).
    pub hello_complete: bool,
    /// All of it came from the few first bytes the kernel's flow map keeps (no sample was
    /// read): a TLS ClientHello's SNI and ALPN are beyond them.
    pub head_only: bool,
}

/// What a kernel event changed, for the judging stage.
#[derive(Debug)]
pub enum Update {
    /// New payload evidence for an open flow (found in the table by its key).
    Evidence(u64),
    /// The flow closed and left the table: its final state.
    Closed(Box<Flow>),
}

/// The samples of one flow, per direction (egress, ingress), while they are put together.
type Streams = [Reassembly; 2];

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

impl Flow {
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.payload.as_ref()?.tls.as_ref()
    }

    pub fn udp(&self) -> bool {
        self.kernel.tuple.protocol == 17
    }

    /// Fingerprints the first payload bytes the kernel kept in the flow map, when no sample
    /// did; true if that classified the flow.
    fn learn_from_head(&mut self) -> bool {
        if self.encryption != Encryption::Unknown {
            return false;
        }
        let k = self.kernel;
        let mut streams = Streams::default();
        for (d, head, len) in [
            (0, &k.head[0], k.head_len[0]),
            (1, &k.head[1], k.head_len[1]),
        ] {
            let len = usize::from(len).min(HEAD_LEN);
            streams[d].add(0, &head[..len]);
        }
        self.learn(&streams, self.udp());
        if let Some(payload) = &mut self.payload {
            payload.head_only = true;
            payload.hello_complete = false;
        }
        self.encryption != Encryption::Unknown
    }

    /// What the samples put together so far say, both directions read again from their
    /// start: the encryption, the ClientHello's SNI and ALPN, the ServerHello's version, and
    /// whether the handshake evidence is whole. TLS is TLS only if no direction shows
    /// plaintext, before or after its handshake record: a fake handshake in front of plaintext
    /// is plaintext.
    fn learn(&mut self, streams: &Streams, udp: bool) {
        let transport = if udp { Transport::Udp } else { Transport::Tcp };
        let own = usize::from(self.kernel.tuple.direction == DIRECTION_INGRESS);
        let mut encryption = Encryption::Unknown;
        let mut tls: Option<TlsInfo> = None;
        let mut plaintext: Option<PlaintextHint> = None;
        let mut hello_complete = true;
        let mut client_hello = false;
        let mut fake_tls = false;
        for (d, stream) in streams.iter().enumerate() {
            let bytes = stream.contiguous();
            if bytes.is_empty() {
                continue;
            }
            match fingerprint(bytes, transport) {
                Fingerprint::Tls(info) => {
                    fake_tls |= info.then_tls == Some(false);
                    if info.handshake == Some(Handshake::ClientHello) {
                        client_hello = true;
                        hello_complete = info.complete && info.then_tls.is_some();
                    }
                    // The ServerHello gives the negotiated version; the other side's
                    // record everything else.
                    tls = Some(match tls.take() {
                        Some(mut merged) if info.handshake == Some(Handshake::ServerHello) => {
                            merged.version = info.version.or(merged.version);
                            merged
                        }
                        Some(server) if server.handshake == Some(Handshake::ServerHello) => {
                            TlsInfo {
                                version: server.version.or(info.version),
                                ..info
                            }
                        }
                        _ => info,
                    });
                    encryption = Encryption::Tls;
                }
                Fingerprint::Encrypted(protocol) => {
                    if encryption != Encryption::Tls {
                        encryption = match protocol {
                            EncryptedProtocol::Ssh => Encryption::Ssh,
                            EncryptedProtocol::Quic => Encryption::Quic,
                            EncryptedProtocol::Dtls => Encryption::Dtls,
                        };
                    }
                }
                Fingerprint::Plaintext(hint) => {
                    if encryption == Encryption::Unknown {
                        encryption = Encryption::Plaintext;
                    }
                    // The request names the protocol better than the response.
                    if plaintext.is_none() || d == own {
                        plaintext = Some(hint);
                    }
                }
            }
        }
        // A handshake followed by bytes that are not TLS, or answered in plaintext (HTTPS
        // sent to an HTTP server, a fake hello to an accomplice): plaintext crossed the wire.
        if fake_tls || (encryption == Encryption::Tls && plaintext.is_some()) {
            encryption = Encryption::Plaintext;
        }
        // TLS without its ClientHello (the client's samples lost, or a flow seen mid-stream):
        // what it offered is unknown.
        if tls.is_some() && !client_hello {
            hello_complete = false;
        }
        self.encryption = encryption;
        if encryption == Encryption::Unknown {
            return;
        }
        let payload = self.payload.get_or_insert_default();
        payload.tls = tls;
        payload.plaintext = plaintext;
        payload.hello_complete = hello_complete;
        payload.head_only = false;
    }

    /// The process name the kernel recorded, if any.
    pub fn comm(&self) -> Option<&str> {
        let k = &self.kernel;
        (k.flags & flags::PROCESS != 0).then(|| {
            let len = k.comm.iter().position(|&b| b == 0).unwrap_or(k.comm.len());
            std::str::from_utf8(&k.comm[..len]).unwrap_or("?")
        })
    }

    /// The socket owner's cgroup, if the kernel recorded it.
    pub fn cgroup(&self) -> Option<u64> {
        (self.kernel.flags & flags::CGROUP != 0 && self.kernel.cgroup != 0)
            .then_some(self.kernel.cgroup)
    }

    pub fn direction(&self) -> Direction {
        if self.kernel.tuple.direction == DIRECTION_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    }

    pub fn local(&self) -> SocketAddr {
        let t = &self.kernel.tuple;
        SocketAddr::new(ip_addr(t.family, t.local_addr), t.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        let t = &self.kernel.tuple;
        SocketAddr::new(ip_addr(t.family, t.remote_addr), t.remote_port)
    }

    /// The address the client dialled, for an accepted connection netfilter redirected to
    /// this socket (a sidecar's capture).
    pub fn dialled(&self) -> Option<SocketAddr> {
        let k = &self.kernel;
        (k.flags & flags::DIALLED != 0)
            .then(|| SocketAddr::new(ip_addr(k.tuple.family, k.redirect.addr), k.redirect.port))
    }

    /// Every payload packet seen so far crossed the loopback device (the first of each
    /// direction is recorded), which never leaves the network namespace.
    pub fn loopback(&self) -> bool {
        let mut seen = self.kernel.ifindex.iter().filter(|&&i| i != 0).peekable();
        seen.peek().is_some() && seen.all(|&i| i == LOOPBACK_IFINDEX)
    }

    /// Whether the handshake evidence is whole: nothing a later sample could add.
    pub fn hello_complete(&self) -> bool {
        self.payload.as_ref().is_some_and(|p| p.hello_complete)
    }

    /// What the kernel saw of this flow, for the verdict engine; `owner` is its cgroup's, as
    /// the judging stage resolved it.
    pub fn evidence<'a>(&'a self, owner: Owner<'a>) -> Evidence<'a> {
        let k = &self.kernel;
        let t = &k.tuple;
        Evidence {
            direction: self.direction(),
            udp: self.udp(),
            local: self.local(),
            remote: self.remote(),
            uid: (k.flags & flags::UID != 0).then_some(k.uid),
            comm: self.comm(),
            owner,
            redirect: (k.flags & flags::REDIRECTED != 0)
                .then(|| SocketAddr::new(ip_addr(t.family, k.redirect.addr), k.redirect.port)),
            loopback: self.loopback(),
            encryption: self.encryption,
            alpn: self.tls().map_or(&[], |t| t.alpn.as_slice()),
            hello_complete: self.hello_complete(),
            plaintext_declared_by: None,
        }
    }
}
