//! Builds the kernel programs (`meshguard-ebpf`) for the BPF target with the nightly toolchain
//! and leaves the object in `OUT_DIR`, from where `src/kernel.rs` embeds it.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "meshguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../meshguard-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
