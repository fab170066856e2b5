//! The agent's table of flows, keyed by socket cookie, and the records it publishes. Kernel
//! events update it; it says when a flow has been classified (its first payload sample) and when
//! it closed. Bounded: when full, the oldest flow makes room and the eviction is counted.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use meshguard_ebpf::{
    flags, EventKind, FlowState, COMM_LEN, DIRECTION_EGRESS, DIRECTION_INGRESS, HEAD_LEN,
};
use serde::Serialize;

use crate::{
    cookie::CookieMap,
    event::{ip_addr, KernelEvent},
    fingerprint::{
        fingerprint, redacted, EncryptedProtocol, Fingerprint, PlaintextHint, TlsInfo, Transport,
    },
    inventory::{Identity, Inventory},
    verdict::{decide, Direction, Evidence, Path, Policy, Verdict},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    Tls,
    /// Encrypted by another protocol: SSH, QUIC or DTLS.
    Encrypted(EncryptedProtocol),
    Plaintext,
    /// No payload seen yet.
    Unknown,
}

impl Encryption {
    /// As records show it: `tls`, the other protocol's name, `plaintext` or `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Encrypted(protocol) => protocol.name(),
            Self::Plaintext => "plaintext",
            Self::Unknown => "unknown",
        }
    }

    pub fn is_encrypted(self) -> bool {
        matches!(self, Self::Tls | Self::Encrypted(_))
    }
}

impl Serialize for Encryption {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One flow as the agent knows it.
#[derive(Clone, Debug)]
pub struct Flow {
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
    /// Some record of this flow was published already.
    reported: bool,
    /// This snapshot is the flow's first record (what metrics count).
    pub first_report: bool,
}

/// What a flow's payload samples said.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    pub tls: Option<TlsInfo>,
    pub plaintext: Option<PlaintextHint>,
    /// The redacted evidence of its first HTTP/1 sample (`--evidence redacted`).
    pub redacted: Option<String>,
    /// All of it came from the few first bytes the kernel's flow map keeps (no sample was
    /// read): a TLS ClientHello's SNI and ALPN are beyond them.
    pub head_only: bool,
}

/// What a kernel event changed, worth publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The flow's first payload sample decided its encryption.
    Classified,
    Closed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub tracked: usize,
    /// Flows dropped to make room before they closed.
    pub evicted: u64,
    /// Flows the kernel evicted from its map before the agent saw any event of them: only
    /// their tuple is known.
    pub lost_unseen: u64,
    /// Flows published from the kernel's flow map by reconciliation.
    pub recovered: u64,
}

/// What one reconciliation pass found in the kernel's flow map.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Flows to publish, as `apply` returns them.
    pub published: Vec<(Flow, Change)>,
    /// Closed flows now reported: their map entries can go.
    pub forget: Vec<u64>,
    /// Closed entries too recent to judge (their events may still be on their way): look
    /// again soon.
    pub deferred: usize,
}

const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

/// How long after a map entry was written its events are surely in the ring buffer.
pub const EVENT_GRACE_NS: u64 = 1_000_000_000;

pub struct FlowTable {
    /// Boxed: growing the table then moves pointers, not whole flows, and never holds two
    /// copies of every flow at once.
    flows: CookieMap<Box<Flow>>,
    /// Cookies in arrival order; may hold cookies of flows already gone (skipped on eviction,
    /// compacted when it grows past twice the capacity).
    order: VecDeque<u64>,
    capacity: usize,
    evicted: u64,
    lost_unseen: u64,
    recovered: u64,
    /// Wall-clock time at boot: kernel timestamps are nanoseconds since boot (CLOCK_MONOTONIC).
    boot: SystemTime,
    /// `--evidence redacted`: keep a redacted copy of each flow's HTTP/1 head.
    pub capture_redacted: bool,
}

