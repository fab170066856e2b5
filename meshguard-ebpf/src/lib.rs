//! The contract between meshguard's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same bytes are
//! written by the BPF programs and read by userspace. Any change to a type below must bump
//! [`LAYOUT_VERSION`]: every event carries it, and the agent refuses events of another layout
//! instead of misreading them.
#![no_std]

/// Version of the event and map layouts below.
pub const LAYOUT_VERSION: u16 = 5;

/// Most stream bytes sampled per TCP direction: a TLS handshake's whole first record and the
/// header of the record after it. Real ClientHellos reach 1.3-2.3 KB (post-quantum key shares,
/// resumption tickets before ALPN), sometimes over several segments. The agent's
/// `fingerprint::sample_want` computes the same amount from the same first bytes.
pub const HELLO_MAX: usize = 4096;

/// Bytes sampled from the first packet of a direction that does not start a TLS handshake:
/// enough for an HTTP request line and its headers.
pub const PLAIN_SAMPLE: usize = 1024;

/// Most payload bytes one `Sample` event carries.
pub const SAMPLE_MAX: usize = HELLO_MAX;

/// Most `Sample` events per flow direction: a handshake record spread over more packets than
/// this is reported as cut, never parsed as if whole.
pub const SAMPLES_PER_DIRECTION: u8 = 4;

/// Payload bytes kept in the flow map per direction ([`FlowState::head`]): enough to tell TLS
/// from plaintext, and an HTTP method and path, when the `Sample` event was lost.
pub const HEAD_LEN: usize = 32;

/// Length of a task's `comm`, as the kernel stores it.
pub const COMM_LEN: usize = 16;

/// Names the agent uses to find maps and programs in the object; never written twice.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const REPORTED: &str = "REPORTED";
    pub const ENFORCE: &str = "ENFORCE";
    pub const ALLOWED: &str = "ALLOWED";
    pub const ENFORCE_UNTIL: &str = "ENFORCE_UNTIL";

    pub const SOCK_OPS: &str = "flow_lifecycle";
    pub const SKB_EGRESS: &str = "flow_egress";
    pub const SKB_INGRESS: &str = "flow_ingress";
    pub const SOCK_RELEASE: &str = "flow_release";
    pub const SEND_BTF: &str = "flow_sender";
    pub const SEND_CLASSIC: &str = "flow_sender_tracepoint";
    /// The tracepoint (`sock:sock_send_length`) both sender programs attach to.
    pub const SEND_TRACEPOINT_CATEGORY: &str = "sock";
    pub const SEND_TRACEPOINT: &str = "sock_send_length";
    /// Global set by the agent for the classic tracepoint: where the cookie is in `struct sock`.
    pub const SK_COOKIE_OFFSET: &str = "SK_COOKIE_OFFSET";
}

/// What a ring-buffer event reports. One event per flow or state change, never per packet.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A flow was established (TCP) or first seen (UDP, or TCP that predates the agent).
    Open = 1,
    /// The first payload bytes of one direction of a flow.
    Sample = 2,
    /// The process that first sent on the flow's socket.
    Process = 3,
    /// The socket closed; the counters are final.
    Close = 4,
}

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Open),
            2 => Some(Self::Sample),
            3 => Some(Self::Process),
            4 => Some(Self::Close),
            _ => None,
        }
    }
}

/// Which way a flow was opened, from its socket's point of view.
pub const DIRECTION_EGRESS: u8 = 1;
pub const DIRECTION_INGRESS: u8 = 2;

/// `FlowState::flags` bits.
pub mod flags {
    /// `sock_ops` tracks this socket's state, so its close comes from `STATE_CB`.
    pub const LIFECYCLE: u32 = 1 << 0;
    /// First seen by `cgroup_skb` with payload: the connection predates the agent, or its entry
    /// was evicted from the flow map.
    pub const MIDSTREAM: u32 = 1 << 1;
    pub const SAMPLED_EGRESS: u32 = 1 << 2;
    pub const SAMPLED_INGRESS: u32 = 1 << 3;
    pub const PROCESS: u32 = 1 << 4;
    /// An egress packet left for another address or port than the socket's own peer: netfilter
    /// redirected it (into a sidecar, for a meshed pod).
    pub const REDIRECTED: u32 = 1 << 5;
    pub const UID: u32 = 1 << 6;
    /// A `Close` for a TCP socket whose entry was gone from the flow map (evicted): only its
    /// tuple is known.
    pub const EVICTED: u32 = 1 << 7;
    /// `FlowState::cgroup` holds the socket owner's cgroup.
    pub const CGROUP: u32 = 1 << 8;
    /// An accepted connection that netfilter redirected to this socket (a sidecar's capture):
    /// `FlowState::redirect` holds the address its client dialled, which the socket's replies
    /// leave from after NAT.
    pub const DIALLED: u32 = 1 << 9;
    /// Enforcement judged the flow, at the first payload packet its socket sent (a client's) or
    /// received (a server's).
    pub const ENFORCE_JUDGED: u32 = 1 << 10;
    /// In `audit`: plaintext past the sidecar that `enforce` would have refused.
    pub const WOULD_REFUSE: u32 = 1 << 11;
    /// In `enforce`: refused; every payload packet of the flow is dropped, from the first.
    pub const REFUSED: u32 = 1 << 12;
    /// Enforcement waits for the record after the flow's first TLS handshake record (at
    /// `FlowState::enforce_at`): a genuine ClientHello followed by plaintext is plaintext.
    pub const ENFORCE_AFTER_HELLO: u32 = 1 << 13;
}

