//! The `meshguard` command: `meshguard agent` runs on every node; the other verbs are for people.

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use meshguard::{
    agent, cli, client,
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

/// How the CLI reaches an agent.
#[derive(clap::Args)]
struct AgentConn {
    /// The agent's unix socket, or http://HOST:PORT or https://HOST:PORT of its TCP API.
    #[arg(long, env = "MESHGUARD_AGENT", default_value = DEFAULT_SOCKET, value_parser = parse_agent)]
    agent: client::AgentAddr,
    /// File holding the bearer token for an http(s):// agent.
    #[arg(long, env = "MESHGUARD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that signed an https:// agent's certificate (instead of the system's
    /// roots).
    #[arg(long, env = "MESHGUARD_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
}

impl AgentConn {
    fn client(&self) -> Result<client::Client, cli::CliError> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        cli::CliError::Usage(format!("--token-file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        if let Some(warning) = client::plain_http_token_warning(&self.agent, token.is_some()) {
            eprintln!("{warning}");
        }
        // A CA file that cannot be used is bad usage, not an unreachable agent.
        #[cfg(feature = "tls")]
        if let (client::AgentAddr::Https(_), Some(path)) = (&self.agent, &self.ca_file) {
            meshguard::tls::connector(Some(path)).map_err(cli::CliError::Usage)?;
        }
        Ok(client::Client {
            addr: self.agent.clone(),
            token,
            ca_file: self.ca_file.clone(),
        })
    }
}

fn parse_agent(s: &str) -> Result<client::AgentAddr, String> {
    s.parse()
}

#[derive(clap::Args)]
struct FlowsArgs {
    /// Only these verdicts (comma-separated): mtls, bypass-plaintext, bypass-tls, plaintext,
    /// unmeshed, expected, in-pod, pending.
    #[arg(long, value_delimiter = ',', value_name = "VERDICT[,VERDICT]")]
    verdict: Vec<String>,
    /// Only flows with an end in this namespace.
    #[arg(short, long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Flows of every namespace (the default when -n is not given).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only flows with an end in this pod.
    #[arg(long)]
    pod: Option<String>,
    /// Only flows with an end in this workload (Deployment, StatefulSet, ...).
    #[arg(long)]
    workload: Option<String>,
    /// Only flows with an end on this port.
    #[arg(long)]
    port: Option<u16>,
    /// Only flows seen within this long (e.g. 30s, 10m, 2h).
    #[arg(long)]
    since: Option<String>,
    /// At most this many flows (the newest).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Keep printing new flows as they are judged.
    #[arg(short, long)]
    follow: bool,
    #[arg(short, long, value_enum, default_value_t = cli::Output::Table)]
    output: cli::Output,
    #[command(flatten)]
    agent: AgentConn,
    #[command(flatten)]
    cluster: ClusterConn,
}

/// How `flows --cluster` finds every node's agent: through the Kubernetes API.
#[derive(clap::Args)]
struct ClusterConn {
    /// Ask every node's agent, found through the Kubernetes API and reached through the API
    /// server's pod proxy, and merge their answers (with a NODE column). Needs the
    /// meshguard-viewer Role.
    #[arg(long)]
    cluster: bool,
    /// The agents' namespace.
    #[arg(long, default_value = DEFAULT_AGENT_NAMESPACE, requires = "cluster", value_name = "NS")]
    agent_namespace: String,
    /// The label selector of the agent pods.
    #[arg(long, default_value = DEFAULT_AGENT_SELECTOR, requires = "cluster", value_name = "SELECTOR")]
    agent_selector: String,
    /// The Secret (in the agents' namespace) whose key `token` is the agents' API token;
    /// --token-file overrides it.
    #[arg(long, default_value = DEFAULT_TOKEN_SECRET, requires = "cluster", value_name = "NAME")]
    token_secret: String,
    /// How long to wait for each agent (and for each API server request).
    #[arg(long, default_value = "10s", value_parser = parse_timeout, requires = "cluster", value_name = "DURATION")]
    agent_timeout: std::time::Duration,
    /// The kubeconfig file to use (default: KUBECONFIG, ~/.kube/config, or the pod's service
    /// account).
    #[arg(long, requires = "cluster", value_name = "FILE")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, requires = "cluster", value_name = "CONTEXT")]
    kube_context: Option<String>,
}

// The defaults of `flows --cluster`, as deploy/ names things.
const DEFAULT_AGENT_NAMESPACE: &str = "meshguard";
const DEFAULT_AGENT_SELECTOR: &str = "app.kubernetes.io/name=meshguard";
const DEFAULT_TOKEN_SECRET: &str = "meshguard-api-token";

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration like 5s or 1m"))
}

#[cfg(feature = "kubernetes")]
async fn cluster_flows(
    conn: &ClusterConn,
    agent: &AgentConn,
    query: &cli::FlowQuery,
    output: cli::Output,
    follow: bool,
) -> Result<(), cli::CliError> {
    if follow {
        return Err(cli::CliError::Usage(
            "--follow does not go with --cluster: follow one node's agent (--agent, or `kubectl \
             exec` into its pod), or repeat `meshguard flows --cluster --since 1m`"
                .into(),
        ));
    }
    let options = meshguard::cluster::Options {
        namespace: conn.agent_namespace.clone(),
        selector: conn.agent_selector.clone(),
        token_secret: conn.token_secret.clone(),
        token_file: agent.token_file.clone(),
        kubeconfig: conn.kubeconfig.clone(),
        kube_context: conn.kube_context.clone(),
        timeout: conn.agent_timeout,
    };
    meshguard::cluster::flows(&options, query, output).await
}

#[cfg(not(feature = "kubernetes"))]
async fn cluster_flows(
    _: &ClusterConn,
    _: &AgentConn,
    _: &cli::FlowQuery,
    _: cli::Output,
    _: bool,
) -> Result<(), cli::CliError> {
    Err(cli::CliError::Usage(
        "--cluster: this meshguard was built without Kubernetes support (feature `kubernetes`)"
            .into(),
    ))
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

/// Runs a CLI verb on a small runtime; its error decides the exit code (2: bad usage, 1: other).
fn run_verb(verb: impl std::future::Future<Output = Result<(), cli::CliError>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(cli::CliError::from)
        .and_then(|rt| rt.block_on(verb));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", cli::error_line(&e));
            ExitCode::from(e.exit_code())
        }
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
            let query = cli::FlowQuery {
                verdicts: args.verdict,
                namespace: args.namespace,
                pod: args.pod,
                workload: args.workload,
                port: args.port,
                since: args.since,
                last: args.last,
            };
            let (output, follow) = (args.output, args.follow);
            if args.cluster.cluster {
                if agent_on_command_line {
                    return run_verb(async {
                        Err(cli::CliError::Usage(
                            "--agent names one agent and --cluster asks every node's: give one \
                             or the other"
                                .into(),
                        ))
                    });
                }
                return run_verb(async move {
                    cluster_flows(&args.cluster, &args.agent, &query, output, follow).await
                });
            }
            return run_verb(async move {
                cli::flows(&args.agent.client()?, &query, output, follow).await
            });
        }
        Command::Explain { flow_id, agent } => {
            return run_verb(async move { cli::explain(&agent.client()?, &flow_id).await });
        }
        Command::Status { output, agent } => {
            return run_verb(async move { cli::status(&agent.client()?, output).await });
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
            eprintln!(
                "error: {}",
                meshguard::display::printable(&format!("{e:#}"))
            );
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
