//! `cgroup_skb` ingress and egress: the only per-packet path, so it stays short. Per packet it
//! reads the IP and L4 headers; per packet with payload it finds the flow by socket cookie and
//! adds to its counters. Once per flow it records the socket owner's uid and whether egress was
//! redirected away from the socket's peer; once per direction it copies the first payload bytes
//! into a `Sample` event. It lets every packet through but those of a flow that enforcement
//! refuses (see `enforce`).
//!
//! A direction of a TCP flow followed from its start whose evidence is all taken (owner, the
//! redirect, the direction sampled), once the flow has carried `QUIET_AFTER` payload packets,
//! goes *quiet*: its payload packets are counted in the socket's own storage, without the flow
//! lookup, and written to the flow map every `REFRESH_EVERY` packets and at close (`sock_ops`).
//! A connect/request/close connection never goes quiet, and never pays for the storage.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::{bpf_ktime_get_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    macros::cgroup_skb,
    maps::lpm_trie::Key,
    programs::SkBuffContext,
};
use meshguard_ebpf::{
    flags, peer_key, AllowKey, Enforce, EventKind, FlowState, FlowTuple, Redirect, Stat,
    ALLOW_FIXED_BITS, DIRECTION_EGRESS, DIRECTION_INGRESS, HEAD_LEN, HELLO_MAX, MODE_ENFORCE,
    PLAIN_SAMPLE, SAMPLES_PER_DIRECTION, SAMPLE_HEADER_LEN, SAMPLE_MAX,
};

