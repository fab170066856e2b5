//! What the agent API (`/v1`) accepts and answers, shared by the server ([`crate::api`]) and the
//! CLI ([`crate::cli`]): the flow query, the flows answer, one flow explained, the follow
//! stream's lines, the agent's status and the error body. Plain data: nothing here reaches the
//! agent's state.
//!
//! Read back, unknown fields (from a newer agent) are ignored, and fields an older agent did not
//! send read as their default: the CLI's JSON output, which writes what it read, then lacks the
//! former and shows the latter.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    enforce::Action,
    fingerprint::Encryption,
    flow::record::FlowRecord,
    intent::contradicted,
    verdict::{OwnerKind, Verdict},
};

/// The header that carries the token through the Kubernetes API server's pod proxy, which
/// strips `Authorization` before proxying (kubernetes/kubernetes#38775): the server takes
/// either.
pub const TOKEN_HEADER: &str = "x-meshguard-token";

/// Records a query answers with when it does not say.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most records one query answers with.
pub const MAX_LIMIT: usize = 100_000;

/// What `/v1/flows` and `/v1/flows/stream` select on, as their query string says it. Every
/// field narrows; unset fields don't. (The store matches records against it.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowQuery {
    pub verdicts: Vec<Verdict>,
    /// Either end in this namespace.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    /// Either end on this port (the port a client dialled, or the socket's own).
    pub port: Option<u16>,
    /// Seen within this long.
    pub since: Option<Duration>,
    pub limit: usize,
}

