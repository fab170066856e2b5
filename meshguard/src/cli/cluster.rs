//! `meshguard flows --cluster`: every node's agent at once. The agent pods are found through the
//! Kubernetes API (a label selector in the agents' namespace) and asked through the API
//! server's pod proxy, so that access is plain Kubernetes RBAC: list pods and get pods/proxy. The
//! agents' API token comes from `--token-file`, else from its Secret for those allowed to read
//! it (the viewer Role is not). The API server strips `Authorization` before proxying, so the
//! token travels in `X-Meshguard-Token`.
//!
//! Agents are asked concurrently, each within a timeout. The answers are merged newest first
//! (`--last N` keeps the newest N of the merge); an agent that gives no answer is reported
//! beside them, and only every agent failing is an error.

use std::{collections::BTreeSet, fmt::Write as _, io::Write as _, path::PathBuf, time::Duration};

use futures::{stream, StreamExt as _};
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use serde::{Deserialize, Serialize};

use crate::{
    api::types::{FlowQuery, FlowsAnswer, TOKEN_HEADER},
    cli::{
        display::printable,
        render::{color, header, row},
        CliError, Output,
    },
    flow::record::FlowRecord,
};

/// The key of the token in that Secret.
pub const TOKEN_KEY: &str = "token";
/// The agent container's port for its TCP API (`--api-addr`), by name.
pub const API_PORT_NAME: &str = "api";
/// Agents asked at once.
const MAX_CONCURRENT_AGENTS: usize = 32;

/// Where the agents are and how to reach the API server.
#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: String,
    pub selector: String,
    pub token_secret: String,
    /// Overrides the Secret.
    pub token_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub kube_context: Option<String>,
    /// For each agent, and for each API server request.
    pub timeout: Duration,
}

/// One agent pod to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub pod: String,
    pub port: u16,
}

/// An agent that gave no answer, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub node: String,
    pub pod: String,
    pub error: String,
}

/// The agent pods that can be asked, and those that cannot (not running, no API port), each in
/// node order.
pub fn targets(pods: &[Pod]) -> (Vec<Target>, Vec<Failure>) {
    let mut ready = Vec::new();
    let mut failed = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let node = spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| "(unscheduled)".into());
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Unknown");
        let port = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(API_PORT_NAME))
            .and_then(|p| u16::try_from(p.container_port).ok());
        let error = if phase != "Running" {
            format!("the pod is {phase}, not Running")
        } else if let Some(port) = port {
            ready.push(Target {
                node,
                pod: name,
                port,
            });
            continue;
        } else {
            format!(
                "the pod has no container port named {API_PORT_NAME:?}: is the agent serving \
                 its TCP API (--api-addr)?"
            )
        };
        failed.push(Failure {
            node,
            pod: name,
            error,
        });
    }
    ready.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    failed.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    (ready, failed)
}

/// The API server path that proxies to an agent's `/v1/flows` (plain http to the pod).
pub fn proxy_path(namespace: &str, target: &Target, query: &str) -> String {
    let mut path = format!(
        "/api/v1/namespaces/{namespace}/pods/{}:{}/proxy/v1/flows",
        target.pod, target.port
    );
    if !query.is_empty() {
        path.push('?');
        path.push_str(query);
    }
    path
}

/// Why an answer holds no flows: the agent's `{"error"}`, the API server's `Status` message
/// (an unreachable pod), or the start of whatever else came back.
pub fn failure_reason(status: u16, body: &[u8]) -> String {
    /// The agent's error body, or the API server's `Status`.
    #[derive(Deserialize)]
    struct Said {
        error: Option<String>,
        message: Option<String>,
    }
    let said = serde_json::from_slice::<Said>(body)
        .ok()
        .and_then(|s| s.error.or(s.message));
    let said = said.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text.to_string(),
        }
    });
    let hint = match status {
        401 => " (the token does not match the agent's --api-token-file: check the Secret)",
        403 => " (RBAC: `get` on pods/proxy in the agents' namespace is needed)",
        _ => "",
    };
    format!("HTTP {status}: {said}{hint}")
}

/// The flows of one agent's `/v1/flows` answer.
pub fn answer_flows(body: &[u8]) -> Result<Vec<FlowRecord>, String> {
    match serde_json::from_slice::<FlowsAnswer>(body) {
        Ok(answer) => Ok(answer.flows),
        Err(e) if e.is_data() => Err(format!(
            "the answer has no \"flows\" list this meshguard reads: {e}"
        )),
        Err(e) => Err(format!("the answer is not JSON: {e}")),
    }
}

