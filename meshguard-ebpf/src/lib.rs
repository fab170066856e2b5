//! The contract between meshguard's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same bytes are
//! written by the BPF programs and read by userspace. Any change to a type below must bump
//! [`LAYOUT_VERSION`]: every event carries it, and the agent refuses events of another layout
//! instead of misreading them.
#![no_std]

/// Version of the event and map layouts below.
pub const LAYOUT_VERSION: u16 = 2;

/// Payload bytes copied once per flow direction: enough for a TLS ClientHello with SNI and ALPN,
/// even one carrying a post-quantum key share before its ALPN extension.
pub const SAMPLE_LEN: usize = 1024;

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
}

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

/// The flow map's value, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub tuple: FlowTuple,
    pub flags: u32,
    /// The socket owner's uid (valid once `flags::UID` is set).
    pub uid: u32,
    pub counters: FlowCounters,
    /// Network namespace cookie (0 where the program type cannot read it).
    pub netns: u64,
    /// `bpf_ktime_get_ns` when the flow was opened.
    pub opened_ns: u64,
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

/// `Sample` events: the flow's state and the first payload bytes of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleEvent {
    pub header: EventHeader,
    pub flow: FlowState,
    /// [`DIRECTION_EGRESS`] or [`DIRECTION_INGRESS`]: which way these bytes travelled.
    pub direction: u32,
    /// How many bytes of `data` are valid.
    pub len: u32,
    pub data: [u8; SAMPLE_LEN],
}

// The layout is the contract: padding-free, and the sizes the agent's decoder expects.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<FlowTuple>() == 40);
    assert!(size_of::<FlowCounters>() == 32);
    assert!(size_of::<Redirect>() == 24);
    assert!(offset_of!(FlowState, counters) == 48);
    assert!(offset_of!(FlowState, comm) == 128);
    assert!(offset_of!(FlowState, head) == 152);
    assert!(size_of::<FlowState>() == 216);
    assert!(size_of::<EventHeader>() == 24);
    assert!(size_of::<FlowEvent>() == 240);
    assert!(offset_of!(SampleEvent, data) == 248);
    assert!(size_of::<SampleEvent>() == 248 + SAMPLE_LEN);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), Copy, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::FlowState {}
}
