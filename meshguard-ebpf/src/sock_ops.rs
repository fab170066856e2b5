//! `sock_ops`: the TCP connection lifecycle. A flow starts at ACTIVE/PASSIVE_ESTABLISHED and ends
//! when `STATE_CB` reports `TCP_CLOSE`, which every socket reaches (also through TIME_WAIT).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshguard_ebpf::{
    flags, EventKind, FlowState, FlowTuple, Stat, DIRECTION_EGRESS, DIRECTION_INGRESS,
};

use crate::{
    flow::{close, cookie_of, emit, normalize_mapped},
    maps::{count, quiet_of, FLOWS},
};

const AF_INET6: u32 = 10;
const IPPROTO_TCP: u8 = 6;

/// Read by the `variant` build only, so that its programs differ from the default's.
#[cfg(feature = "variant")]
#[no_mangle]
static VARIANT: u32 = 0;

#[sock_ops]
pub fn flow_lifecycle(ctx: SockOpsContext) -> u32 {
    // SAFETY: a global of this object; read volatile so that the compiler keeps the read.
    #[cfg(feature = "variant")]
    if unsafe { read_volatile(addr_of!(VARIANT)) } != 0 {
        return 1;
    }
    if cfg!(feature = "empty") {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, DIRECTION_EGRESS),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(&ctx, DIRECTION_INGRESS),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext, direction: u8) {
    // Ask for state callbacks on this socket: that is how its close reaches us.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);

    let cookie = cookie_of(ctx.ops.cast());
    let state = FlowState {
        tuple: tuple_of(ctx, direction),
        socket: cookie,
        flags: flags::LIFECYCLE,
        // SAFETY: `ops` is this program's context.
        netns: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        // SAFETY: no preconditions.
        opened_ns: unsafe { bpf_ktime_get_ns() },
        ..FlowState::default()
    };
    if FLOWS.insert(cookie, state, 0).is_err() {
        count(Stat::FlowMapFull);
    }
    emit(EventKind::Open, cookie, &state);
}

/// The socket's own addresses and ports.
#[inline(always)]
fn tuple_of(ctx: &SockOpsContext, direction: u8) -> FlowTuple {
    let mut tuple = FlowTuple {
        local_port: ctx.local_port() as u16,
        // Network byte order in the upper half on little-endian hosts.
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        family: ctx.family() as u16,
        protocol: IPPROTO_TCP,
        direction,
        ..FlowTuple::default()
    };
    if ctx.family() == AF_INET6 {
        read_ip6(ctx.ops, &mut tuple);
    } else {
        tuple.local_addr[0] = ctx.local_ip4();
        tuple.remote_addr[0] = ctx.remote_ip4();
    }
    normalize_mapped(&mut tuple);
    tuple
}

/// The verifier rejects copying the `*_ip6` arrays out of the context as a whole
/// ("dereference of modified ctx ptr"): each word must be its own load.
#[inline(always)]
fn read_ip6(ops: *mut bpf_sock_ops, tuple: &mut FlowTuple) {
    // SAFETY: `ops` is the program's context; each read is one aligned u32 context field.
    unsafe {
        tuple.local_addr[0] = read_volatile(addr_of!((*ops).local_ip6[0]));
        tuple.local_addr[1] = read_volatile(addr_of!((*ops).local_ip6[1]));
        tuple.local_addr[2] = read_volatile(addr_of!((*ops).local_ip6[2]));
        tuple.local_addr[3] = read_volatile(addr_of!((*ops).local_ip6[3]));
        tuple.remote_addr[0] = read_volatile(addr_of!((*ops).remote_ip6[0]));
        tuple.remote_addr[1] = read_volatile(addr_of!((*ops).remote_ip6[1]));
        tuple.remote_addr[2] = read_volatile(addr_of!((*ops).remote_ip6[2]));
        tuple.remote_addr[3] = read_volatile(addr_of!((*ops).remote_ip6[3]));
    }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let cookie = cookie_of(ctx.ops.cast());
    match FLOWS.get_ptr_mut(cookie) {
        Some(state) => {
            // SAFETY: a live map value.
            let state = unsafe { &mut *state };
            // The counts of its quiet directions, kept in the socket's storage (see skb.rs).
            // SAFETY: `ops` is this program's context.
            let quiet = quiet_of(unsafe { (*ctx.ops).__bindgen_anon_2.sk }, false);
            if !quiet.is_null() {
                // SAFETY: this socket's storage, live for this run.
                let quiet = unsafe { &*quiet };
                for (d, sampled) in [(0, flags::SAMPLED_EGRESS), (1, flags::SAMPLED_INGRESS)] {
                    if quiet.taken & sampled != 0 {
                        quiet.write_counts(d, &mut state.counters);
                    }
                }
            }
            close(cookie, state);
        }
        None => {
            // Evicted while open: counted, and its tuple still reported so that the agent can
            // tell whether it ever saw the flow. Which end opened it is unknown; the end with
            // the higher (ephemeral) port most likely.
            count(Stat::FlowEvicted);
            let mut tuple = tuple_of(ctx, DIRECTION_EGRESS);
            if tuple.local_port < tuple.remote_port {
                tuple.direction = DIRECTION_INGRESS;
            }
            let state = FlowState {
                tuple,
                socket: cookie,
                flags: flags::LIFECYCLE | flags::EVICTED,
                // SAFETY: `ops` is this program's context.
                netns: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
                ..FlowState::default()
            };
            emit(EventKind::Close, cookie, &state);
        }
    }
}
