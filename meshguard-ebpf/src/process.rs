//! The process behind a flow, recorded once per flow from the `sock_send_length` tracepoint,
//! which runs in the sending task's context (the `sock_ops` and ingress `cgroup_skb` callbacks
//! run in softirq, where the current task is whoever happened to be running).
//!
//! Two attachments of the same logic: the BTF tracepoint (typed `struct sock *`, preferred),
//! and the classic tracepoint as a fallback where BTF programs are refused. The classic one
//! gets a bare pointer, so it reads the socket cookie at the offset the agent found in BTF.
//! The BTF one also marks, in the socket's storage, a socket that sends again once its sender
//! is recorded: every later send then returns after one storage read.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use meshguard_ebpf::{flags, EventKind};

use crate::{
    flow::{cookie_of, emit},
    maps::{quiet_of, FLOWS, SENDER_SEEN},
};

/// Offset of `sk_cookie` in `struct sock`; set by the agent before loading the classic
/// tracepoint program (0: unknown, the program does nothing).
#[unsafe(no_mangle)]
static SK_COOKIE_OFFSET: u64 = 0;

/// Offset of the `sk` field in the classic tracepoint's record, after the common fields.
const TP_SK_FIELD: usize = 8;

#[btf_tracepoint(function = "sock_send_length")]
pub fn flow_sender(ctx: BtfTracePointContext) -> i32 {
    if cfg!(feature = "empty") {
        return 0;
    }
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let quiet = quiet_of(sk, false);
    // SAFETY: this socket's storage.
    if !quiet.is_null() && unsafe { (*quiet).taken } & flags::PROCESS != 0 {
        return 0;
    }
    if record_sender(cookie_of(sk)) == Sender::Known {
        let quiet = quiet_of(sk, true);
        if !quiet.is_null() {
            // SAFETY: this socket's storage.
            unsafe { (*quiet).taken |= flags::PROCESS };
        }
    }
    0
}

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn flow_sender_tracepoint(ctx: TracePointContext) -> u32 {
    if cfg!(feature = "empty") {
        return 0;
    }
    // SAFETY: a read of the tracepoint record's fixed layout (see its `format` file).
    let offset = unsafe { read_volatile(&SK_COOKIE_OFFSET) };
    if offset == 0 {
        return 0;
    }
    // SAFETY: probe reads: a bad pointer yields an error, never a fault.
    let cookie = unsafe {
        let Ok(sk) = ctx.read_at::<u64>(TP_SK_FIELD) else {
            return 0;
        };
        if sk == 0 {
            return 0;
        }
        bpf_probe_read_kernel((sk + offset) as *const u64).unwrap_or(0)
    };
    // The cookie is 0 until something asked for it; by the time a flow sends, sock_ops or
    // cgroup_skb has.
    if cookie != 0 {
        let _ = record_sender(cookie);
    }
    0
}

#[derive(PartialEq, Eq)]
enum Sender {
    /// Recorded by an earlier send.
    Known,
    /// Recorded now, or not a flow of ours.
    New,
}

#[inline(always)]
fn record_sender(cookie: u64) -> Sender {
    let Some(seen) = SENDER_SEEN.get_ptr_mut(0) else {
        return Sender::New;
    };
    // SAFETY: this CPU's slot, used with preemption disabled.
    if unsafe { *seen } == cookie {
        return Sender::Known;
    }
    let Some(state) = FLOWS.get_ptr_mut(cookie) else {
        return Sender::New;
    };
    // SAFETY: a live map value; racing writers only set the same fields to the same task.
    let state = unsafe { &mut *state };
    // SAFETY: as above.
    unsafe { *seen = cookie };
    if state.flags & flags::PROCESS != 0 {
        return Sender::Known;
    }
    state.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    state.comm = bpf_get_current_comm().unwrap_or_default();
    state.flags |= flags::PROCESS;
    emit(EventKind::Process, cookie, state);
    Sender::New
}