/// Merges the nodes' answers newest first (by last activity), keeping at most `last`. Every
/// record names its node (the agent's own `node`, else the pod's node). Equal times keep node
/// order, then each agent's own order.
pub fn merge(answers: Vec<(String, Vec<FlowRecord>)>, last: Option<usize>) -> Vec<FlowRecord> {
    let mut merged: Vec<FlowRecord> = Vec::new();
    for (node, flows) in answers {
        for mut f in flows {
            if f.node.is_empty() {
                f.node = node.as_str().into();
            }
            merged.push(f);
        }
    }
    merged.sort_by_key(|f| std::cmp::Reverse(f.last_seen.0));
    if let Some(n) = last {
        merged.truncate(n);
    }
    merged
}

/// What `flows --cluster` prints on stdout, given the merge (newest first). Like a single
/// agent's output, the newest comes last; tables carry a NODE column; JSON names the agents
/// that failed in `failed_agents`, JSON lines in one trailing `{"failed_agent": ...}` line each.
pub fn render(
    merged: &[FlowRecord],
    answered: &[String],
    failures: &[Failure],
    output: Output,
    color: bool,
) -> String {
    /// `-o json`: the merge, and which agents answered.
    #[derive(Serialize)]
    struct Merged<'a> {
        flows: Vec<&'a FlowRecord>,
        answered: &'a [String],
        failed_agents: &'a [Failure],
    }
    /// `-o jsonl`: an agent that gave no answer, after the records.
    #[derive(Serialize)]
    struct FailedAgent<'a> {
        failed_agent: &'a Failure,
    }
    let mut out = String::new();
    let oldest_first = merged.iter().rev();
    match output {
        Output::Json => {
            let doc = Merged {
                flows: oldest_first.collect(),
                answered,
                failed_agents: failures,
            };
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            );
        }
        Output::Jsonl => {
            for f in oldest_first {
                let _ = writeln!(out, "{}", serde_json::to_string(f).unwrap_or_default());
            }
            for failure in failures {
                let line = FailedAgent {
                    failed_agent: failure,
                };
                let _ = writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default());
            }
        }
        Output::Table | Output::Wide => {
            let _ = writeln!(out, "{}", header(output, true));
            for f in oldest_first {
                let _ = writeln!(out, "{}", row(f, output, color, true));
            }
        }
    }
    out
}

/// The stderr line for an agent that gave no answer: its error may quote the agent or the API
/// server, so it is made printable whole.
pub fn failure_line(f: &Failure) -> String {
    let line = format!(
        "warning: no answer from node {} (pod {}): {}",
        f.node, f.pod, f.error
    );
    printable(&line).into_owned()
}

/// A Kubernetes client from `--kubeconfig`/`--kube-context`, else the usual search (KUBECONFIG,
/// ~/.kube/config, the in-cluster service account).
async fn kube_client(opts: &Options) -> Result<Client, CliError> {
    let context = KubeConfigOptions {
        context: opts.kube_context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match (&opts.kubeconfig, &opts.kube_context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| CliError::Usage(format!("--kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &context)
                .await
                .map_err(|e| CliError::Usage(format!("--kubeconfig {}: {e}", path.display())))?
        }
        (None, Some(name)) => Config::from_kubeconfig(&context)
            .await
            .map_err(|e| CliError::Usage(format!("--kube-context {name}: {e}")))?,
        (None, None) => Config::infer().await.map_err(|e| {
            CliError::Failed(format!(
                "--cluster: no kubeconfig (KUBECONFIG, ~/.kube/config) and not in a pod: {e}"
            ))
        })?,
    };
    // The client's default retries 503s with backoff for minutes; here a 503 is an
    // unreachable node, to be reported at once.
    config.default_retry = false;
    Client::try_from(config)
        .map_err(|e| CliError::Failed(format!("--cluster: the Kubernetes client: {e}")))
}

/// A failed API server request, said for a person, with the RBAC it needs when refused.
fn api_error(what: &str, needs: &str, e: kube::Error) -> CliError {
    CliError::Failed(match e {
        kube::Error::Api(s) if s.code == 401 => format!(
            "{what}: {} (the API server refused your credentials: log in again?)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 403 => {
            format!("{what}: {} (this needs {needs})", s.message)
        }
        kube::Error::Api(s) => format!("{what}: {}", s.message),
        other => format!("{what}: cannot reach the Kubernetes API server: {other}"),
    })
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| CliError::Failed(format!("{what}: no answer within {timeout:?}")))?
}

/// The agents' API token: `--token-file`, else the Secret.
async fn token(client: &Client, opts: &Options) -> Result<String, CliError> {
    if let Some(path) = &opts.token_file {
        return std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", path.display())));
    }
    let (ns, name) = (&opts.namespace, &opts.token_secret);
    let what = format!("reading the agents' API token from Secret {ns}/{name}");
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| {
            api_error(
                &what,
                &format!(
                    "`get` on secrets/{name} in {ns}, which the meshguard-viewer Role does not \
                     grant; pass the token with --token-file"
                ),
                e,
            )
        })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .ok_or_else(|| CliError::Failed(format!("{what}: it has no key {TOKEN_KEY:?}")))?;
    let token = String::from_utf8_lossy(&bytes.0).trim().to_string();
    if token.is_empty() {
        return Err(CliError::Failed(format!("{what}: the token is empty")));
    }
    Ok(token)
}

