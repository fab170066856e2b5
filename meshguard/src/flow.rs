//! The agent's table of flows, keyed by the kernel's flow key (the socket cookie, or a UDP
//! socket's per-peer key), and the records it publishes. Kernel events update it: samples are
//! put back together per direction until the evidence they carry is whole, and a closed flow
//! leaves it. Bounded: when full, the oldest flow makes room and the eviction is counted.

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
        fingerprint, redacted, EncryptedProtocol, Fingerprint, Handshake, PlaintextHint,
        Reassembly, TlsInfo, Transport,
    },
    inventory::Identity,
    judge::Judged,
    verdict::{Direction, Encryption, Evidence, Owner, Path, Verdict},
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

/// What a published record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The flow's evidence was whole (or waited for long enough) to judge it.
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
    /// Flows to judge and publish, marked recovered.
    pub updates: Vec<Update>,
    /// Closed flows now reported: their map entries can go.
    pub forget: Vec<u64>,
    /// Closed entries too recent to judge (their events may still be on their way): look
    /// again soon.
    pub deferred: usize,
}

/// How long after a map entry was written its events are surely in the ring buffer.
pub const EVENT_GRACE_NS: u64 = 1_000_000_000;

/// How long a flow's first record waits for evidence still on its way (the rest of a
/// ClientHello, the record after it, the owner's container): long enough for a handshake's
/// round trip, short enough that a stalled one is still reported.
pub const EVIDENCE_WAIT_NS: u64 = 1_000_000_000;

/// The samples of one flow, per direction (egress, ingress), while they are put together.
type Streams = [Reassembly; 2];

