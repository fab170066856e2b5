//! The flags of the people's verbs, and what `meshguard flows` does with them: ask one agent,
//! or (`--cluster`) every node's.

use std::path::PathBuf;

use crate::{
    api::types::{FlowQuery, DEFAULT_LIMIT, MAX_LIMIT},
    cli::{
        client::{self, AgentAddr, Client},
        CliError, Output,
    },
    config::DEFAULT_SOCKET,
    verdict::Verdict,
};

/// How the CLI reaches an agent.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentConn {
    /// The agent's unix socket, or http://HOST:PORT or https://HOST:PORT of its TCP API.
    #[arg(long, env = "MESHGUARD_AGENT", default_value = DEFAULT_SOCKET, value_parser = parse_agent)]
    pub agent: AgentAddr,
    /// File holding the bearer token for an http(s):// agent.
    #[arg(long, env = "MESHGUARD_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed an https:// agent's certificate (instead of the system's
    /// roots).
    #[arg(long, env = "MESHGUARD_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl AgentConn {
    pub fn client(&self) -> Result<Client, CliError> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", path.display())))?
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
        if let (AgentAddr::Https(_), Some(path)) = (&self.agent, &self.ca_file) {
            crate::cli::tls::connector(Some(path)).map_err(CliError::Usage)?;
        }
        Ok(Client {
            addr: self.agent.clone(),
            token,
            ca_file: self.ca_file.clone(),
        })
    }
}

fn parse_agent(s: &str) -> Result<AgentAddr, String> {
    s.parse()
}

/// Which flows `meshguard flows` asks for, as given on its command line.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Selection {
    /// Only these verdicts (comma-separated): mtls, bypass-plaintext, bypass-tls, plaintext,
    /// unmeshed, expected, in-pod, pending.
    #[arg(long, value_delimiter = ',', value_name = "VERDICT[,VERDICT]")]
    pub verdict: Vec<String>,
    /// Only flows with an end in this namespace.
    #[arg(short, long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Flows of every namespace (the default when -n is not given).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Only flows with an end in this pod.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows with an end in this workload (Deployment, StatefulSet, ...).
    #[arg(long)]
    pub workload: Option<String>,
    /// Only flows with an end on this port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows seen within this long (e.g. 30s, 10m, 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many flows (the newest).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
}

impl Selection {
    /// The API query, after checking what can be checked here.
    pub fn query(&self) -> Result<FlowQuery, CliError> {
        let verdicts = self
            .verdict
            .iter()
            .map(|v| v.parse::<Verdict>())
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::Usage(format!("--verdict: {e}")))?;
        let since = match &self.since {
            Some(since) => Some(humantime::parse_duration(since).map_err(|_| {
                CliError::Usage(format!(
                    "--since {since:?}: give a duration like 30s, 10m or 2h"
                ))
            })?),
            None => None,
        };
        let limit = match self.last {
            Some(n) if n == 0 || n > MAX_LIMIT => {
                return Err(CliError::Usage(format!(
                    "--last {n}: give a number from 1 to {MAX_LIMIT}"
                )))
            }
            Some(n) => n,
            None => DEFAULT_LIMIT,
        };
        Ok(FlowQuery {
            verdicts,
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            workload: self.workload.clone(),
            port: self.port,
            since,
            limit,
        })
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Keep printing new flows as they are judged.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub agent: AgentConn,
    #[command(flatten)]
    pub cluster: ClusterConn,
}

/// How `meshguard edges` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EdgesOutput {
    Table,
    Json,
    /// A Graphviz digraph (`| dot -Tsvg > edges.svg`).
    Dot,
}

#[derive(Clone, Debug, clap::Args)]
pub struct EdgesArgs {
    /// Which records make the edges: the same filters as `flows` (without --last, every
    /// record the agents keep in the window).
    #[command(flatten)]
    pub selection: Selection,
    #[arg(short, long, value_enum, default_value_t = EdgesOutput::Table)]
    pub output: EdgesOutput,
    #[command(flatten)]
    pub agent: AgentConn,
    #[command(flatten)]
    pub cluster: ClusterConn,
}