use crate::{
    flow::{add, cookie_of, emit, header, normalize_mapped, wakeup_flags},
    maps::{count, quiet_of, ALLOWED, ENFORCE, ENFORCE_UNTIL, EVENTS, FLOWS, SAMPLE_SCRATCH},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const BPF_NOEXIST: u64 = 1;

/// A quiet direction's counts are written to the flow map every this many of its packets.
const REFRESH_EVERY: u32 = 64;

/// Payload packets (both directions) a TCP flow carries before a direction may go quiet.
const QUIET_AFTER: u64 = 8;

/// What a flow must have recorded before a sampled direction goes quiet: every later packet of
/// that direction would change nothing but the counters. (A direction's first payload packet
/// is where the redirect is read, so a sampled egress has had it read.)
const EVIDENCE_TAKEN: u32 = flags::LIFECYCLE | flags::UID;

#[cgroup_skb(egress)]
pub fn flow_egress(ctx: SkBuffContext) -> i32 {
    i32::from(on_packet(&ctx, DIRECTION_EGRESS))
}

#[cgroup_skb(ingress)]
pub fn flow_ingress(ctx: SkBuffContext) -> i32 {
    i32::from(on_packet(&ctx, DIRECTION_INGRESS))
}

/// What the headers say. `peer` is the destination of an egress packet, the source of an
/// ingress one.
struct Packet {
    protocol: u8,
    /// `AF_INET` or `AF_INET6`, from the packet's own header.
    family: u16,
    /// This end's address: the source of an egress packet, the destination of an ingress one.
    own_addr: [u32; 4],
    peer_addr: [u32; 4],
    peer_port: u16,
    /// This end's port: the source of an egress packet, the destination of an ingress one.
    own_port: u16,
    /// TCP: the sequence number of the first payload byte (0 for UDP).
    seq: u32,
    payload_off: u32,
    payload_len: u32,
}

#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ipv6Header {
    version_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Source and destination ports, then (TCP) up to the data offset byte.
#[repr(C)]
struct TcpHead {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
}

#[repr(C)]
struct Ports {
    sport: u16,
    dport: u16,
}

/// Whether the packet may pass.
#[inline(always)]
fn on_packet(ctx: &SkBuffContext, direction: u8) -> bool {
    if cfg!(feature = "empty") {
        return true;
    }
    let Some(packet) = parse(ctx, direction) else {
        return true;
    };
    // Segments without payload (ACKs, handshake, FIN, TIME_WAIT) change nothing meshguard
    // reports: skipping them before the map lookup halves the work of a bulk transfer.
    if packet.protocol == IPPROTO_TCP && packet.payload_len == 0 {
        return true;
    }
    // Only a TCP flow goes quiet: a UDP packet need not look.
    if packet.protocol == IPPROTO_TCP && count_quietly(ctx, direction, packet.payload_len) {
        return true;
    }
    let socket = cookie_of(ctx.skb.skb.cast());
    let Some((key, state)) = flow_of(ctx, socket, direction, &packet) else {
        return true;
    };
    // SAFETY: a live map value; counters are updated atomically, the once-only fields race
    // benignly (the same values).
    let state = unsafe { &mut *state };

    // SAFETY: `skb` is this program's context.
    let segments = unsafe { (*ctx.skb.skb).gso_segs }.max(1) as u64;
    if direction == DIRECTION_EGRESS {
        add(
            addr_of_mut!(state.counters.bytes_sent),
            packet.payload_len as u64,
        );
        add(addr_of_mut!(state.counters.packets_sent), segments);
    } else {
        add(
            addr_of_mut!(state.counters.bytes_received),
            packet.payload_len as u64,
        );
        add(addr_of_mut!(state.counters.packets_received), segments);
    }

    if state.flags & flags::UID == 0 {
        state.uid = ctx.get_socket_uid();
        // SAFETY: `skb` is this program's context.
        state.cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
        state.flags |= flags::UID | flags::CGROUP;
    }
    if direction == DIRECTION_EGRESS && state.flags & (flags::REDIRECTED | flags::DIALLED) == 0 {
        note_nat(ctx, state, &packet);
    }
    if state.flags & flags::ENFORCE_JUDGED == 0 && state.tuple.direction == direction {
        state.flags |= if state.flags & flags::ENFORCE_AFTER_HELLO == 0 {
            refusal(ctx, state, &packet, direction)
        } else {
            after_hello(ctx, state, &packet)
        };
    }

    let d = usize::from(direction == DIRECTION_INGRESS);
    let sampled = sampled_flag(d);
    if packet.payload_len > 0 && state.flags & sampled == 0 {
        sample_packet(ctx, key, direction, state, &packet, sampled);
    }
    let c = &state.counters;
    // (Not while enforcement waits for the record after a handshake: that needs the full path.)
    let waiting = flags::MIDSTREAM | flags::ENFORCE_AFTER_HELLO;
    if state.flags & (EVIDENCE_TAKEN | waiting | sampled) == EVIDENCE_TAKEN | sampled
        && c.packets_sent + c.packets_received >= QUIET_AFTER
    {
        go_quiet(ctx, d, sampled, state);
    }
    state.flags & flags::REFUSED == 0
}

/// What enforcement makes of a flow, at the first payload packet its socket sent (a client's)
/// or received (a server's): `flags::ENFORCE_JUDGED` with `flags::REFUSED`,
/// `flags::WOULD_REFUSE` or nothing, or, for a TLS handshake record, `ENFORCE_AFTER_HELLO`.
/// The agent says which containers are enforced and what the policy expects; here only what
/// this packet shows is added: plaintext (not a TLS handshake record, not an SSH banner, as
/// the agent's fingerprint tells them), not over the loopback device, not redirected into the
/// sidecar. A first payload too short to tell is never refused here (the agent's verdict
/// still is).
#[inline(always)]
fn refusal(ctx: &SkBuffContext, state: &mut FlowState, packet: &Packet, direction: u8) -> u32 {
    const HANDSHAKE: u8 = 22;
    let Some(action) = enforced(ctx, state, packet, direction) else {
        return flags::ENFORCE_JUDGED;
    };
    let Some(b) = read::<[u8; 5]>(ctx, packet.payload_off as usize) else {
        return flags::ENFORCE_JUDGED;
    };
    if b[0] == HANDSHAKE && b[1] == 3 {
        // Judged at the next record's first byte: in this packet, or a later one.
        state.enforce_at = 5u16.saturating_add(u16::from_be_bytes([b[3], b[4]]));
        return after_hello(ctx, state, packet);
    }
    if b[..4] == *b"SSH-" {
        return flags::ENFORCE_JUDGED;
    }
    flags::ENFORCE_JUDGED | action
}

/// The action for a flow enforcement covers (`REFUSED` or `WOULD_REFUSE`), if it does and its
/// first payload packet is past the sidecar and not what the policy expects; `None` otherwise.
#[inline(always)]
fn enforced(ctx: &SkBuffContext, state: &FlowState, packet: &Packet, direction: u8) -> Option<u32> {
    if packet.protocol != IPPROTO_TCP
        || state.flags & flags::REDIRECTED != 0
        || packet.payload_len < 5
    {
        return None;
    }
    // SAFETY: a map value read once, then copied.
    let rule = (unsafe { ENFORCE.get(state.cgroup) }).copied()?;
    if direction == DIRECTION_INGRESS && rule.inbound == 0 {
        return None;
    }
    // Past the agent's word, nothing is refused.
    let vouched = ENFORCE_UNTIL.get(0).copied().unwrap_or(0);
    // SAFETY: `skb` is this program's context.
    if vouched < unsafe { bpf_ktime_get_ns() } || unsafe { (*ctx.skb.skb).ifindex } == 1 {
        return None;
    }
    let mut key = Key::new(
        ALLOW_FIXED_BITS + if packet.family == AF_INET { 32 } else { 128 },
        AllowKey {
            scope: AllowKey::scope(state.cgroup),
            direction,
            family: packet.family as u8,
            port: state.tuple.remote_port.to_be(),
            addr: packet.peer_addr,
        },
    );
    if direction == DIRECTION_INGRESS {
        key.data.port = state.tuple.local_port.to_be();
    }
    if ALLOWED.get(&key).is_some() {
        return None;
    }
    key.data.scope = [0, 0];
    if ALLOWED.get(&key).is_some() {
        return None;
    }
    Some(action(&rule))
}

/// What a container's rule does to plaintext past its sidecar.
#[inline(always)]
fn action(rule: &Enforce) -> u32 {
    if rule.mode == MODE_ENFORCE {
        flags::REFUSED
    } else {
        flags::WOULD_REFUSE
    }
}

/// A flow that began with a TLS handshake record, at a packet of that direction: judged once
/// the packet holding the next record's first byte comes (a TLS record type, or plaintext
/// after a handshake, which is refused as plaintext). Before it, nothing changes; past it (a
/// gap in what was seen), the flow is left to the agent's verdict.
#[inline(always)]
fn after_hello(ctx: &SkBuffContext, state: &FlowState, packet: &Packet) -> u32 {
    const CHANGE_CIPHER_SPEC: u8 = 20;
    const APPLICATION_DATA: u8 = 23;
    let d = usize::from(state.tuple.direction == DIRECTION_INGRESS);
    // The first packet's offset is 0 (its sequence number is not kept yet).
    let offset = if state.flags & flags::ENFORCE_AFTER_HELLO == 0 {
        0
    } else {
        packet.seq.wrapping_sub(state.sample_seq[d])
    };
    let at = u32::from(state.enforce_at);
    if at < offset {
        return flags::ENFORCE_JUDGED;
    }
    let into = at - offset;
    if into >= packet.payload_len {
        return flags::ENFORCE_AFTER_HELLO;
    }
    // Through the helper: a variable offset into the packet, which direct access cannot bound.
    let Ok(kind) = ctx.load::<u8>((packet.payload_off + (into & 0xffff)) as usize) else {
        return flags::ENFORCE_JUDGED;
    };
    if (CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&kind) {
        return flags::ENFORCE_JUDGED;
    }
    // SAFETY: as in `enforced`: the same socket's rule, again.
    flags::ENFORCE_JUDGED | unsafe { ENFORCE.get(state.cgroup) }.map_or(0, action)
}

/// What netfilter's NAT did at this end, from an egress packet's addresses: sent elsewhere than
/// the socket's peer (a redirect into a sidecar), or, for an accepted connection, sent from
/// another address than the socket's own: replies leave, after NAT, from the address the
/// client dialled (a sidecar's capture redirected the connection to this socket).
#[inline(always)]
fn note_nat(ctx: &SkBuffContext, state: &mut FlowState, packet: &Packet) {
    let t = &state.tuple;
    let (addr, port, flag) =
        if packet.peer_port != t.remote_port || packet.peer_addr != t.remote_addr {
            (packet.peer_addr, packet.peer_port, flags::REDIRECTED)
        } else if t.direction == DIRECTION_INGRESS
            && (packet.own_port != t.local_port || packet.own_addr != t.local_addr)
        {
            (packet.own_addr, packet.own_port, flags::DIALLED)
        } else {
            return;
        };
    state.redirect = Redirect {
        addr,
        port,
        _pad: 0,
        // SAFETY: `skb` is this program's context.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    state.flags |= flag;
}

/// The packet's socket; null for none. The storage helper returns nothing for a socket that is
/// not a full one (a request or TIME_WAIT socket).
#[inline(always)]
fn socket_of(ctx: &SkBuffContext) -> *mut bpf_sock {
    // SAFETY: `skb` is this program's context.
    unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }
}

/// Counts a payload packet in its socket's storage, if its direction is quiet; false when it is
/// not (the packet takes the full path).
#[inline(always)]
fn count_quietly(ctx: &SkBuffContext, direction: u8, bytes: u32) -> bool {
    let quiet = quiet_of(socket_of(ctx), false);
    if quiet.is_null() {
        return false;
    }
    // SAFETY: this socket's storage, live for this run.
    let quiet = unsafe { &mut *quiet };
    let d = usize::from(direction == DIRECTION_INGRESS);
    if quiet.taken & sampled_flag(d) == 0 {
        return false;
    }
    // SAFETY: `skb` is this program's context.
    let segments = unsafe { (*ctx.skb.skb).gso_segs }.max(1) as u64;
    // Atomic: packets of one direction are nearly always serialized by the socket, not
    // always.
    add(addr_of_mut!(quiet.bytes[d]), u64::from(bytes));
    add(addr_of_mut!(quiet.packets[d]), segments);
    quiet.runs[d] = quiet.runs[d].wrapping_add(1);
    if quiet.runs[d] % REFRESH_EVERY == 0 {
        if let Some(state) = FLOWS.get_ptr_mut(cookie_of(ctx.skb.skb.cast())) {
            // SAFETY: a live map value; plain stores of counts that only grow.
            quiet.write_counts(d, unsafe { &mut (*state).counters });
        }
    }
    true
}

/// Makes direction `d` of the packet's socket quiet: from here on its counts start from the
/// flow map's.
#[inline(always)]
fn go_quiet(ctx: &SkBuffContext, d: usize, sampled: u32, state: &FlowState) {
    let quiet = quiet_of(socket_of(ctx), true);
    if quiet.is_null() {
        return;
    }
    // SAFETY: this socket's storage, live for this run.
    let quiet = unsafe { &mut *quiet };
    let c = &state.counters;
    (quiet.base_bytes[d], quiet.base_packets[d]) = if d == 0 {
        (c.bytes_sent, c.packets_sent)
    } else {
        (c.bytes_received, c.packets_received)
    };
    quiet.bytes[d] = 0;
    quiet.packets[d] = 0;
    quiet.taken |= sampled;
}

/// The flag of direction `d` (0 egress, 1 ingress) sampled.
#[inline(always)]
fn sampled_flag(d: usize) -> u32 {
    if d == 0 {
        flags::SAMPLED_EGRESS
    } else {
        flags::SAMPLED_INGRESS
    }
}

/// The flow a packet belongs to, with its map key: the socket's own, or for an unconnected UDP
/// socket exchanging with another peer than its first, that peer's flow. Each datagram peer is
/// judged on its own, so one datagram to DNS cannot cover plaintext sent to anyone else.
#[inline(always)]
fn flow_of(
    ctx: &SkBuffContext,
    socket: u64,
    direction: u8,
    packet: &Packet,
) -> Option<(u64, *mut FlowState)> {
    let state = match FLOWS.get_ptr_mut(socket) {
        Some(state) => state,
        // TCP flows start in sock_ops; one without an entry that carries data predates the
        // agent (or was evicted).
        None => adopt(ctx, socket, socket, direction, packet)?,
    };
    if packet.protocol != IPPROTO_UDP || ctx.skb.remote_port() != 0 {
        return Some((socket, state));
    }
    // SAFETY: a live map value, read only.
    let first = unsafe { &(*state).tuple };
    if first.remote_port == packet.peer_port && first.remote_addr == packet.peer_addr {
        return Some((socket, state));
    }
    let key = peer_key(socket, &packet.peer_addr, packet.peer_port);
    let state = match FLOWS.get_ptr_mut(key) {
        Some(state) => state,
        None => adopt(ctx, key, socket, direction, packet)?,
    };
    Some((key, state))
}

/// Samples one payload packet of a direction: the first decides how much of the stream to
/// sample (a TLS handshake record whole, and the next record's header; else this packet);
/// later ones add what is still wanted, at their offset in the stream.
#[inline(always)]
fn sample_packet(
    ctx: &SkBuffContext,
    key: u64,
    direction: u8,
    state: &mut FlowState,
    packet: &Packet,
    sampled: u32,
) {
    let d = usize::from(direction == DIRECTION_INGRESS);
    let offset = if state.sample_want[d] == 0 {
        // SAFETY: `skb` is this program's context.
        state.ifindex[d] = unsafe { (*ctx.skb.skb).ifindex };
        state.sample_seq[d] = packet.seq;
        state.sample_want[d] = if packet.protocol == IPPROTO_TCP {
            stream_want(ctx, packet)
        } else {
            first_packet(packet)
        };
        keep_head(ctx, d, state, packet);
        0
    } else {
        packet.seq.wrapping_sub(state.sample_seq[d])
    };
    let want = u32::from(state.sample_want[d]);
    if offset >= want {
        // Past what is wanted (or a retransmission from before the first sample).
        state.flags |= sampled;
        return;
    }
    let take = (want - offset).min(packet.payload_len);
    if sample(ctx, key, direction, state, packet, offset, take) {
        state.samples[d] += 1;
    }
    if offset + take >= want || state.samples[d] >= SAMPLES_PER_DIRECTION {
        state.flags |= sampled;
    }
}

/// What is sampled of a direction that does not start a TLS handshake (and of each UDP flow):
/// its first packet, up to `PLAIN_SAMPLE` bytes.
#[inline(always)]
fn first_packet(packet: &Packet) -> u16 {
    packet.payload_len.min(PLAIN_SAMPLE as u32) as u16
}

/// How many stream bytes of a TCP direction to sample, from its first payload bytes: a TLS
/// handshake record whole and the next record's header (what shows a fake handshake followed
/// by plaintext), all of `HELLO_MAX` when the handshake message says it spans records; else the
/// first packet.
#[inline(always)]
fn stream_want(ctx: &SkBuffContext, packet: &Packet) -> u16 {
    const HANDSHAKE: u8 = 22;
    if packet.payload_len < 9 {
        return first_packet(packet);
    }
    let Some(b) = read::<[u8; 9]>(ctx, packet.payload_off as usize) else {
        return first_packet(packet);
    };
    if b[0] != HANDSHAKE || b[1] != 3 {
        return first_packet(packet);
    }
    let record = u32::from(u16::from_be_bytes([b[3], b[4]]));
    let message = u32::from(b[6]) << 16 | u32::from(b[7]) << 8 | u32::from(b[8]);
    let want = if (b[5] == 1 || b[5] == 2) && message + 4 > record {
        HELLO_MAX as u32
    } else {
        5 + record + 5
    };
    want.min(HELLO_MAX as u32) as u16
}

/// Keeps the first payload bytes of a direction in the flow map itself (once, at its first
/// payload packet), so that the flow can still be fingerprinted if its `Sample` event is lost.
#[inline(always)]
fn keep_head(ctx: &SkBuffContext, d: usize, state: &mut FlowState, packet: &Packet) {
    let (head, head_len) = if d == 0 {
        (&mut state.head[0], &mut state.head_len[0])
    } else {
        (&mut state.head[1], &mut state.head_len[1])
    };
    let len = if packet.payload_len > HEAD_LEN as u32 {
        HEAD_LEN as u32
    } else {
        packet.payload_len
    };
    // In 1..=HEAD_LEN, in a form the verifier can bound (as in `sample`).
    let len = (len.wrapping_sub(1) & (HEAD_LEN as u32 - 1)) + 1;
    // SAFETY: `head` is HEAD_LEN bytes of a live map value; `len` is at most HEAD_LEN.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            packet.payload_off,
            head.as_mut_ptr().cast(),
            len,
        )
    };
    if loaded == 0 {
        *head_len = len as u8;
    }
}

