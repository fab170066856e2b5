//! `cargo xtask test`: the project's whole test command, the one CI runs.

use std::process::Command;

use crate::{cargo, step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the privileged integration tests (they need root).
    #[arg(long)]
    no_privileged: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "clippy (userspace, warnings denied)",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step("clippy (eBPF, warnings denied)", &mut ebpf_clippy())?;
    step(
        "unit tests",
        cargo().args(["test", "--workspace", "--exclude", "meshguard-tests"]),
    )?;
    step(
        "unit tests (testbed)",
        cargo().args(["test", "-p", "meshguard-tests", "--lib"]),
    )?;
    if args.no_privileged {
        println!("==> privileged tests skipped (--no-privileged)");
        return Ok(());
    }
    step(
        "build meshguard for the privileged tests",
        cargo().args(["build", "-p", "meshguard"]),
    )?;
    let bin = workspace_root().join("target/debug/meshguard");
    step(
        "privileged tests (root: network namespaces, cgroups, eBPF)",
        cargo()
            .args([
                "test",
                "-p",
                "meshguard-tests",
                "--test",
                "*",
                "--",
                "--test-threads=1",
            ])
            .env("MESHGUARD_BIN", bin),
    )
}

/// Clippy on the kernel crate for the BPF target, as aya-build compiles it, in a target dir of
/// its own so that it does not invalidate the host build.
fn ebpf_clippy() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root())
        .args(["run", "nightly", "cargo", "clippy", "-p", "meshguard-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cmd
}
