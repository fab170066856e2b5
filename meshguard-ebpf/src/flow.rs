//! Helpers every program uses to read and publish flow state.

use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::addr_of_mut,
};

use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns};
use meshguard_ebpf::{EventHeader, EventKind, FlowEvent, FlowState, Stat, LAYOUT_VERSION};

use crate::maps::{count, EVENTS};

/// Adds to a counter shared between CPUs. `AtomicU64::fetch_add` does not lower on the BPF
/// target; this intrinsic emits `lock xadd`.
#[inline(always)]
pub fn add(dst: *mut u64, v: u64) {
    // SAFETY: `dst` points into a map value that lives as long as the program runs.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v) };
}

/// The socket cookie of any context `bpf_get_socket_cookie` accepts.
#[inline(always)]
pub fn cookie_of(ctx: *mut c_void) -> u64 {
    // SAFETY: the caller passes a context or socket pointer the helper accepts.
    unsafe { bpf_get_socket_cookie(ctx) }
}

#[inline(always)]
pub fn header(kind: EventKind, cookie: u64) -> EventHeader {
    EventHeader {
        kind: kind as u16,
        version: LAYOUT_VERSION,
        _pad: 0,
        cookie,
        // SAFETY: no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Don't wake the agent for every event: it drains the ring buffer on a short timer anyway.
/// Wake it only once a backlog builds up, so that a burst is read before the buffer fills.
const WAKEUP_BACKLOG: u64 = 256 * 1024;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BACKLOG {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Publishes a snapshot of a flow; a full ring buffer is counted, never silent, and reported to
/// the caller, which keeps what the agent must still see in the flow map. Written field by
/// field into the reservation: a whole `FlowEvent` on the stack would not fit beside the
/// callers' frames (BPF has 512 bytes of stack in all).
#[inline(always)]
pub fn emit(kind: EventKind, cookie: u64, flow: &FlowState) -> bool {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            // SAFETY: `event` is a reservation of size_of::<FlowEvent>().
            unsafe {
                addr_of_mut!((*event).header).write(header(kind, cookie));
                addr_of_mut!((*event).flow).write(*flow);
            }
            entry.submit(wakeup_flags());
            true
        }
        None => {
            count(Stat::RingbufFull);
            false
        }
    }
}

/// Ends a flow: publishes its final state and forgets it, or, when the ring buffer is full,
/// marks it closed and leaves it for the agent's reconciliation.
#[inline(always)]
pub fn close(cookie: u64, state: &mut FlowState) {
    if emit(EventKind::Close, cookie, state) {
        let _ = crate::maps::FLOWS.remove(cookie);
    } else {
        // SAFETY: no preconditions.
        state.closed_ns = unsafe { bpf_ktime_get_ns() };
    }
}

/// Stores an IPv4-mapped IPv6 address (a dual-stack socket talking IPv4) as the IPv4 address it
/// is, so that it compares equal to the IPv4 packets the socket sends.
#[inline(always)]
pub fn normalize_mapped(tuple: &mut meshguard_ebpf::FlowTuple) {
    const AF_INET: u16 = 2;
    const MAPPED: u32 = u32::from_be(0x0000_ffff);
    let l = tuple.local_addr;
    if tuple.family == 10 && l[0] == 0 && l[1] == 0 && l[2] == MAPPED {
        tuple.local_addr = [l[3], 0, 0, 0];
        let r = tuple.remote_addr;
        tuple.remote_addr = [r[3], 0, 0, 0];
        tuple.family = AF_INET;
    }
}
