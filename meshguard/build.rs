//! Builds the kernel programs (`meshguard-ebpf`) for the BPF target with the nightly toolchain
//! and leaves the object in `OUT_DIR`, from where `src/kernel.rs` embeds it.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Builds for tests and the bench only: `1`, the upgrade test's "other version" (programs
    // that differ, behaviour that does not); `empty`, the bench's floor (every program returns
    // at once: what being attached costs, and what the kernel's stats charge doing nothing).
    println!("cargo:rerun-if-env-changed=MESHGUARD_EBPF_VARIANT");
    let features: &[&str] = match std::env::var("MESHGUARD_EBPF_VARIANT").as_deref() {
        Ok("1") => &["variant"],
        Ok("empty") => &["empty"],
        _ => &[],
    };
    let ebpf = Package {
        name: "meshguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../meshguard-ebpf"),
        features,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
