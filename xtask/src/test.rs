//! `cargo xtask test`: the project's whole test command, the one CI runs.

use std::process::Command;

use crate::{cargo, step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the privileged integration tests (they need root).
    #[arg(long)]
    no_privileged: bool,
    /// Seconds each fuzz target runs (0 skips fuzzing).
    #[arg(long, default_value_t = 20)]
    fuzz_seconds: u32,
}

/// The fuzz targets in `meshguard/fuzz`, each with its seed corpus.
const FUZZ_TARGETS: [&str; 6] = [
    "fingerprint",
    "event_decode",
    "pod_list",
    "api_query",
    "cgroup_name",
    "mesh_policy",
];

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
        "deploy/ manifests, alert rules and their unit tests, dashboard",
        Command::new("sh").arg(workspace_root().join("deploy/check.sh")),
    )?;
    step(
        "unit tests",
        cargo().args(["test", "--workspace", "--exclude", "meshguard-tests"]),
    )?;
    step(
        "unit tests (testbed)",
        cargo().args(["test", "-p", "meshguard-tests", "--lib"]),
    )?;
    if args.fuzz_seconds > 0 {
        fuzz(args.fuzz_seconds)?;
    }
    if args.no_privileged {
        println!("==> privileged tests skipped (--no-privileged)");
        return Ok(());
    }
    step(
        "build meshguard for the privileged tests",
        cargo().args(["build", "-p", "meshguard"]),
    )?;
    let bin = workspace_root().join("target/debug/meshguard");
    // The upgrade test's other version: programs that differ (a target dir of its own, so that
    // neither build overwrites the other).
    let variant_dir = workspace_root().join("target/variant");
    step(
        "build meshguard with other kernel programs, for the upgrade test",
        cargo()
            .args(["build", "-p", "meshguard", "--target-dir"])
            .arg(&variant_dir)
            .env("MESHGUARD_EBPF_VARIANT", "1"),
    )?;
    step(
        "bench smoke run (every figure produced; numbers not judged)",
        cargo()
            .args(["xtask", "bench", "--smoke", "--meshguard"])
            .arg(&bin),
    )?;
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
            .env("MESHGUARD_BIN", bin)
            .env("MESHGUARD_VARIANT_BIN", variant_dir.join("debug/meshguard")),
    )
}

/// Each fuzz target for a bounded time, from its committed seeds; what it finds goes to a
/// scratch corpus under `target/`, never into the committed one.
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    let root = workspace_root();
    for target in FUZZ_TARGETS {
        let scratch = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        let seeds = root.join("meshguard/fuzz/corpus").join(target);
        std::fs::create_dir_all(&seeds)?;
        step(
            &format!("fuzz {target} for {seconds}s"),
            Command::new("rustup")
                .current_dir(root.join("meshguard/fuzz"))
                .args(["run", "nightly", "cargo", "fuzz", "run", "-O", target])
                .arg(&scratch)
                .arg(&seeds)
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    "-print_final_stats=1",
                ])
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER"),
        )?;
    }
    Ok(())
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