/// `meshguard edges`: the edges of one agent's records (`--agent`), or of every node's merged
/// (`--cluster`, where a connection between two nodes' pods shows both its ends).
pub async fn edges(args: EdgesArgs, agent_on_command_line: bool) -> Result<(), CliError> {
    args.cluster.check(agent_on_command_line)?;
    let mut query = args.selection.query()?;
    if args.selection.last.is_none() {
        query.limit = MAX_LIMIT;
    }
    let records = records(&args.agent, &args.cluster, &query).await?;
    let edges = crate::cli::edges::edges(&records);
    let text = match args.output {
        EdgesOutput::Table => crate::cli::edges::table(&edges),
        EdgesOutput::Json => {
            serde_json::to_string_pretty(&edges).map_err(std::io::Error::from)? + "\n"
        }
        EdgesOutput::Dot => crate::cli::edges::dot(&edges),
    };
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(out.flush()?)
}

/// The records one agent (or, with `--cluster`, every node's) answers `query` with.
async fn records(
    agent: &AgentConn,
    cluster: &ClusterConn,
    query: &FlowQuery,
) -> Result<Vec<crate::flow::record::FlowRecord>, CliError> {
    if cluster.cluster {
        return cluster_records(cluster, agent, query).await;
    }
    let answer: crate::api::types::FlowsAnswer = agent
        .client()?
        .get_json(&format!("/v1/flows?{}", query.to_query()))
        .await?;
    Ok(answer.flows)
}

/// How `meshguard strict-ready` shows its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyOutput {
    Table,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct StrictReadyArgs {
    /// The namespace whose workloads to check.
    #[arg(short, long)]
    pub namespace: String,
    /// Only clients seen within this long (e.g. 10m, 24h); without it, every record the agents
    /// keep.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(short, long, value_enum, default_value_t = ReadyOutput::Table)]
    pub output: ReadyOutput,
    #[command(flatten)]
    pub agent: AgentConn,
    #[command(flatten)]
    pub cluster: ClusterConn,
}

/// `meshguard strict-ready`: prints each workload's readiness; not ready is an error (exit
/// code 1) naming the workloads, so that a pipeline can stop on it.
pub async fn strict_ready(
    args: StrictReadyArgs,
    agent_on_command_line: bool,
) -> Result<(), CliError> {
    args.cluster.check(agent_on_command_line)?;
    let selection = Selection {
        namespace: Some(args.namespace.clone()),
        since: args.since.clone(),
        last: Some(MAX_LIMIT),
        ..Selection::default()
    };
    let records = records(&args.agent, &args.cluster, &selection.query()?).await?;
    let workloads = crate::cli::strict::readiness(&records, &args.namespace);
    let text = match args.output {
        ReadyOutput::Table => crate::cli::strict::table(&workloads),
        ReadyOutput::Json => {
            serde_json::to_string_pretty(&workloads).map_err(std::io::Error::from)? + "\n"
        }
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    let not_ready: Vec<&str> = workloads
        .iter()
        .filter(|w| !w.ready)
        .map(|w| w.workload.as_str())
        .collect();
    if not_ready.is_empty() {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "not ready for STRICT: {} would break clients seen{}",
        not_ready.join(", "),
        args.since
            .map(|s| format!(" in the last {s}"))
            .unwrap_or_default()
    )))
}

#[cfg(feature = "kubernetes")]
async fn cluster_records(
    conn: &ClusterConn,
    agent: &AgentConn,
    query: &FlowQuery,
) -> Result<Vec<crate::flow::record::FlowRecord>, CliError> {
    let (answers, ..) = crate::cli::cluster::gather(&conn.options(agent), query).await?;
    Ok(crate::cli::cluster::merge(answers, None))
}

#[cfg(not(feature = "kubernetes"))]
async fn cluster_records(
    _: &ClusterConn,
    _: &AgentConn,
    _: &FlowQuery,
) -> Result<Vec<crate::flow::record::FlowRecord>, CliError> {
    Err(CliError::Usage(
        "--cluster: this meshguard was built without Kubernetes support (feature `kubernetes`)"
            .into(),
    ))
}

