//! Linker options for the BPF build.

fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order", which also makes it lower every memset
    // to a call of the byte-at-a-time `memset` aya-ebpf provides: zeroing a 256-byte flow
    // state cost about 1,300 instructions. Without it LLVM writes zeros a word at a time.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
