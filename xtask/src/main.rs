//! Project tasks: `cargo xtask setup | test | demo`.
//!
//! Every step prints one line; setup skips what is already present, so it is cheap to repeat.

mod bench;
mod demo;
mod loadgen;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "meshguard's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything this machine lacks to build and test meshguard (idempotent).
    Setup,
    /// Formatting, lints (userspace and eBPF), unit tests, then the privileged tests.
    Test(test::Args),
    /// The bench's load generator (runs inside a testbed namespace).
    #[command(hide = true)]
    Loadgen(loadgen::Args),
    /// Measure what meshguard costs: throughput with and without the agent, program run times.
    Bench(bench::Args),
    /// Bring up the demo node (real Envoy sidecars), run the agent and every scenario, print
    /// the flows; the node stays up until `cargo xtask demo --down`.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Test(args) => {
            setup::run()?;
            test::run(&args)
        }
        Task::Loadgen(args) => loadgen::run(&args),
        Task::Bench(args) => {
            setup::run()?;
            bench::bench(&args)
        }
        Task::Demo(args) => {
            if !args.down {
                setup::run()?;
            }
            demo::run(&args)
        }
    }
}

/// The workspace's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs one step, announcing it on one line; fails with the step's name.
pub fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("==> {name}");
    let status = cmd
        .status()
        .with_context(|| format!("{name}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