pub struct FlowTable {
    /// Boxed: growing the table then moves pointers, not whole flows, and never holds two
    /// copies of every flow at once.
    flows: CookieMap<Box<Flow>>,
    /// Samples of flows whose evidence is not whole yet: few at any time, and dropped as soon
    /// as it is (or the flow closes).
    assembling: CookieMap<Box<Streams>>,
    /// An unconnected UDP socket's flows with peers other than its first, by socket cookie:
    /// they close with it.
    peers: CookieMap<Vec<u64>>,
    /// Flows judged but held back for evidence on its way, by key.
    waiting: CookieMap<()>,
    /// Cookies in arrival order; may hold cookies of flows already gone (skipped on eviction,
    /// compacted when it grows past twice the capacity).
    order: VecDeque<u64>,
    /// Keys of flows published closed, the newest `capacity` of them: the kernel never reuses a
    /// socket cookie, so a later event or map entry of one is a repeat (a close seen by two
    /// generations of programs, a walk that returned a key twice) and is dropped.
    closed: CookieMap<()>,
    closed_order: VecDeque<u64>,
    capacity: usize,
    evicted: u64,
    lost_unseen: u64,
    recovered: u64,
    repeats: u64,
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
            assembling: CookieMap::default(),
            peers: CookieMap::default(),
            waiting: CookieMap::default(),
            order: VecDeque::new(),
            closed: CookieMap::default(),
            closed_order: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
            lost_unseen: 0,
            recovered: 0,
            repeats: 0,
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

    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.flows.get(&cookie).map(|flow| &**flow)
    }

    /// Records the verdict and reason of an open flow's first published record.
    pub fn published(&mut self, cookie: u64, verdict: (Verdict, &'static str)) {
        if let Some(flow) = self.flows.get_mut(&cookie) {
            flow.published = Some(verdict);
        }
    }

    /// Holds an open flow's first record back until its evidence is whole or its wait is over.
    pub fn wait(&mut self, cookie: u64) {
        self.waiting.insert(cookie, ());
    }

    /// The flows held back, to judge again; those still waiting are held back again by the
    /// caller.
    pub fn take_waiting(&mut self) -> Vec<u64> {
        self.waiting.drain().map(|(cookie, ())| cookie).collect()
    }

    /// Applies one kernel event; what it changed, worth judging, goes to `out`, and map
    /// entries the kernel no longer needs (the peers of a closed UDP socket) to `forget`.
    pub fn apply(&mut self, event: &KernelEvent, out: &mut Vec<Update>, forget: &mut Vec<u64>) {
        let at = self.boot + Duration::from_nanos(event.ktime_ns);
        let key = event.cookie;
        if self.closed.contains_key(&key) {
            self.repeats += 1;
            return;
        }
        if event.flow.flags & flags::EVICTED != 0 && !self.flows.contains_key(&key) {
            self.lost_unseen += 1;
        }
        let capture_redacted = self.capture_redacted;
        let new_peer = !self.flows.contains_key(&key) && event.flow.socket != key;
        let flow = self.entry(key, &event.flow, at);
        merge(&mut flow.kernel, &event.flow);
        flow.last_seen = flow.last_seen.max(at);
        let udp = flow.kernel.tuple.protocol == 17;
        if new_peer && event.flow.socket != 0 {
            let peers = self.peers.entry(event.flow.socket).or_default();
            if !peers.contains(&key) {
                peers.push(key);
            }
        }

        if let Some(sample) = &event.sample {
            let flow = self.flows.get_mut(&key).expect("just made");
            if flow.sampled_ns == 0 {
                flow.sampled_ns = event.ktime_ns.max(1);
            }
            let whole = flow.payload.as_ref().is_some_and(|p| p.hello_complete);
            // Evidence already whole needs no more bytes; a late sample changes nothing.
            if !whole {
                let streams = self.assembling.entry(key).or_default();
                let d = usize::from(sample.direction == DIRECTION_INGRESS);
                streams[d].add(sample.offset, &sample.bytes);
                flow.learn(streams, udp);
                if capture_redacted {
                    let payload = flow.payload.get_or_insert_default();
                    if payload.redacted.is_none() && sample.offset == 0 {
                        payload.redacted = redacted(&sample.bytes);
                    }
                }
                if flow.payload.as_ref().is_some_and(|p| p.hello_complete) {
                    self.assembling.remove(&key);
                }
                out.push(Update::Evidence(key));
            }
        }
        if event.kind == EventKind::Close {
            self.close(key, at, out);
            // A UDP socket's other peers end with it: their entries are the agent's to remove.
            if let Some(peers) = self.peers.remove(&key) {
                for peer in peers {
                    if self.close(peer, at, out) {
                        forget.push(peer);
                    }
                }
            }
        }
    }

    /// Closes a flow and takes it out of the table; false if it was not there.
    fn close(&mut self, key: u64, at: SystemTime, out: &mut Vec<Update>) -> bool {
        let Some(mut flow) = self.flows.remove(&key) else {
            return false;
        };
        self.assembling.remove(&key);
        self.remember_closed(key);
        // Its samples were lost, or went to an agent since restarted: the map kept its head.
        flow.learn_from_head();
        flow.closed = true;
        flow.last_seen = flow.last_seen.max(at);
        out.push(Update::Closed(flow));
        true
    }

    /// Notes a key published closed, forgetting the oldest beyond the table's capacity.
    fn remember_closed(&mut self, key: u64) {
        if self.closed.insert(key, ()).is_none() {
            self.closed_order.push_back(key);
        }
        while self.closed_order.len() > self.capacity {
            if let Some(old) = self.closed_order.pop_front() {
                self.closed.remove(&old);
            }
        }
    }

    /// Events and map entries of flows already published closed, dropped (see `closed`).
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    /// Takes an open flow's judgement from the kernel's `REPORTED` map: an earlier agent
    /// published it, so it is not reported again as new, and its later records keep that
    /// verdict unless this agent sees evidence of its own.
    pub fn restore(&mut self, key: u64, state: &FlowState, verdict: Verdict, reason: &'static str) {
        if self.closed.contains_key(&key) {
            return;
        }
        let at = self.boot + Duration::from_nanos(state.opened_ns);
        let flow = self.entry(key, state, at);
        merge(&mut flow.kernel, state);
        if flow.published.is_none() {
            flow.published = Some((verdict, reason));
            flow.restored = true;
        }
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
                published: None,
                restored: false,
                sampled_ns: 0,
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
        let entries: Vec<(u64, FlowState)> = entries.into_iter().collect();
        let sockets: std::collections::HashSet<u64> = entries
            .iter()
            .filter(|(key, state)| state.socket == 0 || state.socket == *key)
            .map(|(key, _)| *key)
            .collect();
        for (cookie, mut state) in entries {
            if self.closed.contains_key(&cookie) {
                // Published closed already; its entry is left over.
                self.repeats += 1;
                out.forget.push(cookie);
                continue;
            }
            // A UDP socket's later peer whose socket is gone from the map closed with it.
            let orphan =
                state.socket != 0 && state.socket != cookie && !sockets.contains(&state.socket);
            if orphan && state.closed_ns == 0 {
                state.closed_ns = state.opened_ns.max(1);
            }
            let written = if state.closed_ns != 0 {
                state.closed_ns
            } else {
                state.opened_ns
            };
            if written >= cutoff && !orphan {
                // A recent closed entry is a lost close: look again soon. A recent open one is
                // just new; its events will come, or its close will tell.
                out.deferred += usize::from(state.closed_ns != 0);
                continue;
            }
            if let Some(followed) = self.flows.get_mut(&cookie).filter(|f| {
                state.closed_ns == 0
                    && (f.encryption != Encryption::Unknown || f.published.is_some())
            }) {
                // Followed through its events; only the counters may have moved on.
                merge(&mut followed.kernel, &state);
                continue;
            }
            let at = self.boot + Duration::from_nanos(written);
            let flow = self.entry(cookie, &state, at);
            merge(&mut flow.kernel, &state);
            flow.last_seen = flow.last_seen.max(at);
            let classified = flow.learn_from_head();
            if state.closed_ns == 0 && !classified {
                // Open and silent so far: its events will tell.
                continue;
            }
            flow.recovered = true;
            self.recovered += 1;
            if state.closed_ns != 0 {
                let mut flow = self.flows.remove(&cookie).expect("just found");
                self.assembling.remove(&cookie);
                self.remember_closed(cookie);
                flow.closed = true;
                out.forget.push(cookie);
                out.updates.push(Update::Closed(flow));
            } else {
                out.updates.push(Update::Evidence(cookie));
            }
        }
        out
    }

    fn make_room(&mut self) {
        while self.flows.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.flows.remove(&oldest).is_some() {
                self.assembling.remove(&oldest);
                self.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.capacity {
            let flows = &self.flows;
            self.order.retain(|cookie| flows.contains_key(cookie));
            let socket_alive = |socket: &u64| flows.contains_key(socket);
            self.peers.retain(|socket, _| socket_alive(socket));
        }
    }
}

/// Counters only grow, and once-only facts (uid, cgroup, process, redirect, devices) stay once
/// learnt: events from different CPUs may arrive slightly out of order.
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
    if new & flags::CGROUP != 0 {
        into.cgroup = from.cgroup;
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
        if into.ifindex[d] == 0 {
            into.ifindex[d] = from.ifindex[d];
        }
    }
    if into.socket == 0 {
        into.socket = from.socket;
    }
    if into.netns == 0 {
        into.netns = from.netns;
    }
    into.closed_ns = into.closed_ns.max(from.closed_ns);
    into.flags |= from.flags;
}

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

