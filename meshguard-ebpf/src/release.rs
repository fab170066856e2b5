//! `cgroup/sock_release`: the end of flows that `sock_ops` does not follow (UDP, and TCP
//! connections that predate the agent).

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use meshguard_ebpf::flags;

use crate::{
    flow::{close, cookie_of},
    maps::FLOWS,
};

#[cgroup_sock(sock_release)]
pub fn flow_release(ctx: SockContext) -> i32 {
    if cfg!(feature = "empty") {
        return 1;
    }
    let cookie = cookie_of(ctx.sock.cast());
    if let Some(state) = FLOWS.get_ptr_mut(cookie) {
        // SAFETY: a live map value, read before the entry is removed.
        let state = unsafe { &mut *state };
        // A followed TCP socket may still be closing: its STATE_CB close has the final counts.
        if state.flags & flags::LIFECYCLE == 0 && state.closed_ns == 0 {
            close(cookie, state);
        }
    }
    1
}