/// How `flows --cluster` finds every node's agent: through the Kubernetes API.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterConn {
    /// Ask every node's agent, found through the Kubernetes API and reached through the API
    /// server's pod proxy, and merge their answers (with a NODE column). Needs the
    /// meshguard-viewer Role.
    #[arg(long)]
    pub cluster: bool,
    /// The agents' namespace.
    #[arg(long, default_value = DEFAULT_AGENT_NAMESPACE, requires = "cluster", value_name = "NS")]
    pub agent_namespace: String,
    /// The label selector of the agent pods.
    #[arg(long, default_value = DEFAULT_AGENT_SELECTOR, requires = "cluster", value_name = "SELECTOR")]
    pub agent_selector: String,
    /// The Secret (in the agents' namespace) whose key `token` is the agents' API token;
    /// --token-file overrides it.
    #[arg(long, default_value = DEFAULT_TOKEN_SECRET, requires = "cluster", value_name = "NAME")]
    pub token_secret: String,
    /// How long to wait for each agent (and for each API server request).
    #[arg(long, default_value = "10s", value_parser = parse_timeout, requires = "cluster", value_name = "DURATION")]
    pub agent_timeout: std::time::Duration,
    /// The kubeconfig file to use (default: KUBECONFIG, ~/.kube/config, or the pod's service
    /// account).
    #[arg(long, requires = "cluster", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, requires = "cluster", value_name = "CONTEXT")]
    pub kube_context: Option<String>,
}

impl ClusterConn {
    /// `--agent` given on the command line contradicts `--cluster` (MESHGUARD_AGENT in the
    /// environment does not: it is for the other verbs).
    fn check(&self, agent_on_command_line: bool) -> Result<(), CliError> {
        if self.cluster && agent_on_command_line {
            return Err(CliError::Usage(
                "--agent names one agent and --cluster asks every node's: give one or the other"
                    .into(),
            ));
        }
        Ok(())
    }

    #[cfg(feature = "kubernetes")]
    fn options(&self, agent: &AgentConn) -> crate::cli::cluster::Options {
        crate::cli::cluster::Options {
            namespace: self.agent_namespace.clone(),
            selector: self.agent_selector.clone(),
            token_secret: self.token_secret.clone(),
            token_file: agent.token_file.clone(),
            kubeconfig: self.kubeconfig.clone(),
            kube_context: self.kube_context.clone(),
            timeout: self.agent_timeout,
        }
    }
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

/// `meshguard flows`: one agent's (`--agent`), or every node's (`--cluster`).
/// `agent_on_command_line`: `--agent` was given on the command line, which contradicts
/// `--cluster` (MESHGUARD_AGENT in the environment does not: it is for the other verbs).
pub async fn flows(args: FlowsArgs, agent_on_command_line: bool) -> Result<(), CliError> {
    args.cluster.check(agent_on_command_line)?;
    if args.cluster.cluster {
        return cluster_flows(&args).await;
    }
    let client = args.agent.client()?;
    let query = args.selection.query()?;
    crate::cli::flows(
        &client,
        &query,
        args.selection.last,
        args.output,
        args.follow,
    )
    .await
}

#[cfg(feature = "kubernetes")]
async fn cluster_flows(args: &FlowsArgs) -> Result<(), CliError> {
    if args.follow {
        return Err(CliError::Usage(
            "--follow does not go with --cluster: follow one node's agent (--agent, or `kubectl \
             exec` into its pod), or repeat `meshguard flows --cluster --since 1m`"
                .into(),
        ));
    }
    let options = args.cluster.options(&args.agent);
    let query = args.selection.query()?;
    crate::cli::cluster::flows(&options, &query, args.selection.last, args.output).await
}

#[cfg(not(feature = "kubernetes"))]
async fn cluster_flows(_: &FlowsArgs) -> Result<(), CliError> {
    Err(CliError::Usage(
        "--cluster: this meshguard was built without Kubernetes support (feature `kubernetes`)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = Selection {
            verdict: vec!["bypass-plaintext".into(), "plaintext".into()],
            namespace: Some("shop".into()),
            since: Some("10m".into()),
            last: Some(20),
            ..Selection::default()
        };
        assert_eq!(
            q.query().unwrap().to_query(),
            "verdict=bypass-plaintext%2Cplaintext&since=10m&limit=20&namespace=shop"
        );
        let bad = [
            (
                Selection {
                    verdict: vec!["bypass".into()],
                    ..Selection::default()
                },
                "--verdict: unknown verdict \"bypass\"",
            ),
            (
                Selection {
                    since: Some("soon".into()),
                    ..Selection::default()
                },
                "--since \"soon\": give a duration",
            ),
            (
                Selection {
                    last: Some(0),
                    ..Selection::default()
                },
                "--last 0: give a number from 1",
            ),
        ];
        for (q, want) in bad {
            let e = q.query().unwrap_err();
            assert!(e.to_string().starts_with(want), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
    }
}