impl Flow {
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.payload.as_ref()?.tls.as_ref()
    }

    fn udp(&self) -> bool {
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
        }
    }

    /// The record of this flow, as judged.
    pub fn record(&self, node: &Arc<str>, change: Change, judged: Judged) -> FlowRecord {
        let Judged {
            decision,
            owner,
            ends: (local, remote),
            ..
        } = judged;
        let k = &self.kernel;
        let (local_addr, remote_addr) = (self.local(), self.remote());
        let corrected_from = self
            .published
            .filter(|&(v, r)| (v, r) != (decision.verdict, decision.reason))
            .map(|(verdict, reason)| Corrected { verdict, reason });
        FlowRecord {
            cookie: self.cookie,
            id: FlowId(self.cookie),
            node: Arc::clone(node),
            event: change,
            first_seen: Timestamp(self.first_seen),
            last_seen: Timestamp(self.last_seen),
            state: if self.closed { "closed" } else { "open" },
            direction: match self.direction() {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            },
            protocol: if self.udp() { "udp" } else { "tcp" },
            local: Endpoint::new(local_addr, local),
            remote: Endpoint::new(remote_addr, remote),
            process: Process {
                pid: (k.flags & flags::PROCESS != 0).then_some(k.pid),
                comm: self.comm().map(Comm::new),
                uid: (k.flags & flags::UID != 0).then_some(k.uid),
            },
            owner: OwnerRecord {
                kind: owner.kind(),
                container: owner.container().map(str::to_string),
            },
            loopback: self.loopback(),
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
            redirect: (k.flags & flags::REDIRECTED != 0).then(|| RedirectRecord {
                ip: ip_addr(k.tuple.family, k.redirect.addr),
                port: k.redirect.port,
                ifindex: k.redirect.ifindex,
            }),
            bytes_sent: k.counters.bytes_sent,
            bytes_received: k.counters.bytes_received,
            packets_sent: k.counters.packets_sent,
            packets_received: k.counters.packets_received,
            verdict: decision.verdict,
            reason: decision.reason,
            detail: decision.detail,
            corrected_from,
            midstream: k.flags & flags::MIDSTREAM != 0,
            recovered: self.recovered,
            first_report: self.published.is_none(),
            evicted: k.flags & flags::EVICTED != 0,
            netns_cookie: k.netns,
        }
    }
}

