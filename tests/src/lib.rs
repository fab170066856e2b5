//! The ground meshguard's privileged tests stand on: network namespaces joined by veth pairs,
//! a cgroup v2 directory per test in which every process it starts runs, and the real agent
//! reporting flows as JSON. Everything made here is torn down on drop, also when a test fails.
//!
//! These tests need root. Without it they fail loudly in CI (`CI` set) and are skipped, saying
//! so, elsewhere.

pub mod agent;
pub mod sys;
pub mod testbed;

use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context as _};

pub use agent::{meshguard_bin, variant_bin, Agent, Pins, RecordExt};
pub use sys::{cgroup2_root, link, Cgroup, Netns, Service, TempDir};

/// Whether privileged tests can run here. Panics in CI when they cannot: a CI run that skipped
/// them would claim a coverage it does not have.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        for tool in [
            "ip",
            "curl",
            "openssl",
            "socat",
            "python3",
            "ssh-keyscan",
            "/usr/sbin/sshd",
        ] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(found, "{tool} is missing: run `cargo xtask setup`");
        }
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "privileged tests must run as root in CI (network namespaces, cgroups, eBPF)"
    );
    eprintln!("skipped: needs root (network namespaces, cgroups, eBPF)");
    false
}

/// Runs a command to completion; fails with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    succeeded(cmd, out)
}

/// `out` if `cmd` exited successfully, else an error with its stderr.
pub fn succeeded(cmd: &Command, out: Output) -> anyhow::Result<Output> {
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
