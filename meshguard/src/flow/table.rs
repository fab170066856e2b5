//! The agent's table of flows, keyed by the kernel's flow key (the socket cookie, or a UDP
//! socket's per-peer key). Kernel events update it: samples are put back together per
//! direction until the evidence they carry is whole, and a closed flow leaves it. Bounded: when
//! full, the oldest flow makes room and the eviction is counted. Reconciliation with the
//! kernel's flow map finds what lost events did not say.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use meshguard_ebpf::{flags, EventKind, FlowState, DIRECTION_INGRESS};

use super::{Flow, Streams, Update};
use crate::{
    cookie::CookieMap,
    event::KernelEvent,
    fingerprint::{redacted, Encryption},
    verdict::Verdict,
};

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

    /// Notes that a published record says what enforcement did to the flow.
    pub fn acted(&mut self, cookie: u64) {
        if let Some(flow) = self.flows.get_mut(&cookie) {
            flow.acted = true;
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
        let before = flow.kernel.flags;
        merge(&mut flow.kernel, &event.flow);
        // Enforcement acting is evidence of its own, whatever the event carries.
        let acted = flags::REFUSED | flags::WOULD_REFUSE;
        let mut judge_again = flow.kernel.flags & !before & acted != 0;
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
                judge_again = true;
            }
        }
        if judge_again && event.kind != EventKind::Close {
            out.push(Update::Evidence(key));
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
                acted: false,
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
    // One or the other: a redirect of egress, or the address a client dialled.
    if new & (flags::REDIRECTED | flags::DIALLED) != 0
        && into.flags & (flags::REDIRECTED | flags::DIALLED) == 0
    {
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

#[cfg(test)]
pub(crate) mod tests {
    use meshguard_ebpf::{peer_key, FlowCounters, FlowTuple, Redirect, DIRECTION_EGRESS};

    use super::*;
    use crate::{
        event::{
            decode,
            tests::{flow_event, sample_at, sample_event},
        },
        fingerprint::tests::client_hello,
    };

    /// The header of the record after a handshake record: what makes the evidence whole.
    pub(crate) const NEXT_RECORD: [u8; 5] = [20, 3, 3, 0, 1];

    pub(crate) fn state(direction: u8, bytes_sent: u64, extra_flags: u32) -> FlowState {
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
    pub(crate) fn apply(table: &mut FlowTable, bytes: &[u8]) -> String {
        let (mut out, mut forget) = (Vec::new(), Vec::new());
        table.apply(&decode(bytes).unwrap(), &mut out, &mut forget);
        out.iter()
            .map(|u| match u {
                Update::Evidence(_) => 'E',
                Update::Closed(_) => 'C',
            })
            .collect()
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
    fn the_address_a_captured_connection_was_dialled_to_stays_once_learnt() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let mut accepted = state(DIRECTION_INGRESS, 0, 0);
        accepted.tuple.local_port = 15006;
        apply(&mut table, &flow_event(EventKind::Open, 1, accepted));
        assert_eq!(table.get(1).unwrap().dialled(), None);
        // Its first reply left from the address its client dialled; a later snapshot that
        // predates it, or one claiming another, changes nothing.
        let dialled = |port| {
            let mut s = accepted;
            s.flags |= flags::DIALLED;
            s.redirect = Redirect {
                addr: s.tuple.local_addr,
                port,
                ..Redirect::default()
            };
            s
        };
        for event in [dialled(9080), accepted, dialled(9999)] {
            apply(&mut table, &flow_event(EventKind::Process, 1, event));
        }
        assert_eq!(
            table.get(1).unwrap().dialled(),
            Some("10.0.0.1:9080".parse().unwrap())
        );
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
    pub(crate) fn udp_peer(socket: u64, peer: [u8; 4], port: u16) -> (u64, FlowState) {
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
    pub(crate) fn entry(opened_s: u64, closed_s: u64, head: &[u8]) -> FlowState {
        let mut s = state(DIRECTION_EGRESS, 100, flags::UID);
        s.socket = 7;
        s.opened_ns = opened_s * 1_000_000_000;
        s.closed_ns = closed_s * 1_000_000_000;
        s.head[0][..head.len()].copy_from_slice(head);
        s.head_len[0] = head.len() as u8;
        s
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
}
