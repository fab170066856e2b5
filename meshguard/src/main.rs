//! The `meshguard` command: `meshguard agent` runs on every node; the other verbs are for people.

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use meshguard::{
    agent,
    cli::{
        self,
        args::{AgentConn, EdgesArgs, FlowsArgs, StrictReadyArgs},
    },
    config::{self, LogFormat, DEFAULT_PIN_DIR, DEFAULT_SOCKET},
    kernel,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "meshguard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel programs on this node and watch every pod-to-pod flow.
    Agent(config::AgentConfig),
    /// Show recent flows and their verdicts; -f follows new ones as they are judged.
    #[command(
        after_help = "Examples:\n  meshguard flows --verdict bypass-plaintext -A\n  meshguard flows -n shop --since 10m -o wide\n  meshguard flows -f --verdict bypass-plaintext,bypass-tls\n  meshguard flows --cluster --verdict bypass-plaintext,bypass-tls --last 50"
    )]
    Flows(FlowsArgs),
    /// Is A -> B encrypted? One row per source workload -> destination workload:port: its
    /// connections, their verdicts and encryption, the mTLS the mesh declares, one word.
    #[command(
        after_help = "Examples:\n  meshguard edges\n  meshguard edges -n shop --since 1h\n  meshguard edges --cluster -o dot | dot -Tsvg > edges.svg"
    )]
    Edges(EdgesArgs),
    /// Can this namespace switch to STRICT? For each workload, the clients seen sending it
    /// plaintext through its sidecar, which STRICT would refuse; exit code 0 when none, 1 when
    /// some.
    #[command(
        name = "strict-ready",
        after_help = "Examples:\n  meshguard strict-ready -n shop\n  meshguard strict-ready -n shop --since 24h --cluster -o json"
    )]
    StrictReady(StrictReadyArgs),
    /// Explain one flow's verdict: the evidence and the rule that led to it.
    Explain {
        /// The flow's id (`meshguard flows -o wide` shows it).
        flow_id: String,
        #[command(flatten)]
        agent: AgentConn,
    },
    /// The node agent's health: programs, inventory, map fill, losses.
    Status {
        #[arg(short, long, value_enum, default_value_t = cli::Output::Table)]
        output: cli::Output,
        #[command(flatten)]
        agent: AgentConn,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Detach and unpin the kernel programs an agent left on this node (run as root).
    Uninstall {
        /// Where agents pin the kernel side (their --bpf-pin-dir).
        #[arg(long, default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
        bpf_pin_dir: std::path::PathBuf,
        /// Then wait for SIGTERM (as the container of a DaemonSet that uninstalls on every node).
        #[arg(long)]
        wait: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `--agent` on the command line contradicts `--cluster`; MESHGUARD_AGENT in the
    // environment does not (it is for the other verbs).
    let agent_on_command_line = matches
        .subcommand_matches("flows")
        .or_else(|| matches.subcommand_matches("edges"))
        .or_else(|| matches.subcommand_matches("strict-ready"))
        .and_then(|m| m.value_source("agent"))
        == Some(clap::parser::ValueSource::CommandLine);
    let result = match cli.command {
        Command::Flows(args) => {
            return cli::run(cli::args::flows(args, agent_on_command_line));
        }
        Command::Edges(args) => {
            return cli::run(cli::args::edges(args, agent_on_command_line));
        }
        Command::StrictReady(args) => {
            return cli::run(cli::args::strict_ready(args, agent_on_command_line));
        }
        Command::Explain { flow_id, agent } => {
            return cli::run(async move { cli::explain(&agent.client()?, &flow_id).await });
        }
        Command::Status { output, agent } => {
            return cli::run(async move { cli::status(&agent.client()?, output).await });
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "meshguard",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Uninstall { bpf_pin_dir, wait } => uninstall(&bpf_pin_dir).and_then(|()| {
            if wait {
                wait_for_termination()?;
            }
            Ok(())
        }),
        Command::Agent(config) => {
            init_logging(config.node.log_format);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(config)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // It may name a pod or quote the API server.
            eprintln!("error: {}", cli::display::printable(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// `meshguard uninstall`: unpins every generation of the kernel side; says what it removed.
fn uninstall(dir: &std::path::Path) -> anyhow::Result<()> {
    let removed = kernel::uninstall(dir)
        .map_err(|e| anyhow::anyhow!("removing {}: {e} (run as root)", dir.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}", dir.display());
    } else {
        for path in &removed {
            println!("detached and unpinned {}", path.display());
        }
    }
    if std::os::unix::net::UnixStream::connect(DEFAULT_SOCKET).is_ok() {
        println!(
            "an agent still runs ({DEFAULT_SOCKET}): its programs stay attached until it exits"
        );
    }
    Ok(())
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