impl FlowTable {
    pub fn new(capacity: usize, boot: SystemTime) -> Self {
        Self {
            // Not sized up front: few flows are open at once on most nodes, and a table sized
            // for the worst case would touch a new page for nearly every insert.
            flows: CookieMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
            lost_unseen: 0,
            recovered: 0,
            boot,
            capture_redacted: false,
        }
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            tracked: self.flows.len(),
            evicted: self.evicted,
            lost_unseen: self.lost_unseen,
            recovered: self.recovered,
        }
    }

    #[cfg(test)]
    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.flows.get(&cookie).map(|flow| &**flow)
    }

    /// Applies one kernel event. Returns the flow and what changed, if anything worth publishing
    /// did; a closed flow leaves the table.
    pub fn apply(&mut self, event: &KernelEvent) -> Option<(Flow, Change)> {
        let at = self.boot + Duration::from_nanos(event.ktime_ns);
        if event.flow.flags & flags::EVICTED != 0 && !self.flows.contains_key(&event.cookie) {
            self.lost_unseen += 1;
        }
        let capture_redacted = self.capture_redacted;
        let flow = self.entry(event.cookie, &event.flow, at);
        merge(&mut flow.kernel, &event.flow);
        flow.last_seen = flow.last_seen.max(at);

        let mut change = None;
        if let Some(sample) = &event.sample {
            let first = flow.encryption == Encryption::Unknown;
            let fp = fingerprint(&sample.bytes, flow.transport());
            flow.learn(fp, sample.direction);
            if let Some(payload) = &mut flow.payload {
                payload.head_only = false;
            }
            if capture_redacted {
                let payload = flow.payload.get_or_insert_default();
                if payload.redacted.is_none() {
                    payload.redacted = redacted(&sample.bytes);
                }
            }
            if first {
                change = Some(Change::Classified);
            }
        }
        if event.kind == EventKind::Close {
            // Its sample was lost, or went to an agent since restarted: the map kept its head.
            flow.learn_from_head();
            flow.closed = true;
            change = Some(Change::Closed);
        }
        let change = change?;
        let snapshot = flow.snapshot();
        if change == Change::Closed {
            self.flows.remove(&event.cookie);
        }
        Some((snapshot, change))
    }

    /// The flow of `cookie`, created from `state` if the table does not know it yet.
    fn entry(&mut self, cookie: u64, state: &FlowState, at: SystemTime) -> &mut Flow {
        if !self.flows.contains_key(&cookie) {
            self.make_room();
            self.order.push_back(cookie);
        }
        self.flows.entry(cookie).or_insert_with(|| {
            Box::new(Flow {
                cookie,
                kernel: *state,
                first_seen: at,
                last_seen: at,
                closed: false,
                encryption: Encryption::Unknown,
                payload: None,
                recovered: false,
                reported: false,
                first_report: false,
            })
        })
    }

    /// Compares the kernel's flow map with the table, after the ring buffer was drained: flows
    /// whose events were lost are published from their map entry (marked recovered), and
    /// closed entries the kernel could not announce are reported and can be forgotten. Entries
    /// written within `EVENT_GRACE_NS` of `now_ns` are left for the next pass: their events
    /// may not have been read yet.
    pub fn reconcile(
        &mut self,
        entries: impl IntoIterator<Item = (u64, FlowState)>,
        now_ns: u64,
    ) -> Reconciled {
        let cutoff = now_ns.saturating_sub(EVENT_GRACE_NS);
        let mut out = Reconciled::default();
        for (cookie, state) in entries {
            let written = if state.closed_ns != 0 {
                state.closed_ns
            } else {
                state.opened_ns
            };
            if written >= cutoff {
                // A recent closed entry is a lost close: look again soon. A recent open one is
                // just new; its events will come, or its close will tell.
                out.deferred += usize::from(state.closed_ns != 0);
                continue;
            }
            if let Some(followed) = self
                .flows
                .get_mut(&cookie)
                .filter(|f| state.closed_ns == 0 && f.encryption != Encryption::Unknown)
            {
                // Followed through its events; only the counters may have moved on.
                merge(&mut followed.kernel, &state);
                continue;
            }
            let at = self.boot + Duration::from_nanos(written);
            let flow = self.entry(cookie, &state, at);
            merge(&mut flow.kernel, &state);
            flow.last_seen = flow.last_seen.max(at);
            let classified = flow.learn_from_head();
            let change = if state.closed_ns != 0 {
                flow.closed = true;
                Change::Closed
            } else if classified {
                Change::Classified
            } else {
                // Open and silent so far: its events will tell.
                continue;
            };
            flow.recovered = true;
            let snapshot = flow.snapshot();
            self.recovered += 1;
            if change == Change::Closed {
                self.flows.remove(&cookie);
                out.forget.push(cookie);
            }
            out.published.push((snapshot, change));
        }
        out
    }

    fn make_room(&mut self) {
        while self.flows.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.flows.remove(&oldest).is_some() {
                self.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.capacity {
            let flows = &self.flows;
            self.order.retain(|cookie| flows.contains_key(cookie));
        }
    }
}