/// `Enforce::mode`: judge and record, refuse nothing.
pub const MODE_AUDIT: u8 = 1;
/// `Enforce::mode`: refuse.
pub const MODE_ENFORCE: u8 = 2;

/// The `ENFORCE` map's value, by the cgroup id of an application container of a meshed pod
/// (never its proxy's): a TCP socket it owns whose first payload is plaintext (not a TLS
/// handshake record, not an SSH banner), that is neither over the loopback device nor
/// redirected (so past the sidecar), and that no `ALLOWED` entry covers, is refused; a
/// client's always, a server's only with `inbound`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforce {
    /// [`MODE_AUDIT`] or [`MODE_ENFORCE`].
    pub mode: u8,
    /// 1: inbound plaintext too (the workload is STRICT: its sidecar would refuse it).
    pub inbound: u8,
    pub _pad: [u8; 6],
}

/// The data of an `ALLOWED` key (longest prefix match): plaintext the verdict policy expects
/// (DNS, probes, its own rules), never refused. Scope, direction, family and port match whole
/// ([`ALLOW_FIXED_BITS`]); the peer's address to the entry's prefix length beyond them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    /// The cgroup id the entry is for, in native byte order ([`AllowKey::scope`]); 0: every
    /// enforced cgroup. Two words, not a `u64`: the key's data must start right after the
    /// trie's 4-byte prefix length, with no padding.
    pub scope: [u32; 2],
    /// [`DIRECTION_EGRESS`] (to the peer) or [`DIRECTION_INGRESS`] (from it).
    pub direction: u8,
    /// `AF_INET` or `AF_INET6`, as a byte.
    pub family: u8,
    /// The server's port (the peer's for egress, this end's for ingress), network byte order.
    pub port: u16,
    /// The peer's address, as [`FlowTuple`] keeps addresses.
    pub addr: [u32; 4],
}

impl AllowKey {
    /// The `scope` words of a cgroup id.
    #[inline(always)]
    pub const fn scope(cgroup: u64) -> [u32; 2] {
        [cgroup as u32, (cgroup >> 32) as u32]
    }
}

/// Bits of an [`AllowKey`] before its address.
pub const ALLOW_FIXED_BITS: u32 = 96;

/// Indices of the per-CPU `STATS` array. Every loss the kernel side can see is counted here.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// An event could not be reserved: the ring buffer was full.
    RingbufFull = 0,
    /// A new flow could not be inserted into the flow map.
    FlowMapFull = 1,
    /// A TCP socket closed whose flow was no longer in the map (evicted).
    FlowEvicted = 2,
    /// A TCP flow first seen mid-stream (predates the agent, or was evicted and came back).
    FlowMidstream = 3,
    /// A packet whose headers could not be read.
    PacketUnreadable = 4,
}

impl Stat {
    pub const COUNT: u32 = 5;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Self::RingbufFull,
        Self::FlowMapFull,
        Self::FlowEvicted,
        Self::FlowMidstream,
        Self::PacketUnreadable,
    ];
}

/// A socket's own addresses. Addresses are kept as the kernel stores them (network byte order
/// words; an IPv4 address in word 0); ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTuple {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub protocol: u8,
    /// [`DIRECTION_EGRESS`] or [`DIRECTION_INGRESS`].
    pub direction: u8,
}

/// Payload bytes each way, and the packets that carried them (segments as the socket layer sees
/// them; pure ACKs and other empty segments are not counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
}

/// Where an egress packet really went when it was not to the socket's peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub ifindex: u32,
}

