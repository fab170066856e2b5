//! meshguard's kernel side: counts, samples the first bytes of each flow direction once, and
//! emits one ring-buffer event per flow or state change. Every decision is made in userspace.
//!
//! All programs attach once at the cgroup v2 root, so they see the sockets of every network
//! namespace on the node. One file per attach point; the maps and helpers they share are in
//! `maps.rs` and `flow.rs`.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_xadd, see flow.rs")
)]

#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod release;
#[cfg(target_arch = "bpf")]
mod skb;
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The host build of this crate only provides the shared types (`lib.rs`).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