/// Counters only grow, and once-only facts (uid, process, redirect) stay once learnt: events
/// from different CPUs may arrive slightly out of order.
fn merge(into: &mut FlowState, from: &FlowState) {
    let c = &mut into.counters;
    c.bytes_sent = c.bytes_sent.max(from.counters.bytes_sent);
    c.bytes_received = c.bytes_received.max(from.counters.bytes_received);
    c.packets_sent = c.packets_sent.max(from.counters.packets_sent);
    c.packets_received = c.packets_received.max(from.counters.packets_received);
    let new = from.flags & !into.flags;
    if new & flags::UID != 0 {
        into.uid = from.uid;
    }
    if new & flags::PROCESS != 0 {
        into.pid = from.pid;
        into.comm = from.comm;
    }
    if new & flags::REDIRECTED != 0 {
        into.redirect = from.redirect;
    }
    for d in 0..2 {
        if into.head_len[d] == 0 && from.head_len[d] != 0 {
            into.head[d] = from.head[d];
            into.head_len[d] = from.head_len[d];
        }
    }
    into.closed_ns = into.closed_ns.max(from.closed_ns);
    into.flags |= from.flags;
}

impl Flow {
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.payload.as_ref()?.tls.as_ref()
    }

    fn transport(&self) -> Transport {
        if self.kernel.tuple.protocol == IPPROTO_UDP {
            Transport::Udp
        } else {
            Transport::Tcp
        }
    }

    /// A copy to publish; the first one is marked so.
    fn snapshot(&mut self) -> Flow {
        self.first_report = !self.reported;
        self.reported = true;
        self.clone()
    }

    /// Fingerprints the first payload bytes the kernel kept in the flow map, when no sample
    /// did; true if that classified the flow.
    fn learn_from_head(&mut self) -> bool {
        if self.encryption != Encryption::Unknown {
            return false;
        }
        let k = self.kernel;
        for (direction, head, len) in [
            (DIRECTION_EGRESS, &k.head[0], k.head_len[0]),
            (DIRECTION_INGRESS, &k.head[1], k.head_len[1]),
        ] {
            let len = usize::from(len).min(HEAD_LEN);
            if len > 0 {
                self.learn(fingerprint(&head[..len], self.transport()), direction);
                self.payload.get_or_insert_default().head_only = true;
            }
        }
        self.encryption != Encryption::Unknown
    }

    /// Folds a payload sample into what is known. TLS in either direction makes the flow TLS
    /// (the ClientHello names SNI and ALPN, the ServerHello the negotiated version), and
    /// another encrypted protocol makes it encrypted unless TLS was seen.
    fn learn(&mut self, fp: Fingerprint, direction: u8) {
        match fp {
            Fingerprint::Tls(info) => {
                self.encryption = Encryption::Tls;
                let tls = self
                    .payload
                    .get_or_insert_default()
                    .tls
                    .get_or_insert_with(TlsInfo::default);
                if info.handshake == Some(crate::fingerprint::Handshake::ServerHello) {
                    tls.version = info.version;
                } else {
                    tls.version = tls.version.or(info.version);
                }
                tls.sni = tls.sni.take().or(info.sni);
                if tls.alpn.is_empty() {
                    tls.alpn = info.alpn;
                }
            }
            Fingerprint::Encrypted(protocol) => {
                if self.encryption != Encryption::Tls {
                    self.encryption = Encryption::Encrypted(protocol);
                }
            }
            Fingerprint::Plaintext(hint) => {
                if self.encryption == Encryption::Unknown {
                    self.encryption = Encryption::Plaintext;
                }
                // The request names the protocol better than the response.
                let payload = self.payload.get_or_insert_default();
                if payload.plaintext.is_none() || direction == self.kernel.tuple.direction {
                    payload.plaintext = Some(hint);
                }
            }
        }
    }

    /// What the kernel saw of this flow, for the verdict engine.
    fn evidence(&self) -> (Evidence<'_>, Option<&str>) {
        let k = &self.kernel;
        let t = &k.tuple;
        let comm = (k.flags & flags::PROCESS != 0).then(|| {
            let len = k.comm.iter().position(|&b| b == 0).unwrap_or(k.comm.len());
            std::str::from_utf8(&k.comm[..len]).unwrap_or("?")
        });
        let evidence = Evidence {
            direction: if t.direction == DIRECTION_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            udp: t.protocol == IPPROTO_UDP,
            local: SocketAddr::new(ip_addr(t.family, t.local_addr), t.local_port),
            remote: SocketAddr::new(ip_addr(t.family, t.remote_addr), t.remote_port),
            uid: (k.flags & flags::UID != 0).then_some(k.uid),
            comm,
            redirect: (k.flags & flags::REDIRECTED != 0)
                .then(|| SocketAddr::new(ip_addr(t.family, k.redirect.addr), k.redirect.port)),
            encryption: self.encryption,
            alpn: self.tls().map_or(&[], |t| t.alpn.as_slice()),
            alpn_seen: !self.payload.as_ref().is_some_and(|p| p.head_only),
        };
        (evidence, comm)
    }

    pub fn record(
        &self,
        node: &Arc<str>,
        change: Change,
        inventory: &Inventory,
        policy: &Policy,
    ) -> FlowRecord {
        let k = &self.kernel;
        let (ev, comm) = self.evidence();
        let (local, remote) = (
            inventory.lookup(ev.local.ip()),
            inventory.lookup(ev.remote.ip()),
        );
        let decision = decide(&ev, local, remote, policy);
        FlowRecord {
            cookie: self.cookie,
            id: FlowId(self.cookie),
            node: Arc::clone(node),
            event: change,
            first_seen: Timestamp(self.first_seen),
            last_seen: Timestamp(self.last_seen),
            state: if self.closed { "closed" } else { "open" },
            direction: match ev.direction {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            },
            protocol: if ev.udp { "udp" } else { "tcp" },
            local: Endpoint::new(ev.local, local),
            remote: Endpoint::new(ev.remote, remote),
            process: Process {
                pid: (k.flags & flags::PROCESS != 0).then_some(k.pid),
                comm: comm.map(Comm::new),
                uid: ev.uid,
            },
            encryption: self.encryption,
            tls: self.tls().cloned(),
            plaintext: self
                .payload
                .as_ref()
                .and_then(|p| p.plaintext.as_ref())
                .map(|hint| {
                    let (method, path) = match hint {
                        PlaintextHint::HttpRequest { method, path } => {
                            (Some(*method), path.clone())
                        }
                        _ => (None, None),
                    };
                    PlaintextRecord {
                        protocol: hint.protocol(),
                        method,
                        path,
                    }
                }),
            redacted_sample: self.payload.as_ref().and_then(|p| p.redacted.clone()),
            path: decision.path,
            redirect: ev.redirect.map(|to| RedirectRecord {
                ip: to.ip(),
                port: to.port(),
                ifindex: k.redirect.ifindex,
            }),
            bytes_sent: k.counters.bytes_sent,
            bytes_received: k.counters.bytes_received,
            packets_sent: k.counters.packets_sent,
            packets_received: k.counters.packets_received,
            verdict: decision.verdict,
            reason: decision.reason,
            detail: decision.detail,
            midstream: k.flags & flags::MIDSTREAM != 0,
            recovered: self.recovered,
            first_report: self.first_report,
            evicted: k.flags & flags::EVICTED != 0,
            netns_cookie: k.netns,
        }
    }
}