impl Default for FlowQuery {
    fn default() -> Self {
        Self {
            verdicts: Vec::new(),
            namespace: None,
            pod: None,
            workload: None,
            port: None,
            since: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl FlowQuery {
    /// From a URL query string, as the API receives it.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| format!("malformed query string: {e}"))?;
        Self::from_params(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// From URL query parameters (`verdict=a,b&namespace=x&since=10m&limit=50`).
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut f = Self::default();
        for (key, value) in params {
            let value = value.trim();
            match key {
                "verdict" => {
                    for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        f.verdicts.push(v.parse()?);
                    }
                }
                "namespace" => f.namespace = Some(value.to_string()),
                "pod" => f.pod = Some(value.to_string()),
                "workload" => f.workload = Some(value.to_string()),
                "port" => f.port = Some(value.parse().map_err(|_| format!("port {value:?} is not a port number (1-65535)"))?),
                "since" => {
                    let d = humantime::parse_duration(value).map_err(|e| format!("since {value:?} is not a duration like 10m or 1h30m: {e}"))?;
                    f.since = Some(d);
                }
                "limit" => {
                    f.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit {value:?} is not a number from 1 to {MAX_LIMIT}"))?;
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; use verdict, namespace, pod, workload, port, since, limit"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The query string that asks for this query: [`FlowQuery::from_query`] gives it back.
    pub fn to_query(&self) -> String {
        let mut q: Vec<(&str, String)> = Vec::new();
        if !self.verdicts.is_empty() {
            let verdicts: Vec<&str> = self.verdicts.iter().map(|v| v.as_str()).collect();
            q.push(("verdict", verdicts.join(",")));
        }
        if let Some(since) = self.since {
            q.push(("since", humantime::format_duration(since).to_string()));
        }
        if self.limit != DEFAULT_LIMIT {
            q.push(("limit", self.limit.to_string()));
        }
        for (key, value) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("workload", &self.workload),
        ] {
            if let Some(v) = value {
                q.push((key, v.clone()));
            }
        }
        if let Some(port) = self.port {
            q.push(("port", port.to_string()));
        }
        serde_urlencoded::to_string(&q).unwrap_or_default()
    }
}

/// `GET /v1/flows`: the records that match, newest first. (The server writes it a chunk of
/// records at a time, in this shape.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowsAnswer {
    #[serde(default)]
    pub count: usize,
    pub flows: Vec<FlowRecord>,
}

/// A line of `GET /v1/flows/stream` (JSON lines): a new record, or a warning to the follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamLine {
    Warning(Warning),
    Record(Box<FlowRecord>),
}

/// What the stream tells a follower it should know (that it skipped records, say).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub warning: String,
}

/// A 4xx or 5xx answer's body: what was wrong, for a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/flows/{id}`: the record, and what it rests on one fact a line (`meshguard
/// explain`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub flow: Arc<FlowRecord>,
    pub evidence: Vec<String>,
}

impl Explanation {
    pub fn of(flow: Arc<FlowRecord>) -> Self {
        let evidence = evidence(&flow);
        Self { flow, evidence }
    }
}

/// What the kernel and the inventory said of a flow, one fact a line.
fn evidence(r: &FlowRecord) -> Vec<String> {
    let mut lines = vec![
        format!(
            "socket: {} {} {}:{} -> {}:{} (the {}'s end)",
            r.protocol,
            r.direction,
            r.local.ip,
            r.local.port,
            r.remote.ip,
            r.remote.port,
            r.direction.end()
        ),
        format!("local end: {}", r.local.party().described()),
        format!("remote end: {}", r.remote.party().described()),
    ];
    lines.push(match (&r.owner.container, r.owner.kind) {
        (Some(c), OwnerKind::Proxy) => format!("socket created in container {c}: the mesh proxy"),
        (Some(c), _) => format!("socket created in container {c}: not the mesh proxy"),
        (None, OwnerKind::Sandbox) => {
            "socket created in the pod's sandbox, outside its containers".to_string()
        }
        (None, OwnerKind::Host) => {
            "socket created by a process of the node, outside every pod".to_string()
        }
        _ => "socket's container: unknown (no cgroup evidence)".to_string(),
    });
    lines.push(match (&r.process.comm, r.process.pid, r.process.uid) {
        (Some(comm), Some(pid), Some(uid)) => {
            format!("process: {comm} (pid {pid}; its own name, a hint only), uid {uid}")
        }
        (_, _, Some(uid)) => format!("process: unknown, uid {uid}"),
        _ => "process: unknown".to_string(),
    });
    lines.push(if r.loopback {
        "delivery: over the loopback device only, inside one network namespace".to_string()
    } else {
        "delivery: over a network device".to_string()
    });
    lines.push(match (&r.redirect, r.local.dialled) {
        (Some(to), _) => format!(
            "netfilter: egress redirected to {}:{} (interface {})",
            to.ip, to.port, to.ifindex
        ),
        (None, Some(dialled)) => format!(
            "netfilter: the client dialled {dialled}, redirected to this socket ({}:{}): a capture",
            r.local.ip, r.local.port
        ),
        (None, None) => "netfilter: not redirected".to_string(),
    });
    if let Some(p) = &r.policy {
        lines.push(match &p.object {
            Some(o) => format!(
                "declared: {o} sets {} for the server's port {}",
                p.mode.as_str(),
                p.port
            ),
            None => format!(
                "declared: no PeerAuthentication sets a mode for the server's port {}: Istio's default, {}",
                p.port,
                p.mode.as_str()
            ),
        });
    }
    if let Some(rule) = r.policy.as_ref().and_then(|p| p.destination_rule.as_ref()) {
        lines.push(format!(
            "declared: {} sets tls {} for the client's sidecar towards {}:{}",
            rule.reference(),
            rule.tls.as_str(),
            rule.host,
            rule.port
        ));
    }
    if let (Some(action), Some(rule)) = (r.action, r.action_rule) {
        lines.push(match action {
            Action::Refused => format!("enforcement: refused ({rule}): the kernel dropped every payload packet from the first, and the agent reset the connection"),
            Action::WouldRefuse => format!("enforcement: would refuse ({rule}) in mode enforce; audit let it pass"),
        });
    }
    if let Some(c) = r.contradiction {
        let by = match contradicted(r) {
            Some((Some(object), mode)) => format!(" ({object}, {mode})"),
            Some((None, mode)) => format!(" (Istio's default, {mode})"),
            None => String::new(),
        };
        lines.push(format!("contradiction: {c}{by}: {}", c.describe()));
    }
    lines.push(match (&r.tls, &r.plaintext) {
        (None, None) if r.encryption.is_encrypted() => {
            format!("payload: {} (encrypted)", r.encryption.word())
        }
        (Some(tls), _) if r.encryption != Encryption::Tls => format!(
            "payload: a ClientHello{} then {}, not TLS",
            if tls.alpn.is_empty() {
                String::new()
            } else {
                format!(" offering ALPN {}", tls.alpn.join(","))
            },
            r.plaintext
                .as_ref()
                .map_or("plaintext", |p| p.protocol.as_str())
        ),
        (Some(tls), _) => format!(
            "payload: TLS{}{}{}",
            tls.version
                .map(|v| format!(" {}", v.name()))
                .unwrap_or_default(),
            tls.sni
                .as_ref()
                .map(|s| format!(", SNI {s}"))
                .unwrap_or_default(),
            if tls.alpn.is_empty() {
                String::new()
            } else {
                format!(", ALPN {}", tls.alpn.join(","))
            }
        ),
        (None, Some(p)) => format!(
            "payload: plaintext ({}{}{})",
            p.protocol,
            p.method
                .as_ref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default(),
            p.path
                .as_ref()
                .map(|path| format!(" {path}"))
                .unwrap_or_default()
        ),
        (None, None) => "payload: none seen yet".to_string(),
    });
    if let Some(head) = &r.redacted_sample {
        lines.push(format!(
            "redacted sample (--evidence redacted): {}",
            head.replace('\n', " | ")
        ));
    }
    lines.push(format!(
        "bytes: {} sent, {} received",
        r.bytes_sent, r.bytes_received
    ));
    lines.push(format!(
        "verdict: {} ({}): {}",
        r.verdict.as_str(),
        r.reason,
        r.detail
    ));
    if let Some(c) = &r.corrected_from {
        lines.push(format!(
            "corrected: the flow's first record said {} ({}); later evidence changed it",
            c.verdict.as_str(),
            c.reason
        ));
    }
    lines
}

/// `GET /v1/status` and `meshguard status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub version: String,
    pub node: String,
    /// Kernel release.
    pub kernel: String,
    pub started_at: String,
    pub programs_attached: Vec<String>,
    /// What does not work and what it costs, in words.
    pub degraded: Vec<String>,
    pub inventory: InventoryStatus,
    /// Container cgroups found on the node: how sockets are traced to the container that owns
    /// them (0: by uid and process name only).
    pub container_cgroups: usize,
    pub flow_map: MapStatus,
    /// Losses since start, by where.
    pub events_lost: BTreeMap<String, u64>,
    pub flows_tracked: usize,
    /// Flows reported from the kernel's flow map because their events were lost.
    pub flows_recovered: u64,
    /// The kernel side was taken over from an earlier agent (pinned), not attached anew.
    pub adopted: bool,
    /// Records held by each store: the recent, the flagged (not bypasses), the bypasses.
    pub flows_stored: usize,
    pub flagged_stored: usize,
    pub bypass_stored: usize,
    /// Records each store evicted to make room since start: a growing count means its flag
    /// (--store-flows, --store-flagged, --store-bypass) is too small for the node's traffic.
    pub store_evicted: Evicted,
    /// Walks of the kernel's flow map since start, and what they met.
    pub reconcile: ReconcileStatus,
    /// Repairs of the kernel side, newest last (at most `state::REPAIRS_KEPT`): pins removed
    /// behind the agent's back, programs found detached, generations drained on an upgrade.
    pub kernel_repairs: Vec<String>,
    /// Connections the endpoints closed at once because a limit was reached, since start.
    pub connections_refused: u64,
    /// Enforcement by namespace of the pods with a sidecar on this node.
    pub enforcement: Vec<NamespaceEnforcement>,
    /// Container cgroups enforced or audited now.
    pub enforced_cgroups: usize,
    /// What the kernel keeps doing when the agent stops: `open` (refuses nothing once the
    /// agent's word lapses) or `keep`.
    pub enforcement_on_exit: String,
    /// Enforcement's own trouble (maps that could not be written), if any.
    pub enforcement_error: Option<String>,
}