/// A verdict an earlier record of the same flow gave, which later evidence changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Corrected {
    pub verdict: Verdict,
    pub reason: &'static str,
}

/// A flow as `--log-flows` and, later, the API and CLI show it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// The flow key; `id` is it in hex.
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
    /// Whose cgroup created the socket: the evidence of who sent and received it.
    pub owner: OwnerRecord,
    /// Its packets crossed only the loopback device: both ends in one network namespace.
    pub loopback: bool,
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
    /// Set when this record's verdict differs from the flow's first record (evidence that came
    /// later changed it): an explicit, counted correction, never a silent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_from: Option<Corrected>,
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

/// A socket's owner as a record shows it.
#[derive(Clone, Debug, Serialize)]
pub struct OwnerRecord {
    /// `proxy` (a mesh proxy's container), `app` (any other container), `sandbox`, `host` (a
    /// process of the node) or `unknown` (no cgroup evidence).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
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
    /// An HTTP request's path, without query string, fragment, path parameters or userinfo.
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
    use meshguard_ebpf::{peer_key, FlowCounters, FlowTuple, DIRECTION_INGRESS};

    use super::*;
    use crate::{
        event::{
            decode,
            tests::{flow_event, sample_at, sample_event},
        },
        fingerprint::tests::{client_hello, server_hello},
        inventory::Inventory,
        judge::judge_events,
        verdict::Policy,
    };