/// A flow as `--log-flows` and, later, the API and CLI show it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// The socket cookie; `id` is it in hex.
    #[serde(skip)]
    pub cookie: u64,
    pub id: FlowId,
    /// Shared by every record of the agent.
    pub node: Arc<str>,
    pub event: Change,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub state: &'static str,
    pub direction: &'static str,
    pub protocol: &'static str,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub process: Process,
    pub encryption: Encryption,
    pub tls: Option<TlsInfo>,
    pub plaintext: Option<PlaintextRecord>,
    /// With `--evidence redacted` only: the first sampled HTTP/1 head, header values redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redacted_sample: Option<String>,
    pub path: Path,
    /// Where egress really went when netfilter sent it elsewhere than the socket's peer.
    pub redirect: Option<RedirectRecord>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub verdict: Verdict,
    pub reason: &'static str,
    /// One sentence for a person: what happened and why it got this verdict.
    pub detail: String,
    /// First seen mid-connection: its start predates the agent.
    pub midstream: bool,
    /// Reported from the kernel's flow map because its events were lost (see `reconcile`).
    pub recovered: bool,
    /// The flow's first record: metrics count the flow once, on it.
    #[serde(skip)]
    pub first_report: bool,
    /// The kernel evicted the flow's entry while it was open: counters stop where the agent
    /// last saw them.
    pub evicted: bool,
    pub netns_cookie: u64,
}

