//! The agent's configuration, as `meshguard agent` parses it: one struct per subsystem, each
//! flag's default a named constant beside it, used as parsed (there is no second copy).
//! `meshguard agent --help` shows them under one heading per subsystem.

use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use clap::builder::RangedU64ValueParser;

use crate::{inventory::source::Source, kernel::ProcessAttribution};

/// Where the agent serves its API and the CLI looks for it.
pub const DEFAULT_SOCKET: &str = "/run/meshguard/meshguard.sock";
/// Where the agent pins its programs and maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshguard";
/// Flows the kernel's map holds.
pub const DEFAULT_FLOW_MAP_SIZE: u32 = 131_072;
/// The ring buffer: 4 MiB.
pub const DEFAULT_RINGBUF_BYTES: u32 = 1 << 22;
/// Flows the agent's table holds: as many as the kernel's map.
pub const DEFAULT_MAX_FLOWS: usize = DEFAULT_FLOW_MAP_SIZE as usize;
/// Where `/metrics`, `/healthz` and `/readyz` are served.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// Flow label sets `/metrics` keeps.
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// Records the query store keeps: recent ones, flagged ones, bypasses.
pub const DEFAULT_STORE_FLOWS: usize = 65_536;
pub const DEFAULT_STORE_FLAGGED: usize = 16_384;
pub const DEFAULT_STORE_BYPASS: usize = 16_384;

/// `meshguard agent`.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentConfig {
    #[command(flatten)]
    pub node: NodeConfig,
    #[command(flatten)]
    pub kernel: KernelConfig,
    #[command(flatten)]
    pub flows: FlowConfig,
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub serve: ServeConfig,
}

