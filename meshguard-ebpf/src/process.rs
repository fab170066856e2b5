//! `tp_btf/sock_send_length`: runs in the sending task's context, so it names the process behind
//! a flow (the `sock_ops` and ingress `cgroup_skb` callbacks run in softirq, where the current
//! task is whoever happened to be running). Recorded once per flow.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use meshguard_ebpf::{flags, EventKind};

use crate::{
    flow::{cookie_of, emit},
    maps::FLOWS,
};

#[btf_tracepoint(function = "sock_send_length")]
pub fn flow_sender(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let cookie = cookie_of(sk);
    let Some(state) = FLOWS.get_ptr_mut(cookie) else {
        return 0;
    };
    // SAFETY: a live map value; racing writers only set the same fields to the same task.
    let state = unsafe { &mut *state };
    if state.flags & flags::PROCESS != 0 {
        return 0;
    }
    state.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    state.comm = bpf_get_current_comm().unwrap_or_default();
    state.flags |= flags::PROCESS;
    emit(EventKind::Process, cookie, state);
    0
}
