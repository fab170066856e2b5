//! Builds the kernel programs (`meshguard-ebpf`) for the BPF target with the nightly toolchain
//! and leaves the object in `OUT_DIR`, from where `src/kernel.rs` embeds it.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The upgrade test's "other version": programs that differ, behaviour that does not.
    println!("cargo:rerun-if-env-changed=MESHGUARD_EBPF_VARIANT");
    let variant = std::env::var_os("MESHGUARD_EBPF_VARIANT").is_some_and(|v| v == "1");
    let ebpf = Package {
        name: "meshguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../meshguard-ebpf"),
        features: if variant { &["variant"] } else { &[] },
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