/// A process name as the kernel keeps it (`comm`, at most 15 bytes): kept inline, so that a
/// record costs no allocation for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; COMM_LEN],
    len: u8,
}

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut bytes = [0; COMM_LEN];
        // Whole characters only, so that `as_str` is always valid UTF-8.
        let mut len = name.len().min(COMM_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A flow's id: its socket cookie, shown as 16 hex digits. Kept as the number, so that a record
/// costs no string for it until it is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for FlowId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A time as records show it (RFC 3339, milliseconds, UTC), formatted only when shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp(pub SystemTime);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    /// `true` for the node itself (host network).
    pub node: bool,
    pub meshed: bool,
}

impl Endpoint {
    fn new(addr: SocketAddr, who: Identity) -> Self {
        let pod = who.pod();
        Endpoint {
            ip: addr.ip(),
            port: addr.port(),
            namespace: pod.map(|p| p.namespace.clone()),
            pod: pod.map(|p| p.name.clone()),
            workload: pod.map(|p| p.workload.name.clone()),
            node: matches!(who, Identity::Node),
            meshed: pod.is_some_and(|p| p.meshed()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Process {
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub uid: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlaintextRecord {
    pub protocol: &'static str,
    pub method: Option<&'static str>,
    /// An HTTP request's path, without query string or fragment.
    pub path: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RedirectRecord {
    pub ip: IpAddr,
    pub port: u16,
    /// Interface index in the flow's network namespace (1 is loopback).
    pub ifindex: u32,
}

#[cfg(test)]
mod tests {
    use meshguard_ebpf::{FlowCounters, FlowTuple, DIRECTION_INGRESS};

    use super::*;
    use crate::{
        event::{
            decode,
            tests::{flow_event, sample_event},
        },
        fingerprint::tests::{client_hello, server_hello},
    };

    fn state(direction: u8, bytes_sent: u64, extra_flags: u32) -> FlowState {
        FlowState {
            tuple: FlowTuple {
                local_addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
                local_port: 40000,
                remote_port: 443,
                family: 2,
                protocol: 6,
                direction,
            },
            flags: flags::LIFECYCLE | extra_flags,
            counters: FlowCounters {
                bytes_sent,
                ..Default::default()
            },
            ..FlowState::default()
        }
    }

    fn apply(table: &mut FlowTable, bytes: Vec<u8>) -> Option<Change> {
        table
            .apply(&decode(&bytes).unwrap())
            .map(|(_, change)| change)
    }

    #[test]
    fn lifecycle_publishes_classified_then_closed() {
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        let s = state(DIRECTION_EGRESS, 0, 0);
        let ch = client_hello(Some("svc.test"), &["h2"], &[0x0304]);
        let steps: Vec<(Vec<u8>, Option<Change>)> = vec![
            (flow_event(EventKind::Open, 1, s), None),
            (
                sample_event(1, state(DIRECTION_EGRESS, 300, 0), DIRECTION_EGRESS, &ch),
                Some(Change::Classified),
            ),
            (
                flow_event(
                    EventKind::Process,
                    1,
                    state(DIRECTION_EGRESS, 300, flags::PROCESS),
                ),
                None,
            ),
            (
                sample_event(1, s, DIRECTION_INGRESS, &server_hello(Some(0x0304))),
                None,
            ),
            (
                flow_event(EventKind::Close, 1, state(DIRECTION_EGRESS, 900, 0)),
                Some(Change::Closed),
            ),
        ];
        for (i, (bytes, want)) in steps.into_iter().enumerate() {
            if want == Some(Change::Closed) {
                let (flow, _) = table.apply(&decode(&bytes).unwrap()).unwrap();
                let record = flow.record(
                    &"node-a".into(),
                    Change::Closed,
                    &Inventory::empty("none"),
                    &Policy::default(),
                );
                assert_eq!(record.encryption, Encryption::Tls);
                let tls = record.tls.unwrap();
                assert_eq!(tls.sni.as_deref(), Some("svc.test"));
                assert_eq!(tls.alpn, ["h2"]);
                assert_eq!(record.bytes_sent, 900);
                assert_eq!(record.state, "closed");
                assert!(
                    record.process.pid.is_some(),
                    "the process learnt earlier is kept"
                );
            } else {
                assert_eq!(apply(&mut table, bytes), want, "step {i}");
            }
        }
        assert_eq!(table.stats().tracked, 0, "closed flows leave the table");
    }

    #[test]
    fn classification_per_first_sample() {
        let ssh = EncryptedProtocol::Ssh;
        // (first bytes, IP protocol, encryption, plaintext protocol)
        let cases: [(&[u8], u8, Encryption, Option<&str>); 6] = [
            (
                b"GET / HTTP/1.1\r\n\r\n",
                6,
                Encryption::Plaintext,
                Some("http/1"),
            ),
            (&[22, 3, 1, 0, 1, 1], 6, Encryption::Tls, None),
            (b"\x00\x01binary", 6, Encryption::Plaintext, Some("unknown")),
            (
                b"SSH-2.0-OpenSSH_9.2\r\n",
                6,
                Encryption::Encrypted(ssh),
                None,
            ),
            (
                &[0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0],
                17,
                Encryption::Encrypted(EncryptedProtocol::Quic),
                None,
            ),
            (
                &[22, 3, 1, 0, 1, 1],
                17,
                Encryption::Plaintext,
                Some("unknown"),
            ),
        ];
        for (bytes, protocol, encryption, hint) in cases {
            let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
            let mut kernel = state(DIRECTION_EGRESS, 0, 0);
            kernel.tuple.protocol = protocol;
            let (flow, change) = table
                .apply(&decode(&sample_event(3, kernel, DIRECTION_EGRESS, bytes)).unwrap())
                .unwrap();
            assert_eq!(change, Change::Classified);
            let record = flow.record(
                &"n".into(),
                change,
                &Inventory::empty("none"),
                &Policy::default(),
            );
            assert_eq!(record.encryption, encryption, "{bytes:?}");
            assert_eq!(record.plaintext.map(|p| p.protocol), hint, "{bytes:?}");
        }
    }

    #[test]
    fn encryption_names_the_protocol() {
        let cases = [
            (Encryption::Tls, "\"tls\""),
            (Encryption::Encrypted(EncryptedProtocol::Ssh), "\"ssh\""),
            (Encryption::Encrypted(EncryptedProtocol::Dtls), "\"dtls\""),
            (Encryption::Plaintext, "\"plaintext\""),
            (Encryption::Unknown, "\"unknown\""),
        ];
        for (encryption, json) in cases {
            assert_eq!(serde_json::to_string(&encryption).unwrap(), json);
        }
    }

    #[test]
    fn a_flow_closed_without_payload_is_unknown() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let (flow, change) = table
            .apply(
                &decode(&flow_event(
                    EventKind::Close,
                    9,
                    state(DIRECTION_INGRESS, 0, 0),
                ))
                .unwrap(),
            )
            .unwrap();
        assert_eq!(change, Change::Closed);
        assert_eq!(
            flow.record(
                &"n".into(),
                change,
                &Inventory::empty("none"),
                &Policy::default()
            )
            .encryption,
            Encryption::Unknown
        );
    }

    #[test]
    fn counters_never_go_back() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        apply(
            &mut table,
            flow_event(EventKind::Open, 1, state(DIRECTION_EGRESS, 500, 0)),
        );
        apply(
            &mut table,
            flow_event(EventKind::Process, 1, state(DIRECTION_EGRESS, 200, 0)),
        );
        assert_eq!(table.get(1).unwrap().kernel.counters.bytes_sent, 500);
    }

    #[test]
    fn bounded_with_evictions_counted() {
        let mut table = FlowTable::new(3, SystemTime::UNIX_EPOCH);
        for cookie in 0..10 {
            apply(
                &mut table,
                flow_event(EventKind::Open, cookie, state(DIRECTION_EGRESS, 0, 0)),
            );
        }
        assert_eq!(
            table.stats(),
            TableStats {
                tracked: 3,
                evicted: 7,
                ..TableStats::default()
            }
        );
        assert!(
            table.get(9).is_some() && table.get(0).is_none(),
            "the oldest flows go first"
        );
        // Closed flows free their place without counting as evictions.
        for cookie in 7..10 {
            apply(
                &mut table,
                flow_event(EventKind::Close, cookie, state(DIRECTION_EGRESS, 0, 0)),
            );
        }
        assert_eq!(
            table.stats(),
            TableStats {
                tracked: 0,
                evicted: 7,
                ..TableStats::default()
            }
        );
    }

    /// A map entry as the kernel leaves it: opened at `opened_s`, closed at `closed_s` (0: open),
    /// with `head` as its first egress payload bytes.
    fn entry(opened_s: u64, closed_s: u64, head: &[u8]) -> FlowState {
        let mut s = state(DIRECTION_EGRESS, 100, flags::UID);
        s.opened_ns = opened_s * 1_000_000_000;
        s.closed_ns = closed_s * 1_000_000_000;
        s.head[0][..head.len()].copy_from_slice(head);
        s.head_len[0] = head.len() as u8;
        s
    }

    #[test]
    fn reconciliation_reports_what_the_ring_buffer_lost() {
        const NOW: u64 = 100 * 1_000_000_000;
        let get = b"GET /orders?id=7 HTTP/1.1\r\nHost";
        let tls = &[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        // (what, entry, the agent saw its events already, published change, forgotten)
        let cases: [(&str, FlowState, bool, Option<Change>, bool); 7] = [
            (
                "closed, all events lost",
                entry(10, 20, get),
                false,
                Some(Change::Closed),
                true,
            ),
            (
                "closed, only its close lost",
                entry(10, 20, get),
                true,
                Some(Change::Closed),
                true,
            ),
            (
                "open, all events lost",
                entry(10, 0, tls),
                false,
                Some(Change::Classified),
                false,
            ),
            (
                "open, no payload yet",
                entry(10, 0, b""),
                false,
                None,
                false,
            ),
            (
                "open and already followed",
                entry(10, 0, get),
                true,
                None,
                false,
            ),
            (
                "opened too recently to judge",
                entry(99, 0, get),
                false,
                None,
                false,
            ),
            (
                "closed too recently to judge",
                entry(10, 99, get),
                false,
                None,
                false,
            ),
        ];
        for (what, kernel, seen, want, forgotten) in cases {
            let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
            if seen {
                let sample = sample_event(7, kernel, DIRECTION_EGRESS, get);
                apply(&mut table, sample);
            }
            let found = table.reconcile([(7, kernel)], NOW);
            let published: Vec<Change> = found.published.iter().map(|(_, c)| *c).collect();
            assert_eq!(published, Vec::from_iter(want), "{what}");
            assert_eq!(found.forget == [7], forgotten, "{what}");
            let deferred = usize::from(what == "closed too recently to judge");
            assert_eq!(found.deferred, deferred, "{what}");
            if let Some((flow, change)) = found.published.first() {
                assert!(flow.recovered, "{what}");
                assert_eq!(
                    flow.evidence().0.alpn_seen,
                    seen,
                    "{what}: a sample, or only the head"
                );
                let record = flow.record(
                    &"n".into(),
                    *change,
                    &Inventory::empty("none"),
                    &Policy::default(),
                );
                assert!(record.recovered, "{what}");
                let encryption = if kernel.head[0][0] == 22 {
                    Encryption::Tls
                } else {
                    Encryption::Plaintext
                };
                assert_eq!(
                    record.encryption, encryption,
                    "{what}: from the head the map kept"
                );
                assert_eq!(record.first_report, !seen, "{what}");
            }
        }
    }

    #[test]
    fn a_close_after_restart_is_classified_from_the_map_head() {
        // The sample went to an agent since restarted; the close carries the head.
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let kernel = entry(1, 0, b"POST /pay HTTP/1.1\r\n");
        let (flow, change) = table
            .apply(&decode(&flow_event(EventKind::Close, 3, kernel)).unwrap())
            .unwrap();
        let record = flow.record(
            &"n".into(),
            change,
            &Inventory::empty("none"),
            &Policy::default(),
        );
        assert_eq!(record.encryption, Encryption::Plaintext);
        assert_eq!(record.plaintext.unwrap().method, Some("POST"));
        assert!(record.first_report);
    }

    #[test]
    fn an_evicted_flow_the_agent_never_saw_is_counted() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let evicted = state(DIRECTION_EGRESS, 0, flags::EVICTED);
        apply(
            &mut table,
            flow_event(EventKind::Open, 1, state(DIRECTION_EGRESS, 0, 0)),
        );
        apply(&mut table, flow_event(EventKind::Close, 1, evicted));
        assert_eq!(table.stats().lost_unseen, 0, "seen before its eviction");
        let (flow, _) = table
            .apply(&decode(&flow_event(EventKind::Close, 2, evicted)).unwrap())
            .unwrap();
        assert_eq!(table.stats().lost_unseen, 1);
        let record = flow.record(
            &"n".into(),
            Change::Closed,
            &Inventory::empty("none"),
            &Policy::default(),
        );
        assert!(record.evicted);
        assert_eq!(record.state, "closed");
    }

    #[test]
    fn comm_keeps_whole_characters() {
        assert_eq!(Comm::new("wrk:worker_0").to_string(), "wrk:worker_0");
        // 18 bytes of two-byte characters: the first 8 fit in 16.
        assert_eq!(Comm::new("ééééééééé").as_str(), "éééééééé");
        assert_eq!(
            serde_json::to_string(&Comm::new("curl")).unwrap(),
            "\"curl\""
        );
    }
}