/// Reads a header: straight from the packet when it is in the linear area (the usual case, and
/// much cheaper than a helper call), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    // SAFETY: `skb` is this program's context; the pointer is bounds-checked against
    // `data_end` before the read, as the verifier requires.
    unsafe {
        let skb = ctx.skb.skb;
        let start = (*skb).data as usize;
        let end = (*skb).data_end as usize;
        let at = start + offset;
        if at + size_of::<T>() <= end {
            return Some((at as *const T).read_unaligned());
        }
    }
    ctx.load::<T>(offset).ok()
}

#[inline(always)]
fn parse(ctx: &SkBuffContext, direction: u8) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let family = if ethertype == ETH_P_IP {
        AF_INET
    } else {
        AF_INET6
    };
    let (protocol, l4_off, own_addr, peer_addr) = if ethertype == ETH_P_IP {
        let Some(ip) = read::<Ipv4Header>(ctx, 0) else {
            count(Stat::PacketUnreadable);
            return None;
        };
        let (own, peer) = if direction == DIRECTION_EGRESS {
            (ip.saddr, ip.daddr)
        } else {
            (ip.daddr, ip.saddr)
        };
        (
            ip.protocol,
            ((ip.version_ihl & 0x0f) as u32) * 4,
            [own, 0, 0, 0],
            [peer, 0, 0, 0],
        )
    } else if ethertype == ETH_P_IPV6 {
        let Some(ip) = read::<Ipv6Header>(ctx, 0) else {
            count(Stat::PacketUnreadable);
            return None;
        };
        let (own, peer) = if direction == DIRECTION_EGRESS {
            (ip.saddr, ip.daddr)
        } else {
            (ip.daddr, ip.saddr)
        };
        // Extension headers are rare between pods; such packets are not followed.
        (ip.next_header, 40, own, peer)
    } else {
        return None;
    };

    let (ports, seq, payload_off) = match protocol {
        IPPROTO_TCP => {
            let Some(tcp) = read::<TcpHead>(ctx, l4_off as usize) else {
                count(Stat::PacketUnreadable);
                return None;
            };
            (
                Ports {
                    sport: tcp.sport,
                    dport: tcp.dport,
                },
                u32::from_be(tcp.seq),
                l4_off + ((tcp.doff >> 4) as u32) * 4,
            )
        }
        IPPROTO_UDP => {
            let Some(ports) = read::<Ports>(ctx, l4_off as usize) else {
                count(Stat::PacketUnreadable);
                return None;
            };
            (ports, 0, l4_off + 8)
        }
        _ => return None,
    };
    let (own_port, peer_port) = if direction == DIRECTION_EGRESS {
        (ports.sport, ports.dport)
    } else {
        (ports.dport, ports.sport)
    };
    Some(Packet {
        protocol,
        family,
        own_addr,
        peer_addr,
        peer_port: u16::from_be(peer_port),
        own_port: u16::from_be(own_port),
        seq,
        payload_off,
        payload_len: ctx.len().saturating_sub(payload_off),
    })
}