    /// The header of the record after a handshake record: what makes the evidence whole.
    const NEXT_RECORD: [u8; 5] = [20, 3, 3, 0, 1];

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
            socket: 1,
            flags: flags::LIFECYCLE | extra_flags,
            counters: FlowCounters {
                bytes_sent,
                ..Default::default()
            },
            ..FlowState::default()
        }
    }

    /// What applying one event changed: `E` new evidence of an open flow, `C` a close.
    fn apply(table: &mut FlowTable, bytes: &[u8]) -> String {
        let (mut out, mut forget) = (Vec::new(), Vec::new());
        table.apply(&decode(bytes).unwrap(), &mut out, &mut forget);
        out.iter()
            .map(|u| match u {
                Update::Evidence(_) => 'E',
                Update::Closed(_) => 'C',
            })
            .collect()
    }

    fn none() -> (Inventory, Policy) {
        (Inventory::empty("none"), Policy::default())
    }

    #[test]
    fn lifecycle_gives_evidence_then_a_close() {
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        let s = state(DIRECTION_EGRESS, 0, 0);
        let mut ch = client_hello(Some("svc.test"), &["h2"], &[0x0304]);
        ch.extend(NEXT_RECORD);
        let steps: [(Vec<u8>, &str); 5] = [
            (flow_event(EventKind::Open, 1, s), ""),
            (
                sample_event(1, state(DIRECTION_EGRESS, 300, 0), DIRECTION_EGRESS, &ch),
                "E",
            ),
            (
                flow_event(
                    EventKind::Process,
                    1,
                    state(DIRECTION_EGRESS, 300, flags::PROCESS),
                ),
                "",
            ),
            (
                sample_event(1, s, DIRECTION_INGRESS, &server_hello(Some(0x0304))),
                "",
            ),
            (
                flow_event(EventKind::Close, 1, state(DIRECTION_EGRESS, 900, 0)),
                "C",
            ),
        ];
        for (i, (bytes, want)) in steps.iter().enumerate() {
            if i == 4 {
                assert!(
                    table.get(1).unwrap().hello_complete(),
                    "the ClientHello and the record after it"
                );
            }
            assert_eq!(apply(&mut table, bytes), *want, "step {i}");
        }
        assert_eq!(table.stats().tracked, 0, "closed flows leave the table");
        let (inv, policy) = none();
        let records = judge_events(&steps.map(|(b, _)| b), &inv, &policy);
        let closed = records.last().unwrap();
        assert_eq!(closed.event, Change::Closed);
        assert_eq!(closed.encryption, Encryption::Tls);
        let tls = closed.tls.as_ref().unwrap();
        assert_eq!(tls.sni.as_deref(), Some("svc.test"));
        assert_eq!(tls.alpn, ["h2"]);
        assert_eq!(closed.bytes_sent, 900);
        assert_eq!(closed.state, "closed");
        assert!(
            closed.process.pid.is_some(),
            "the process learnt earlier is kept"
        );
    }

    #[test]
    fn a_client_hello_over_two_samples_is_judged_whole() {
        // A post-quantum key share before ALPN: the first segment ends before the ALPN.
        let mut ch = client_hello(
            Some("outbound_.8080_._.api.shop.svc.cluster.local"),
            &["istio-peer-exchange", "istio"],
            &[0x0304],
        );
        ch.extend(NEXT_RECORD);
        let cut = ch.len() / 2;
        let s = state(DIRECTION_EGRESS, 0, 0);
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        apply(
            &mut table,
            &sample_event(1, s, DIRECTION_EGRESS, &ch[..cut]),
        );
        let first = table.get(1).unwrap();
        assert_eq!(first.encryption, Encryption::Tls);
        assert!(!first.hello_complete(), "cut: its ALPN may be past the cut");
        // A retransmission of the first segment changes nothing; the rest completes it.
        apply(
            &mut table,
            &sample_event(1, s, DIRECTION_EGRESS, &ch[..cut]),
        );
        apply(
            &mut table,
            &sample_at(1, s, DIRECTION_EGRESS, cut as u32, &ch[cut..]),
        );
        let whole = table.get(1).unwrap();
        assert!(whole.hello_complete());
        assert_eq!(whole.tls().unwrap().alpn, ["istio-peer-exchange", "istio"]);
        assert!(
            table.assembling.is_empty(),
            "samples are dropped once the evidence is whole"
        );
    }

    #[test]
    fn classification_per_first_sample() {
        let mut hello = client_hello(None, &[], &[0x0303]);
        hello.extend(NEXT_RECORD);
        let mut fake = client_hello(None, &["istio"], &[0x0304]);
        fake.extend(b"GET /secret HTTP/1.1\r\n");
        let cases: [(&[u8], Encryption, Option<&str>); 5] = [
            (
                b"GET / HTTP/1.1\r\n\r\n",
                Encryption::Plaintext,
                Some("http/1"),
            ),
            (&hello, Encryption::Tls, None),
            (b"\x00\x01binary", Encryption::Plaintext, Some("unknown")),
            (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", Encryption::Ssh, None),
            (&fake, Encryption::Plaintext, None),
        ];
        let (inv, policy) = none();
        for (bytes, encryption, protocol) in cases {
            let records = judge_events(
                &[sample_event(
                    3,
                    state(DIRECTION_EGRESS, 0, 0),
                    DIRECTION_EGRESS,
                    bytes,
                )],
                &inv,
                &policy,
            );
            let record = &records[0];
            assert_eq!(record.event, Change::Classified);
            assert_eq!(record.encryption, encryption, "{bytes:?}");
            assert_eq!(
                record.plaintext.as_ref().map(|p| p.protocol),
                protocol,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_fake_handshake_keeps_the_alpn_it_claimed() {
        let mut fake = client_hello(None, &["istio-peer-exchange", "istio"], &[0x0304]);
        fake.extend(b"POST /exfil HTTP/1.1\r\n");
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        apply(
            &mut table,
            &sample_event(1, state(DIRECTION_EGRESS, 0, 0), DIRECTION_EGRESS, &fake),
        );
        let flow = table.get(1).unwrap();
        assert_eq!(
            flow.encryption,
            Encryption::Plaintext,
            "plaintext after the hello"
        );
        assert_eq!(
            flow.tls().unwrap().alpn,
            ["istio-peer-exchange", "istio"],
            "what it claimed"
        );
        assert!(flow.hello_complete());

        // A ClientHello answered in plaintext (to an accomplice, or an HTTP server) is no TLS.
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let s = state(DIRECTION_INGRESS, 0, 0);
        let hello = client_hello(None, &["istio"], &[0x0304]);
        apply(&mut table, &sample_event(1, s, DIRECTION_INGRESS, &hello));
        assert_eq!(table.get(1).unwrap().encryption, Encryption::Tls);
        apply(
            &mut table,
            &sample_event(1, s, DIRECTION_EGRESS, b"HTTP/1.0 400 Bad request\r\n"),
        );
        assert_eq!(table.get(1).unwrap().encryption, Encryption::Plaintext);
    }

    #[test]
    fn a_flow_closed_without_payload_is_unknown() {
        let (inv, policy) = none();
        let records = judge_events(
            &[flow_event(
                EventKind::Close,
                9,
                state(DIRECTION_INGRESS, 0, 0),
            )],
            &inv,
            &policy,
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event, Change::Closed);
        assert_eq!(records[0].encryption, Encryption::Unknown);
    }

    #[test]
    fn counters_never_go_back() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        apply(
            &mut table,
            &flow_event(EventKind::Open, 1, state(DIRECTION_EGRESS, 500, 0)),
        );
        apply(
            &mut table,
            &flow_event(EventKind::Process, 1, state(DIRECTION_EGRESS, 200, 0)),
        );
        assert_eq!(table.get(1).unwrap().kernel.counters.bytes_sent, 500);
    }

    #[test]
    fn bounded_with_evictions_counted() {
        let mut table = FlowTable::new(3, SystemTime::UNIX_EPOCH);
        for cookie in 0..10 {
            apply(
                &mut table,
                &flow_event(EventKind::Open, cookie, state(DIRECTION_EGRESS, 0, 0)),
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
                &flow_event(EventKind::Close, cookie, state(DIRECTION_EGRESS, 0, 0)),
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

    /// An unconnected UDP socket's flow with a peer other than its first.
    fn udp_peer(socket: u64, peer: [u8; 4], port: u16) -> (u64, FlowState) {
        let addr = [u32::from_ne_bytes(peer), 0, 0, 0];
        let mut s = state(DIRECTION_EGRESS, 0, 0);
        s.flags = 0;
        s.tuple.protocol = 17;
        s.tuple.remote_addr = addr;
        s.tuple.remote_port = port;
        s.socket = socket;
        (peer_key(socket, &addr, port), s)
    }

    #[test]
    fn a_udp_socket_s_peers_are_flows_of_their_own_and_close_with_it() {
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        // The first peer is keyed by the socket's cookie itself.
        let (_, first) = udp_peer(5, [10, 96, 0, 10], 53);
        let dns = 5;
        let (other, peer) = udp_peer(5, [10, 0, 0, 12], 9999);
        assert_ne!(other, dns);
        apply(
            &mut table,
            &sample_event(dns, first, DIRECTION_EGRESS, b"\x12\x34\x01\x00"),
        );
        apply(
            &mut table,
            &sample_event(other, peer, DIRECTION_EGRESS, b"exfiltrated"),
        );
        assert_eq!(
            table.get(other).unwrap().remote().to_string(),
            "10.0.0.12:9999"
        );
        // The socket closes (sock_release finds its own entry): both flows close, and the peer's
        // entry is the agent's to remove from the map.
        let (mut out, mut forget) = (Vec::new(), Vec::new());
        table.apply(
            &decode(&flow_event(EventKind::Close, dns, first)).unwrap(),
            &mut out,
            &mut forget,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(forget, [other]);
        assert_eq!(table.stats().tracked, 0);
    }

    /// A map entry as the kernel leaves it: opened at `opened_s`, closed at `closed_s` (0: open),
    /// with `head` as its first egress payload bytes.
    fn entry(opened_s: u64, closed_s: u64, head: &[u8]) -> FlowState {
        let mut s = state(DIRECTION_EGRESS, 100, flags::UID);
        s.socket = 7;
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
        // (what, entry, the agent saw its events already, update, forgotten)
        let cases: [(&str, FlowState, bool, &str, bool); 7] = [
            (
                "closed, all events lost",
                entry(10, 20, get),
                false,
                "C",
                true,
            ),
            (
                "closed, only its close lost",
                entry(10, 20, get),
                true,
                "C",
                true,
            ),
            (
                "open, all events lost",
                entry(10, 0, tls),
                false,
                "E",
                false,
            ),
            ("open, no payload yet", entry(10, 0, b""), false, "", false),
            (
                "open and already followed",
                entry(10, 0, get),
                true,
                "",
                false,
            ),
            (
                "opened too recently to judge",
                entry(99, 0, get),
                false,
                "",
                false,
            ),
            (
                "closed too recently to judge",
                entry(10, 99, get),
                false,
                "",
                false,
            ),
        ];
        let (inv, policy) = none();
        for (what, kernel, seen, want, forgotten) in cases {
            let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
            if seen {
                apply(&mut table, &sample_event(7, kernel, DIRECTION_EGRESS, get));
            }
            let found = table.reconcile([(7, kernel)], NOW);
            let updates: String = found
                .updates
                .iter()
                .map(|u| match u {
                    Update::Evidence(_) => 'E',
                    Update::Closed(_) => 'C',
                })
                .collect();
            assert_eq!(updates, want, "{what}");
            assert_eq!(found.forget == [7], forgotten, "{what}");
            let deferred = usize::from(what == "closed too recently to judge");
            assert_eq!(found.deferred, deferred, "{what}");
            let flow = match found.updates.first() {
                Some(Update::Closed(flow)) => flow.as_ref().clone(),
                Some(Update::Evidence(key)) => table.get(*key).unwrap().clone(),
                None => continue,
            };
            assert!(flow.recovered, "{what}");
            let ev = flow.evidence(Owner::Unknown);
            assert_eq!(
                ev.hello_complete, seen,
                "{what}: whole from a sample, never from a head"
            );
            let judged = crate::judge::Judge::new("/nonexistent".into()).judge(
                &flow,
                &inv,
                &policy,
                u64::MAX / 2,
            );
            let record = flow.record(&"n".into(), Change::Closed, judged);
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
            assert_eq!(
                record.first_report,
                !seen || flow.published.is_none(),
                "{what}"
            );
        }
    }

    #[test]
    fn a_udp_peer_left_behind_by_its_closed_socket_is_closed_by_reconciliation() {
        const NOW: u64 = 100 * 1_000_000_000;
        let (key, mut peer) = udp_peer(5, [10, 0, 0, 12], 9999);
        peer.opened_ns = 99 * 1_000_000_000;
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        let found = table.reconcile([(key, peer)], NOW);
        assert!(matches!(found.updates[..], [Update::Closed(_)]));
        assert_eq!(found.forget, [key]);
    }

    #[test]
    fn a_flow_is_published_closed_once_however_often_it_is_seen_closed() {
        // A close seen by two generations of programs, a walk that returns a key twice, an
        // entry left over after its close was published: one closed record.
        const NOW: u64 = 100 * 1_000_000_000;
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        let closed = entry(1, 2, b"GET / HTTP/1.1\r\n");
        let found = table.reconcile([(7, closed), (7, closed)], NOW);
        assert_eq!(found.updates.len(), 1, "one record for a key walked twice");
        let again = table.reconcile([(7, closed)], NOW);
        assert!(again.updates.is_empty(), "a second pass publishes nothing");
        assert_eq!(again.forget, [7], "and removes the leftover entry");
        let (mut out, mut forget) = (Vec::new(), Vec::new());
        let event = decode(&flow_event(EventKind::Close, 7, closed)).unwrap();
        table.apply(&event, &mut out, &mut forget);
        assert!(out.is_empty(), "a late Close of the same flow is a repeat");
        assert_eq!(table.repeats(), 3);
        assert_eq!(table.stats().tracked, 0);
    }

    #[test]
    fn a_restored_flow_is_not_reported_again_and_keeps_its_verdict() {
        const NOW: u64 = 100 * 1_000_000_000;
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        // Open, its head a ClientHello's first bytes: alone, not enough for mesh mTLS.
        let tls = [22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        let open = entry(1, 0, &tls);
        table.restore(7, &open, Verdict::Mtls, "istio-mtls");
        let found = table.reconcile([(7, open)], NOW);
        assert!(
            found.updates.is_empty(),
            "already reported: {:?}",
            found.updates
        );
        let flow = table.get(7).unwrap();
        assert_eq!(flow.published, Some((Verdict::Mtls, "istio-mtls")));
        assert!(flow.restored);
        // It closes while no agent sees its events: the close keeps the whole-evidence verdict.
        let closed = entry(1, 2, &tls);
        let found = table.reconcile([(7, closed)], NOW);
        let [Update::Closed(flow)] = &found.updates[..] else {
            panic!("{:?}", found.updates)
        };
        let (inv, policy) = none();
        let mut judge = crate::judge::Judge::new(std::path::PathBuf::from("/nonexistent"));
        let record = judge
            .record(
                &mut table,
                Update::Closed(flow.clone()),
                &inv,
                &policy,
                &"n".into(),
                NOW,
            )
            .unwrap();
        assert_eq!(
            (record.verdict, record.reason),
            (Verdict::Mtls, "istio-mtls")
        );
        assert!(record.corrected_from.is_none());
        assert!(!record.first_report, "metrics counted it before");
    }

    #[test]
    fn a_close_after_restart_is_classified_from_the_map_head() {
        // The sample went to an agent since restarted; the close carries the head.
        let (inv, policy) = none();
        let kernel = entry(1, 0, b"POST /pay HTTP/1.1\r\n");
        let records = judge_events(&[flow_event(EventKind::Close, 3, kernel)], &inv, &policy);
        let record = &records[0];
        assert_eq!(record.encryption, Encryption::Plaintext);
        assert_eq!(record.plaintext.as_ref().unwrap().method, Some("POST"));
        assert!(record.first_report);
    }

    #[test]
    fn an_evicted_flow_the_agent_never_saw_is_counted() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let evicted = state(DIRECTION_EGRESS, 0, flags::EVICTED);
        apply(
            &mut table,
            &flow_event(EventKind::Open, 1, state(DIRECTION_EGRESS, 0, 0)),
        );
        apply(&mut table, &flow_event(EventKind::Close, 1, evicted));
        assert_eq!(table.stats().lost_unseen, 0, "seen before its eviction");
        apply(&mut table, &flow_event(EventKind::Close, 2, evicted));
        assert_eq!(table.stats().lost_unseen, 1);
        let (inv, policy) = none();
        let records = judge_events(&[flow_event(EventKind::Close, 2, evicted)], &inv, &policy);
        assert!(records[0].evicted);
        assert_eq!(records[0].state, "closed");
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