/// The flow map's value, keyed by socket cookie; an unconnected UDP socket's datagrams to or from
/// another peer than its first are flows of their own, keyed by [`peer_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub tuple: FlowTuple,
    /// The socket's cookie: the map key, except for an unconnected UDP socket's other peers.
    pub socket: u64,
    /// cgroup v2 id (the directory's inode number) of the socket's owner: the container that
    /// created it, which the application cannot choose (valid once `flags::CGROUP` is set).
    pub cgroup: u64,
    /// Device of the first payload packet each way (egress, ingress; 0: none yet). The loopback
    /// device (1 in every network namespace) never leaves the namespace: in-pod evidence,
    /// whatever the addresses.
    pub ifindex: [u32; 2],
    /// TCP sequence number of the first sampled payload byte each way: sample offsets count
    /// from it, so retransmissions and reordering land where they belong.
    pub sample_seq: [u32; 2],
    /// Stream bytes to sample each way, decided at the first payload packet (0: not started).
    pub sample_want: [u16; 2],
    /// `Sample` events written each way.
    pub samples: [u8; 2],
    /// With `flags::ENFORCE_AFTER_HELLO`: where, in the stream the socket sends (or receives,
    /// for a server), the record after its first TLS handshake record starts.
    pub enforce_at: u16,
    pub flags: u32,
    /// The socket owner's uid (valid once `flags::UID` is set).
    pub uid: u32,
    pub counters: FlowCounters,
    /// Network namespace cookie (0 where the program type cannot read it).
    pub netns: u64,
    /// `bpf_ktime_get_ns` when the flow was opened.
    pub opened_ns: u64,
    /// Where netfilter's NAT moved this end: with `flags::REDIRECTED`, where egress went
    /// instead of the peer; with `flags::DIALLED`, the address the client dialled.
    pub redirect: Redirect,
    /// Thread group id of the first sender (valid once `flags::PROCESS` is set).
    pub pid: u32,
    /// Valid bytes of `head`: egress, ingress.
    pub head_len: [u8; 2],
    pub _pad: u16,
    pub comm: [u8; COMM_LEN],
    /// When the socket closed, if its `Close` event could not be published (0 otherwise). Such
    /// an entry stays in the map until the agent reconciles it: the map is the source of truth,
    /// the ring buffer only the fast path.
    pub closed_ns: u64,
    /// The first payload bytes of each direction (egress, ingress): what the agent fingerprints
    /// when the `Sample` event was lost.
    pub head: [[u8; HEAD_LEN]; 2],
}

/// The agent's own map (`names::REPORTED`), by flow key: the verdict it published for an open
/// flow, judged on the flow's whole evidence. No program reads or writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// The agent's verdict, as its own small number (0: none).
    pub verdict: u8,
    /// Valid bytes of `reason`.
    pub reason_len: u8,
    pub _pad: [u8; 6],
    pub reason: [u8; 24],
}

/// First bytes of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u16,
    /// [`LAYOUT_VERSION`] of the program that wrote the event.
    pub version: u16,
    pub _pad: u32,
    pub cookie: u64,
    pub ktime_ns: u64,
}

/// `Open`, `Process` and `Close` events: a snapshot of the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    pub flow: FlowState,
}

/// `Sample` events: the flow's state and payload bytes of one direction, from `offset` in its
/// stream. Written with only its first `len` data bytes: the ring buffer carries what was
/// sampled, not the largest sample there could be.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleEvent {
    pub header: EventHeader,
    pub flow: FlowState,
    /// [`DIRECTION_EGRESS`] or [`DIRECTION_INGRESS`]: which way these bytes travelled.
    pub direction: u32,
    /// How many bytes of `data` are valid.
    pub len: u32,
    /// Where `data` starts in the direction's stream (0: its first payload byte).
    pub offset: u32,
    pub _pad: u32,
    pub data: [u8; SAMPLE_MAX],
}

/// Bytes of a `Sample` event before its data.
pub const SAMPLE_HEADER_LEN: usize = core::mem::offset_of!(SampleEvent, data);

/// The flow map key of an unconnected UDP socket's exchange with one peer (other than its
/// first, which is keyed by the cookie itself). The top bit keeps it apart from socket
/// cookies, which count up from 1.
#[inline(always)]
pub fn peer_key(socket: u64, addr: &[u32; 4], port: u16) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = socket ^ 0xcbf2_9ce4_8422_2325;
    h = (h ^ u64::from(addr[0])).wrapping_mul(PRIME);
    h = (h ^ u64::from(addr[1])).wrapping_mul(PRIME);
    h = (h ^ u64::from(addr[2])).wrapping_mul(PRIME);
    h = (h ^ u64::from(addr[3])).wrapping_mul(PRIME);
    h = (h ^ u64::from(port)).wrapping_mul(PRIME);
    h | 1 << 63
}

// The layout is the contract: padding-free, and the sizes the agent's decoder expects.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<FlowTuple>() == 40);
    assert!(size_of::<FlowCounters>() == 32);
    assert!(size_of::<Redirect>() == 24);
    assert!(offset_of!(FlowState, socket) == 40);
    assert!(offset_of!(FlowState, ifindex) == 56);
    assert!(offset_of!(FlowState, sample_want) == 72);
    assert!(offset_of!(FlowState, counters) == 88);
    assert!(offset_of!(FlowState, comm) == 168);
    assert!(offset_of!(FlowState, head) == 192);
    assert!(size_of::<FlowState>() == 256);
    assert!(size_of::<EventHeader>() == 24);
    assert!(size_of::<FlowEvent>() == 280);
    assert!(SAMPLE_HEADER_LEN == 296);
    assert!(size_of::<SampleEvent>() == SAMPLE_HEADER_LEN + SAMPLE_MAX);
    // The kernel bounds lengths by masking: the sizes must be powers of two.
    assert!(size_of::<Reported>() == 32);
    assert!(size_of::<Enforce>() == 8);
    assert!(size_of::<AllowKey>() * 8 == ALLOW_FIXED_BITS as usize + 128);
    assert!(SAMPLE_MAX.is_power_of_two() && HELLO_MAX <= u16::MAX as usize);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), Copy, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Reported {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Enforce {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AllowKey {}
}