/// Asks one agent through the pod proxy for its flows.
async fn ask(
    client: &Client,
    namespace: &str,
    target: &Target,
    query: &str,
    token: &str,
) -> Result<Vec<FlowRecord>, String> {
    let request = hyper::Request::get(proxy_path(namespace, target, query))
        .header(TOKEN_HEADER, token)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| e.to_string())?;
    let response = client
        .send(request)
        .await
        .map_err(|e| format!("the API server could not be asked: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("the answer broke off: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(failure_reason(status.as_u16(), &body));
    }
    answer_flows(&body)
}

/// Every node's agent's answer to `query`, by node: the agents that answered, with those that
/// did not (already said on stderr). An error when none answered.
pub async fn gather(
    opts: &Options,
    query: &FlowQuery,
) -> Result<(Vec<(String, Vec<FlowRecord>)>, Vec<String>, Vec<Failure>), CliError> {
    let qs = query.to_query();
    let client = kube_client(opts).await?;
    let (ns, selector) = (&opts.namespace, &opts.selector);
    let what = format!("listing the agent pods in {ns} ({selector})");
    let pods = within(opts.timeout, &what, async {
        Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| api_error(&what, &format!("`list` on pods in {ns}"), e))
    })
    .await?;
    let (targets, mut failures) = targets(&pods.items);
    if targets.is_empty() && failures.is_empty() {
        return Err(CliError::Failed(format!(
            "no agent pods in namespace {ns} match {selector}: is meshguard deployed there? \
             (--agent-namespace, --agent-selector)"
        )));
    }
    let token = if targets.is_empty() {
        String::new()
    } else {
        within(
            opts.timeout,
            "reading the agents' API token",
            token(&client, opts),
        )
        .await?
    };

    let asks = targets.iter().map(|t| {
        let (client, qs, token) = (&client, &qs, &token);
        async move {
            let answer = tokio::time::timeout(opts.timeout, ask(client, ns, t, qs, token))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", opts.timeout)));
            (t, answer)
        }
    });
    // A bounded number at a time, to spare the API server on large clusters; each agent's
    // timeout starts when it is asked.
    let results: Vec<_> = stream::iter(asks)
        .buffer_unordered(MAX_CONCURRENT_AGENTS)
        .collect()
        .await;
    let mut answers = Vec::new();
    let mut answered = Vec::new();
    for (target, answer) in results {
        match answer {
            Ok(flows) => {
                answered.push(target.node.clone());
                answers.push((target.node.clone(), flows));
            }
            Err(error) => failures.push(Failure {
                node: target.node.clone(),
                pod: target.pod.clone(),
                error,
            }),
        }
    }
    // They finish in any order: report and merge in node order.
    answered.sort();
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    failures.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    for f in &failures {
        eprintln!("{}", failure_line(f));
    }
    if answered.is_empty() {
        let nodes: BTreeSet<&str> = failures.iter().map(|f| f.node.as_str()).collect();
        return Err(CliError::Failed(format!(
            "no agent answered ({} asked, on {})",
            failures.len(),
            nodes.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok((answers, answered, failures))
}

/// `meshguard flows --cluster`: the newest `last` of the merge when given.
pub async fn flows(
    opts: &Options,
    query: &FlowQuery,
    last: Option<usize>,
    output: Output,
) -> Result<(), CliError> {
    let (answers, answered, failures) = gather(opts, query).await?;
    let merged = merge(answers, last);
    let mut out = std::io::stdout().lock();
    out.write_all(render(&merged, &answered, &failures, output, color()).as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::{
        fingerprint::Encryption,
        flow::record::{tests::record, Endpoint, Timestamp},
        verdict::{Party, Verdict},
    };

    fn flow(id: &str, node: Option<&str>, last_seen: &str) -> FlowRecord {
        let at = humantime::parse_rfc3339(last_seen).unwrap();
        let mut f = (*record(u64::from_str_radix(id, 16).unwrap(), Verdict::Mtls, at)).clone();
        f.last_seen = Timestamp(at);
        f.reason = "mesh".into();
        f.encryption = Encryption::Tls;
        let pod = |pod| Party::Pod {
            namespace: "shop",
            pod,
            workload: "web",
            meshed: true,
        };
        f.local = Endpoint::new("10.0.0.1:40000".parse().unwrap(), pod("web-1"));
        f.remote = Endpoint::new("10.0.0.2:9080".parse().unwrap(), pod("api-1"));
        f.node = node.unwrap_or_default().into();
        f
    }

    /// The ids as [`flow`] was given them.
    fn ids(flows: &[FlowRecord]) -> Vec<String> {
        flows.iter().map(|f| format!("{:x}", f.id.0)).collect()
    }

    #[test]
    fn merged_newest_first_and_cut_after_merging() {
        let answers = vec![
            (
                "node-a".to_string(),
                vec![
                    flow("a2", Some("node-a"), "2026-11-28T22:31:40.000Z"),
                    flow("a1", Some("node-a"), "2026-11-28T22:31:30.000Z"),
                ],
            ),
            (
                "node-c".to_string(),
                vec![
                    flow("c2", None, "2026-11-28T22:31:45.500Z"),
                    flow("c1", None, "2026-11-28T22:31:35.000Z"),
                ],
            ),
        ];
        let all = merge(answers.clone(), None);
        assert_eq!(ids(&all), ["c2", "a2", "c1", "a1"]);
        assert_eq!(
            &*all[0].node, "node-c",
            "a record without a node gets its pod's"
        );
        assert_eq!(ids(&merge(answers, Some(3))), ["c2", "a2", "c1"]);
    }

    #[test]
    fn equal_times_keep_node_then_agent_order() {
        let t = "2026-11-28T22:31:40.000Z";
        let answers = vec![
            ("a".into(), vec![flow("a1", None, t), flow("a2", None, t)]),
            ("b".into(), vec![flow("b1", None, t)]),
        ];
        assert_eq!(ids(&merge(answers, None)), ["a1", "a2", "b1"]);
    }

    #[test]
    fn rendered_oldest_at_the_top_with_nodes() {
        let merged = merge(
            vec![(
                "node-a".into(),
                vec![
                    flow("a2", Some("node-a"), "2026-11-28T22:31:40.000Z"),
                    flow("a1", Some("node-a"), "2026-11-28T22:31:30.000Z"),
                ],
            )],
            None,
        );
        let failed = [Failure {
            node: "node-b".into(),
            pod: "meshguard-x".into(),
            error: "HTTP 503: no route to host".into(),
        }];
        let answered = ["node-a".to_string()];

        let table = render(&merged, &answered, &failed, Output::Table, false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("TIME                NODE             VERDICT"));
        assert!(lines[1].starts_with("Nov 28 22:31:30.000 node-a           mtls"));
        assert!(lines[2].starts_with("Nov 28 22:31:40.000 node-a"));
        assert_eq!(lines.len(), 3, "failures go to stderr in tables");

        let wide = render(&merged, &answered, &failed, Output::Wide, false);
        assert_eq!(wide.lines().next().unwrap().matches("NODE").count(), 1);

        let doc: Value =
            serde_json::from_str(&render(&merged, &answered, &failed, Output::Json, false))
                .unwrap();
        let flows: Vec<FlowRecord> = serde_json::from_value(doc["flows"].clone()).unwrap();
        assert_eq!(ids(&flows), ["a1", "a2"]);
        assert_eq!(doc["answered"], json!(["node-a"]));
        assert_eq!(
            doc["failed_agents"],
            json!([{"node": "node-b", "pod": "meshguard-x", "error": "HTTP 503: no route to host"}])
        );

        let jsonl = render(&merged, &answered, &failed, Output::Jsonl, false);
        let lines: Vec<Value> = jsonl
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["node"], "node-a");
        assert_eq!(lines[2]["failed_agent"]["node"], "node-b");
    }

    #[test]
    fn no_control_character_reaches_the_terminal() {
        use crate::cli::{
            display::has_unsafe,
            render::tests::{poisoned, poisoned_answer, poisoned_record, POISON},
        };
        let flows = vec![(*poisoned_answer(&poisoned_record()).flow).clone()];
        let merged = merge(vec![(format!("node-a{POISON}"), flows)], None);
        let failed = [Failure {
            node: format!("node-b{POISON}"),
            pod: format!("meshguard-x{POISON}"),
            error: failure_reason(
                500,
                poisoned(&json!({"error": "agent"})).to_string().as_bytes(),
            ),
        }];
        for output in [Output::Table, Output::Wide] {
            let text = render(&merged, &["node-a".into()], &failed, output, false);
            assert!(text.lines().all(|l| !has_unsafe(l)), "{output:?}: {text:?}");
            assert!(text.contains("web-1\\x1b[2J\\x0d"), "{text}");
        }
        let warning = failure_line(&failed[0]);
        assert!(!has_unsafe(&warning), "{warning:?}");
        assert!(
            warning.contains("HTTP 500: agent\\x1b[2J\\x0d"),
            "{warning}"
        );
    }

    #[test]
    fn pods_to_targets() {
        let pod = |name: &str, node: &str, phase: &str, api_port: Option<i32>| -> Pod {
            let ports: Vec<Value> = [("metrics", Some(9464)), (API_PORT_NAME, api_port)]
                .into_iter()
                .filter_map(|(n, p)| p.map(|p| json!({"name": n, "containerPort": p})))
                .collect();
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "meshguard"},
                "spec": {"nodeName": node, "containers": [{"name": "meshguard", "ports": ports}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let (ready, failed) = targets(&[
            pod("mg-c", "node-c", "Running", Some(9465)),
            pod("mg-a", "node-a", "Running", Some(9465)),
            pod("mg-b", "node-b", "Pending", Some(9465)),
            pod("mg-d", "node-d", "Running", None),
        ]);
        assert_eq!(
            ready,
            [
                Target {
                    node: "node-a".into(),
                    pod: "mg-a".into(),
                    port: 9465
                },
                Target {
                    node: "node-c".into(),
                    pod: "mg-c".into(),
                    port: 9465
                },
            ]
        );
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].error, "the pod is Pending, not Running");
        assert!(failed[1].error.contains("no container port named \"api\""));
        assert_eq!(
            proxy_path("meshguard", &ready[0], "verdict=mtls&limit=5"),
            "/api/v1/namespaces/meshguard/pods/mg-a:9465/proxy/v1/flows?verdict=mtls&limit=5"
        );
        assert_eq!(
            proxy_path("meshguard", &ready[0], ""),
            "/api/v1/namespaces/meshguard/pods/mg-a:9465/proxy/v1/flows"
        );
    }

    #[test]
    fn why_an_agent_gave_no_flows() {
        let status = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"error trying to reach service: dial tcp 10.244.2.7:9465: connect: no route to host","reason":"ServiceUnavailable","code":503}"#;
        assert_eq!(
            failure_reason(503, status),
            "HTTP 503: error trying to reach service: dial tcp 10.244.2.7:9465: connect: no route to host"
        );
        let refused = failure_reason(401, br#"{"error":"missing or wrong token"}"#);
        assert!(refused.starts_with("HTTP 401: missing or wrong token (the token does not match"));
        assert_eq!(
            failure_reason(502, b"  bad gateway\n"),
            "HTTP 502: bad gateway"
        );
        assert!(answer_flows(br#"{"count":0,"flows":[]}"#)
            .unwrap()
            .is_empty());
        assert!(answer_flows(b"<html>").is_err());
        assert!(answer_flows(br#"{"count":0}"#).is_err());
    }
}