/// Starts following a flow that `sock_ops` did not announce: UDP (a socket's first peer under
/// the socket's cookie, its other peers under their `peer_key`), or TCP already running.
/// Builds the tuple inside the one flow state on the stack: the packet path's frame is near the
/// 512 bytes BPF allows.
#[inline(always)]
fn adopt(
    ctx: &SkBuffContext,
    key: u64,
    socket: u64,
    direction: u8,
    packet: &Packet,
) -> Option<*mut FlowState> {
    let skb = ctx.skb.skb;
    let family = ctx.skb.family() as u16;
    let mut state = FlowState {
        tuple: FlowTuple {
            local_port: ctx.skb.local_port() as u16,
            remote_port: u32::from_be(ctx.skb.remote_port()) as u16,
            family,
            protocol: packet.protocol,
            direction,
            ..FlowTuple::default()
        },
        socket,
        // SAFETY: no preconditions.
        opened_ns: unsafe { bpf_ktime_get_ns() },
        ..FlowState::default()
    };
    let tuple = &mut state.tuple;
    if family == AF_INET6 {
        read_ip6(skb, tuple);
    } else if family == AF_INET {
        tuple.local_addr[0] = ctx.skb.local_ipv4();
        tuple.remote_addr[0] = ctx.skb.remote_ipv4();
    }
    normalize_mapped(tuple);
    if packet.protocol == IPPROTO_TCP {
        // Which end opened it is unknown; the end with the higher (ephemeral) port most likely.
        tuple.direction = if tuple.local_port > tuple.remote_port {
            DIRECTION_EGRESS
        } else {
            DIRECTION_INGRESS
        };
        state.flags = flags::MIDSTREAM;
        count(Stat::FlowMidstream);
    } else if tuple.remote_port == 0 {
        // An unconnected UDP socket: this flow's peer is this packet's, and so (the socket
        // being bound to any address) is its own address.
        tuple.remote_addr = packet.peer_addr;
        tuple.remote_port = packet.peer_port;
        tuple.local_addr = packet.own_addr;
        tuple.family = packet.family;
    }
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "a copy of the state would not fit the stack beside the packet path's frame"
    )]
    let inserted = FLOWS.insert(key, &state, BPF_NOEXIST).is_ok();
    if inserted {
        emit(EventKind::Open, key, &state);
    }
    // Inserted, or another CPU was first (fine); none: the map refused the entry.
    let found = FLOWS.get_ptr_mut(key);
    if found.is_none() {
        count(Stat::FlowMapFull);
    }
    found
}