/// One namespace's enforcement on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NamespaceEnforcement {
    pub namespace: String,
    /// `off`, `audit` or `enforce`: the namespace's label, else the policy's default.
    pub mode: String,
    /// `namespace` (its label) or `default`.
    pub source: String,
    /// Its pods with a sidecar on this node.
    pub pods: usize,
    /// Those whose own annotation or label sets another mode: `pod=mode`.
    pub overrides: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconcileStatus {
    pub passes: u64,
    /// Entries the last pass walked.
    pub last_scanned: usize,
    /// Keys walks returned twice (dropped), entries gone before their lookup, kernel errors,
    /// walks stopped at their bound: since start.
    pub repeated: u64,
    pub vanished: u64,
    pub errors: u64,
    pub cut: u64,
    /// Events and map entries of flows already published closed (dropped, not published again).
    pub duplicates_dropped: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InventoryStatus {
    pub source: String,
    pub pods: usize,
    /// Seconds since it last changed; `None` before the source delivered anything.
    pub age_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MapStatus {
    pub entries: usize,
    pub capacity: u32,
}

/// Records each of the agent's stores pushed out to make room, since start (a record replaced
/// by its flow's later one is not evicted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Evicted {
    pub recent: u64,
    pub flagged: u64,
    pub bypass: u64,
}

impl Evicted {
    /// By store, as `meshguard_store_evicted_total{store}` names them.
    pub fn by_store(&self) -> [(&'static str, u64); 3] {
        [
            ("recent", self.recent),
            ("flagged", self.flagged),
            ("bypass", self.bypass),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{flow::record::tests::record, verdict::Verdict};

    #[test]
    fn a_status_reads_back_as_the_agent_wrote_it() {
        let mut s = Status {
            version: "0.1.0".into(),
            node: "kind-worker".into(),
            programs_attached: vec!["sock_ops".into()],
            degraded: vec!["no BTF".into()],
            events_lost: BTreeMap::from([("ringbuf_full".into(), 3)]),
            kernel_repairs: vec!["2026-11-28T22:00:00Z re-pinned".into()],
            adopted: true,
            ..Status::default()
        };
        s.inventory.age_seconds = Some(3);
        s.store_evicted.bypass = 2;
        s.reconcile.cut = 1;
        for s in [Status::default(), s] {
            let json = serde_json::to_string(&s).unwrap();
            let back: Status = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        // An older agent's, without what came later.
        let old: Status = serde_json::from_str(r#"{"node":"n","inventory":{"pods":12}}"#).unwrap();
        assert_eq!((old.node.as_str(), old.inventory.pods), ("n", 12));
    }

    #[test]
    fn an_explanation_and_stream_lines_read_back() {
        let r = record(0xabc, Verdict::BypassPlaintext, SystemTime::UNIX_EPOCH);
        let explained = Explanation::of(Arc::clone(&r));
        let json = serde_json::to_string(&explained).unwrap();
        let back: Explanation = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.evidence, explained.evidence);

        let line = serde_json::to_string(&*r).unwrap();
        assert!(matches!(
            serde_json::from_str(&line).unwrap(),
            StreamLine::Record(read) if serde_json::to_string(&read).unwrap() == line
        ));
        let warning = serde_json::to_string(&StreamLine::Warning(Warning {
            warning: "skipped 3 flows".into(),
        }))
        .unwrap();
        assert_eq!(warning, r#"{"warning":"skipped 3 flows"}"#);
        assert!(matches!(
            serde_json::from_str(&warning).unwrap(),
            StreamLine::Warning(Warning { warning }) if warning == "skipped 3 flows"
        ));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let cases = [
            (
                ("verdict", "bypass"),
                "unknown verdict \"bypass\"; use one of mtls, bypass-plaintext",
            ),
            (("port", "http"), "port \"http\" is not a port number"),
            (
                ("since", "yesterday"),
                "since \"yesterday\" is not a duration",
            ),
            (
                ("limit", "0"),
                "limit \"0\" is not a number from 1 to 100000",
            ),
            (("limit", "-5"), "limit \"-5\" is not a number"),
            (("colour", "red"), "unknown parameter \"colour\""),
        ];
        for (param, want) in cases {
            let e = FlowQuery::from_params([param]).unwrap_err();
            assert!(e.starts_with(want), "{param:?}: {e}");
        }
    }

    #[test]
    fn a_filter_round_trips_through_its_query_string() {
        let cases = [
            ("", ""),
            ("limit=1000", ""),
            (
                "verdict=mtls, bypass-tls&namespace=shop&since=90m&port=80&limit=5",
                "verdict=mtls%2Cbypass-tls&since=1h+30m&limit=5&namespace=shop&port=80",
            ),
            ("pod=a%26b%3Dc&workload=", "pod=a%26b%3Dc&workload="),
            ("since=1y2M3d&verdict=", "since=1year+2months+3days"),
        ];
        for (query, canonical) in cases {
            let filter = FlowQuery::from_query(query).unwrap();
            assert_eq!(filter.to_query(), canonical, "{query}");
            assert_eq!(FlowQuery::from_query(canonical), Ok(filter), "{query}");
        }
    }
}
