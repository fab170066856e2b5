//! The `meshguard` command: `meshguard agent` runs on every node; the other verbs are for people.

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use meshguard::{
    agent,
    cli::{
        self,
        args::{AgentConn, FlowsArgs},
    },
    config::{DEFAULT_PIN_DIR, DEFAULT_SOCKET},
    inventory, kernel,
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
    Agent(AgentArgs),
    /// Show recent flows and their verdicts; -f follows new ones as they are judged.
    #[command(
        after_help = "Examples:\n  meshguard flows --verdict bypass-plaintext -A\n  meshguard flows -n shop --since 10m -o wide\n  meshguard flows -f --verdict bypass-plaintext,bypass-tls\n  meshguard flows --cluster --verdict bypass-plaintext,bypass-tls --last 50"
    )]
    Flows(FlowsArgs),
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

#[derive(clap::Args)]
struct AgentArgs {
    /// Write one JSON line per flow record to stdout: when a flow is classified and when it closes.
    #[arg(long)]
    log_flows: bool,
    /// Name of this node in flow records.
    #[arg(long, env = "NODE_NAME", default_value_t = agent::default_node_name(), hide_default_value = true)]
    node_name: String,
    /// Flows the kernel tracks at once (least recently used beyond that, and counted).
    #[arg(long, default_value_t = 131_072, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    flow_map_size: u32,
    /// Ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, default_value_t = 1 << 22, value_parser = parse_ringbuf_bytes)]
    ringbuf_bytes: u32,
    /// Flows the agent keeps in memory at once.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    max_flows: u64,
    /// Where pods and their mesh intent come from: file:PATH (a `kubectl get pods -o json`
    /// document, reloaded when it changes), kubernetes (the API server, this node's pods), or none.
    #[arg(long, default_value = "none", value_parser = parse_inventory)]
    inventory: inventory::source::Source,
    /// Verdict policy, a JSON file (proxy process names, expected plaintext); defaults otherwise.
    #[arg(long, value_name = "FILE")]
    policy: Option<std::path::PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz; "off" serves nothing.
    #[arg(long, default_value = "0.0.0.0:9464", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// Flow label sets /metrics keeps before folding new ones into one `_overflow` series.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_series: u64,
    /// The API's unix socket (mode 0600); "off" serves none.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    api_socket: String,
    /// Also serve the API on TCP at this address, requiring the bearer token in --api-token-file.
    #[arg(long, requires = "api_token_file", value_name = "ADDR")]
    api_addr: Option<std::net::SocketAddr>,
    /// File holding the API's bearer token (16 characters or more).
    #[arg(long, requires = "api_addr", value_name = "FILE")]
    api_token_file: Option<std::path::PathBuf>,
    /// Recent flow records kept for queries.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    store_flows: u64,
    /// Flagged flow records other than bypasses (plaintext) kept apart from the rest.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    store_flagged: u64,
    /// Bypass records (bypass-plaintext, bypass-tls) kept apart from all others: only newer
    /// bypasses evict one.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    store_bypass: u64,
    /// The host's cgroup v2 root, when the agent runs in a pod (e.g. /host/sys/fs/cgroup).
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<std::path::PathBuf>,
    /// Which kernel hook names the process behind each flow.
    #[arg(long, value_enum, default_value_t = kernel::ProcessAttribution::Auto)]
    process_attribution: kernel::ProcessAttribution,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where on bpffs to pin the kernel side so that it outlives the agent (a restarted agent
    /// adopts it, and reports the flows of the meantime); "off": nothing pinned, detached on exit.
    #[arg(long, default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
    bpf_pin_dir: String,
    /// What records keep of the payload: the fingerprint (default), or also a redacted HTTP
    /// head (header names, no values, no query string). Raw payload never leaves the agent.
    #[arg(long, value_enum, default_value_t = agent::Evidence::Fingerprint)]
    evidence: agent::Evidence,
    /// On exit, keep the pinned kernel side attached (for the next agent) or detach it.
    #[arg(long, value_enum, default_value_t = agent::OnExit::Keep)]
    on_exit: agent::OnExit,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not an address:port (e.g. 0.0.0.0:9464) or \"off\""))
}

fn parse_inventory(s: &str) -> Result<inventory::source::Source, String> {
    s.parse()
}

fn parse_ringbuf_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} is not a power of two of at least 4096 (try {})",
            n.max(4096).next_power_of_two()
        ));
    }
    Ok(n)
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
        .and_then(|m| m.value_source("agent"))
        == Some(clap::parser::ValueSource::CommandLine);
    let result = match cli.command {
        Command::Flows(args) => {
            return cli::run(cli::args::flows(args, agent_on_command_line));
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
        Command::Agent(args) => {
            init_logging(args.log_format);
            let options = agent::Options {
                node_name: args.node_name.into(),
                log_flows: args.log_flows,
                sizes: kernel::Sizes {
                    flow_map_entries: args.flow_map_size,
                    ringbuf_bytes: args.ringbuf_bytes,
                },
                max_flows: args.max_flows as usize,
                process_attribution: args.process_attribution,
                inventory: args.inventory,
                policy: args.policy,
                metrics_addr: args.metrics_addr.0,
                max_series: args.max_series as usize,
                cgroup_root: args.cgroup_root,
                api_socket: (args.api_socket != "off").then(|| args.api_socket.into()),
                api_tcp: args.api_addr.zip(args.api_token_file),
                store_flows: args.store_flows as usize,
                store_flagged: args.store_flagged as usize,
                store_bypass: args.store_bypass as usize,
                pin_root: (args.bpf_pin_dir != "off").then(|| args.bpf_pin_dir.into()),
                on_exit: args.on_exit,
                evidence: args.evidence,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(options)))
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

    #[test]
    fn ringbuf_size_must_be_a_power_of_two() {
        assert_eq!(parse_ringbuf_bytes("65536"), Ok(65536));
        assert!(parse_ringbuf_bytes("5000")
            .unwrap_err()
            .contains("try 8192"));
        assert!(parse_ringbuf_bytes("1024").is_err());
        assert!(parse_ringbuf_bytes("many").is_err());
    }
}