#[inline(always)]
fn read_ip6(skb: *mut __sk_buff, tuple: &mut FlowTuple) {
    // SAFETY: `skb` is the program's context; each read is one aligned u32 context field.
    unsafe {
        tuple.local_addr[0] = read_volatile(addr_of!((*skb).local_ip6[0]));
        tuple.local_addr[1] = read_volatile(addr_of!((*skb).local_ip6[1]));
        tuple.local_addr[2] = read_volatile(addr_of!((*skb).local_ip6[2]));
        tuple.local_addr[3] = read_volatile(addr_of!((*skb).local_ip6[3]));
        tuple.remote_addr[0] = read_volatile(addr_of!((*skb).remote_ip6[0]));
        tuple.remote_addr[1] = read_volatile(addr_of!((*skb).remote_ip6[1]));
        tuple.remote_addr[2] = read_volatile(addr_of!((*skb).remote_ip6[2]));
        tuple.remote_addr[3] = read_volatile(addr_of!((*skb).remote_ip6[3]));
    }
}

/// Copies `take` payload bytes, from `offset` in the direction's stream, into a `Sample` event:
/// built in a per-CPU scratch buffer and written with only the bytes it carries.
#[inline(always)]
fn sample(
    ctx: &SkBuffContext,
    key: u64,
    direction: u8,
    state: &FlowState,
    packet: &Packet,
    offset: u32,
    take: u32,
) -> bool {
    let Some(event) = SAMPLE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // The caller takes at least one byte; this form (an identity on 1..=SAMPLE_MAX) lets the
    // verifier see both bounds after the compiler's 32-bit truncations.
    let len = (take.wrapping_sub(1) & (SAMPLE_MAX as u32 - 1)) + 1;
    // SAFETY: `event` is this CPU's scratch value, of size_of::<SampleEvent>(); `len` is in
    // 1..=SAMPLE_MAX; the written size is within it.
    unsafe {
        addr_of_mut!((*event).header).write(header(EventKind::Sample, key));
        addr_of_mut!((*event).flow).write(*state);
        addr_of_mut!((*event).direction).write(direction as u32);
        addr_of_mut!((*event).len).write(len);
        addr_of_mut!((*event).offset).write(offset);
        if bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            packet.payload_off,
            addr_of_mut!((*event).data).cast(),
            len,
        ) != 0
        {
            count(Stat::PacketUnreadable);
            return false;
        }
        let size = SAMPLE_HEADER_LEN + len as usize;
        let bytes = core::slice::from_raw_parts(event.cast::<u8>(), size);
        if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
            count(Stat::RingbufFull);
            return false;
        }
    }
    true
}