/// The node and the agent's own output.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Node")]
pub struct NodeConfig {
    /// Name of this node in flow records.
    #[arg(long, env = "NODE_NAME", default_value_t = default_node_name(), hide_default_value = true)]
    pub node_name: String,
    /// The host's cgroup v2 root, when the agent runs in a pod (e.g. /host/sys/fs/cgroup).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Write one JSON line per flow record to stdout: when a flow is classified and when it closes.
    #[arg(long)]
    pub log_flows: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The kernel side: its sizes, its hooks, and whether it outlives the agent.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Kernel")]
pub struct KernelConfig {
    /// Flows the kernel tracks at once (least recently used beyond that, and counted).
    #[arg(long, default_value_t = DEFAULT_FLOW_MAP_SIZE, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub flow_map_size: u32,
    /// Ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, default_value_t = DEFAULT_RINGBUF_BYTES, value_parser = parse_ringbuf_bytes)]
    pub ringbuf_bytes: u32,
    /// Which kernel hook names the process behind each flow.
    #[arg(long, value_enum, default_value_t = ProcessAttribution::Auto)]
    pub process_attribution: ProcessAttribution,
    /// Where on bpffs to pin the kernel side so that it outlives the agent (a restarted agent
    /// adopts it, and reports the flows of the meantime); "off": nothing pinned, detached on exit.
    #[arg(long, default_value = DEFAULT_PIN_DIR, value_parser = parse_path_or_off, value_name = "DIR")]
    pub bpf_pin_dir: OrOff<PathBuf>,
    /// On exit, keep the pinned kernel side attached (for the next agent), also still refusing
    /// what enforcement refuses, or detach it.
    #[arg(long, value_enum, default_value_t = OnExit::Keep)]
    pub on_exit: OnExit,
}

impl KernelConfig {
    /// Where the kernel side is pinned; `None`: not pinned, detached on exit.
    pub fn pin_root(&self) -> Option<&std::path::Path> {
        self.bpf_pin_dir.0.as_deref()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Leave the programs attached and counting: a restarted agent adopts them and reports
    /// what happened meanwhile. Enforcement stops (fail-open): at once on exit, and within
    /// seconds when the agent crashes or hangs, since it no longer renews its word.
    Keep,
    /// As `keep`, and keep refusing what enforcement refuses while no agent runs, crashed and
    /// hung ones too (fail-closed): bypasses stay refused, unrecorded, their connections left
    /// to time out rather than reset.
    KeepEnforcing,
    /// Detach and unpin everything (as `meshguard uninstall` does).
    Detach,
}

/// What flows are judged against, and what their records keep.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Flows and verdicts")]
pub struct FlowConfig {
    /// Flows the agent keeps in memory at once.
    #[arg(long, default_value_t = DEFAULT_MAX_FLOWS, value_parser = RangedU64ValueParser::<usize>::new().range(1..=16_777_216))]
    pub max_flows: usize,
    /// Where pods and their mesh intent come from: file:PATH (a `kubectl get pods -o json`
    /// document, reloaded when it changes), kubernetes (the API server, this node's pods), or none.
    #[arg(long, default_value = "none", value_parser = Source::from_str)]
    pub inventory: Source,
    /// Verdict policy, a JSON file (proxy process names, expected plaintext); defaults otherwise.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// What records keep of the payload: the fingerprint (default), or also a redacted HTTP
    /// head (header names, no values, no query string). Raw payload never leaves the agent.
    #[arg(long, value_enum, default_value_t = Evidence::Fingerprint)]
    pub evidence: Evidence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Evidence {
    /// The fingerprint only: TLS version, SNI, ALPN; for plaintext the protocol and, for HTTP,
    /// the method and the path without its query string.
    Fingerprint,
    /// Also the HTTP/1 head of each flow's first sample, every header value and the query string
    /// replaced by `<redacted>`, in records and the API (never in metrics).
    Redacted,
}

/// The records kept for queries: recent flows, and apart from them bypasses and other flagged.
#[derive(clap::Args, Clone, Copy, Debug)]
#[command(next_help_heading = "Queries")]
pub struct StoreConfig {
    /// Recent flow records kept for queries.
    #[arg(long, default_value_t = DEFAULT_STORE_FLOWS, value_parser = store_size())]
    pub store_flows: usize,
    /// Flagged flow records other than bypasses (plaintext) kept apart from the rest.
    #[arg(long, default_value_t = DEFAULT_STORE_FLAGGED, value_parser = store_size())]
    pub store_flagged: usize,
    /// Bypass records (bypass-plaintext, bypass-tls) kept apart from all others: only newer
    /// bypasses evict one.
    #[arg(long, default_value_t = DEFAULT_STORE_BYPASS, value_parser = store_size())]
    pub store_bypass: usize,
}

fn store_size() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(1..=10_000_000)
}

/// The endpoints: metrics and health, the API.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Serving")]
pub struct ServeConfig {
    /// Where to serve /metrics, /healthz and /readyz; "off" serves nothing.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_addr_or_off)]
    pub metrics_addr: OrOff<SocketAddr>,
    /// Flow label sets /metrics keeps before folding new ones into one `_overflow` series.
    #[arg(long, default_value_t = DEFAULT_MAX_SERIES, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_series: usize,
    /// The API's unix socket (mode 0600); "off" serves none.
    #[arg(long, default_value = DEFAULT_SOCKET, value_parser = parse_path_or_off, value_name = "PATH")]
    pub api_socket: OrOff<PathBuf>,
    /// Also serve the API on TCP at this address, requiring the bearer token in --api-token-file.
    #[arg(long, requires = "api_token_file", value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// File holding the API's bearer token (16 characters or more).
    #[arg(long, requires = "api_addr", value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
}

impl ServeConfig {
    /// The API on TCP, with the file its bearer token is read from.
    pub fn api_tcp(&self) -> Option<(SocketAddr, &std::path::Path)> {
        self.api_addr.zip(self.api_token_file.as_deref())
    }
}

/// A setting that "off" turns off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrOff<T>(pub Option<T>);

fn parse_addr_or_off(s: &str) -> Result<OrOff<SocketAddr>, String> {
    if s == "off" {
        return Ok(OrOff(None));
    }
    s.parse()
        .map(|a| OrOff(Some(a)))
        .map_err(|_| format!("{s:?} is not an address:port (e.g. 0.0.0.0:9464) or \"off\""))
}

fn parse_path_or_off(s: &str) -> Result<OrOff<PathBuf>, String> {
    match s {
        "off" => Ok(OrOff(None)),
        "" => Err("give a path, or \"off\"".into()),
        path => Ok(OrOff(Some(path.into()))),
    }
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

/// `NODE_NAME` (the DaemonSet sets it from the downward API), else the host name.
pub fn default_node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Agent {
        #[command(flatten)]
        config: AgentConfig,
    }

    fn parse(args: &[&str]) -> Result<AgentConfig, String> {
        Agent::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map(|a| a.config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_defaults_are_the_named_constants() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.kernel.flow_map_size, DEFAULT_FLOW_MAP_SIZE);
        assert_eq!(c.kernel.ringbuf_bytes, DEFAULT_RINGBUF_BYTES);
        assert_eq!(
            c.kernel.pin_root(),
            Some(std::path::Path::new(DEFAULT_PIN_DIR))
        );
        assert_eq!(c.kernel.on_exit, OnExit::Keep);
        assert_eq!(c.flows.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(c.flows.inventory, Source::None);
        assert_eq!(c.flows.evidence, Evidence::Fingerprint);
        assert_eq!(c.store.store_flows, DEFAULT_STORE_FLOWS);
        assert_eq!(c.store.store_flagged, DEFAULT_STORE_FLAGGED);
        assert_eq!(c.store.store_bypass, DEFAULT_STORE_BYPASS);
        assert_eq!(
            c.serve.metrics_addr.0,
            Some(DEFAULT_METRICS_ADDR.parse().unwrap())
        );
        assert_eq!(c.serve.max_series, DEFAULT_MAX_SERIES);
        assert_eq!(c.serve.api_socket.0, Some(DEFAULT_SOCKET.into()));
        assert_eq!(c.serve.api_tcp(), None);
        assert_eq!(c.node.log_format, LogFormat::Text);
        assert!(!c.node.log_flows);
    }

    #[test]
    fn off_turns_endpoints_and_pins_off() {
        let c = parse(&[
            "--metrics-addr",
            "off",
            "--api-socket",
            "off",
            "--bpf-pin-dir",
            "off",
        ])
        .unwrap();
        assert_eq!(c.serve.metrics_addr.0, None);
        assert_eq!(c.serve.api_socket.0, None);
        assert_eq!(c.kernel.pin_root(), None);
    }

    #[test]
    fn bad_values_are_refused_with_what_to_give() {
        for (args, says) in [
            (&["--metrics-addr", "9464"][..], "is not an address:port"),
            (&["--ringbuf-bytes", "5000"], "try 8192"),
            (&["--ringbuf-bytes", "1024"], "at least 4096"),
            (&["--ringbuf-bytes", "many"], "invalid digit"),
            (&["--flow-map-size", "8"], "64..=16777216"),
            (&["--max-flows", "0"], "1..=16777216"),
            (&["--store-bypass", "0"], "1..=10000000"),
            (&["--inventory", "etcd"], "is not an inventory source"),
            (&["--api-socket", ""], "give a path"),
            (&["--api-addr", "127.0.0.1:1"], "--api-token-file"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_tcp_api_comes_with_its_token_file() {
        let c = parse(&["--api-addr", "127.0.0.1:9465", "--api-token-file", "/t"]).unwrap();
        let (addr, file) = c.serve.api_tcp().unwrap();
        assert_eq!(addr.port(), 9465);
        assert_eq!(file, std::path::Path::new("/t"));
    }
}
