//! `meshguard flows --cluster` against a replayed Kubernetes API server: recorded answers (the
//! agent pods, the token Secret, the agents' /v1/flows through the pod proxy) served on
//! 127.0.0.1, a kubeconfig pointing at it, and the real binary. No cluster and no root needed.

#![cfg(feature = "kubernetes")]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::Value;

const NS_PATH: &str = "/api/v1/namespaces/meshguard";
/// The token in fixtures/cluster/secret.json (base64 there).
const SECRET_TOKEN: &str = "5f0d3c9a81e24b7c6a1f9e0d2b8c4a7f3e6d1c9b0a5f8e2d7c4b1a6f3e0d9c8b";
/// The agent pods in fixtures/cluster/pods.json, by node.
const PODS: [(&str, &str); 3] = [
    ("kind-worker", "meshguard-7xk2p"),
    ("kind-worker2", "meshguard-q9d4m"),
    ("kind-worker3", "meshguard-z5rtn"),
];

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cluster")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One request the replayed API server received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: String,
    authorization: Option<String>,
    meshguard_token: Option<String>,
}

struct Replay {
    /// Pods whose proxy answers 503, as for a node the API server cannot reach.
    unreachable: BTreeSet<String>,
    /// Pods whose proxy answers only after a minute.
    stalled: BTreeSet<String>,
    seen: Mutex<Vec<Seen>>,
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

async fn answer(State(replay): State<Arc<Replay>>, uri: Uri, headers: HeaderMap) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let path = uri.path().to_string();
    replay.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        query: uri.query().unwrap_or("").to_string(),
        authorization: header("authorization"),
        meshguard_token: header("x-meshguard-token"),
    });
    let not_found = || {
        json(
            StatusCode::NOT_FOUND,
            format!(
                r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"the server could not find the requested resource ({path})","reason":"NotFound","code":404}}"#
            ),
        )
    };
    let Some(rest) = path.strip_prefix(NS_PATH) else {
        // Other namespaces hold no agents; listing pods there finds none, as on a real server.
        if path.starts_with("/api/v1/namespaces/") && path.ends_with("/pods") {
            return json(
                StatusCode::OK,
                r#"{"apiVersion":"v1","kind":"PodList","metadata":{"resourceVersion":"418311"},"items":[]}"#.into(),
            );
        }
        return not_found();
    };
    match rest {
        "/pods" => json(StatusCode::OK, fixture("pods.json")),
        "/secrets/meshguard-api-token" => json(StatusCode::OK, fixture("secret.json")),
        // Any other Secret is out of the on-call user's reach, as with the meshguard-viewer Role.
        _ if rest.starts_with("/secrets/") => {
            let name = &rest["/secrets/".len()..];
            json(
                StatusCode::FORBIDDEN,
                format!(
                    r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"secrets \"{name}\" is forbidden: User \"oncall\" cannot get resource \"secrets\" in API group \"\" in the namespace \"meshguard\"","reason":"Forbidden","details":{{"name":"{name}","kind":"secrets"}},"code":403}}"#
                ),
            )
        }
        _ => {
            let Some(target) = rest
                .strip_prefix("/pods/")
                .and_then(|r| r.strip_suffix("/proxy/v1/flows"))
            else {
                return not_found();
            };
            let Some((pod, "9465")) = target.split_once(':') else {
                return not_found();
            };
            let Some((node, _)) = PODS.iter().find(|(_, p)| *p == pod) else {
                return not_found();
            };
            if replay.stalled.contains(pod) {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
            if replay.unreachable.contains(pod) {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    fixture("proxy-unreachable.json"),
                );
            }
            json(StatusCode::OK, fixture(&format!("flows-{node}.json")))
        }
    }
}

/// A replayed API server and a kubeconfig for it, in a directory of their own.
struct ApiServer {
    replay: Arc<Replay>,
    dir: PathBuf,
}

impl ApiServer {
    fn start(unreachable: &[&str]) -> Self {
        Self::start_with(unreachable, &[])
    }

    fn start_with(unreachable: &[&str], stalled: &[&str]) -> Self {
        let set = |pods: &[&str]| pods.iter().map(|p| p.to_string()).collect();
        let replay = Arc::new(Replay {
            unreachable: set(unreachable),
            stalled: set(stalled),
            seen: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&replay));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let dir = std::env::temp_dir().join(format!("meshguard-cluster-test-{}", addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kubeconfig"), kubeconfig(addr)).unwrap();
        ApiServer { replay, dir }
    }

    fn meshguard(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_meshguard"))
            .args(args)
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("HOME", &self.dir)
            .env("NO_COLOR", "1")
            .env_remove("MESHGUARD_AGENT")
            .env_remove("MESHGUARD_TOKEN_FILE")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.replay.seen.lock().unwrap().clone()
    }

    fn proxied(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/proxy/"))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two contexts on the same server, with different users: `replay` (current) and `staging`.
fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: replay
  cluster:
    server: http://{addr}
contexts:
- name: replay
  context:
    cluster: replay
    user: oncall
    namespace: default
- name: staging
  context:
    cluster: replay
    user: staging-oncall
current-context: replay
users:
- name: oncall
  user:
    token: kube-token-oncall
- name: staging-oncall
  user:
    token: kube-token-staging
"#
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ids(flows: &[Value]) -> Vec<&str> {
    flows.iter().map(|f| f["id"].as_str().unwrap()).collect()
}

#[test]
fn merges_the_nodes_that_answer_and_names_the_one_that_did_not() {
    let api = ApiServer::start(&["meshguard-q9d4m"]);
    let out = api.meshguard(&["flows", "--cluster", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = doc["flows"].as_array().unwrap();
    // Newest at the bottom, as for one agent; both nodes interleaved by time.
    assert_eq!(
        ids(flows),
        [
            "00000000000049c6",
            "0000000000002e40",
            "0000000000004a1f",
            "0000000000002e55",
            "0000000000004b02",
            "0000000000002e71",
        ]
    );
    let nodes: Vec<&str> = flows.iter().map(|f| f["node"].as_str().unwrap()).collect();
    assert_eq!(
        nodes,
        [
            "kind-worker",
            "kind-worker3",
            "kind-worker",
            "kind-worker3",
            "kind-worker",
            "kind-worker3"
        ]
    );
    assert_eq!(
        doc["answered"],
        serde_json::json!(["kind-worker", "kind-worker3"])
    );
    let failed = doc["failed_agents"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["node"], "kind-worker2");
    assert_eq!(failed[0]["pod"], "meshguard-q9d4m");
    assert!(failed[0]["error"]
        .as_str()
        .unwrap()
        .contains("HTTP 503: error trying to reach service: dial tcp 10.244.2.7:9465: connect: no route to host"));

    let err = stderr(&out);
    assert!(
        err.contains("warning: no answer from node kind-worker2 (pod meshguard-q9d4m): HTTP 503"),
        "{err}"
    );

    // The agents were found by label, and the Secret's token went to every agent in
    // X-Meshguard-Token (the API server strips Authorization before proxying); the kubeconfig's
    // credentials went to the API server, and the agents' token nowhere else.
    let seen = api.seen();
    let list = seen
        .iter()
        .find(|s| s.path == format!("{NS_PATH}/pods"))
        .expect("the agent pods were listed");
    let params: Vec<(String, String)> = serde_urlencoded::from_str(&list.query).unwrap();
    assert!(
        params.contains(&(
            "labelSelector".into(),
            "app.kubernetes.io/name=meshguard".into()
        )),
        "{params:?}"
    );
    assert!(seen
        .iter()
        .any(|s| s.path == format!("{NS_PATH}/secrets/meshguard-api-token")));
    for s in &seen {
        assert_eq!(
            s.authorization.as_deref(),
            Some("Bearer kube-token-oncall"),
            "{s:?}"
        );
    }
    let proxied = api.proxied();
    let asked: BTreeSet<&str> = proxied.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        asked,
        PODS.iter()
            .map(|(_, pod)| format!("{NS_PATH}/pods/{pod}:9465/proxy/v1/flows"))
            .collect::<BTreeSet<_>>()
            .iter()
            .map(String::as_str)
            .collect()
    );
    for s in &seen {
        let want = s.path.contains("/proxy/").then_some(SECRET_TOKEN);
        assert_eq!(s.meshguard_token.as_deref(), want, "{s:?}");
    }
}

#[test]
fn filters_go_to_every_agent_and_last_cuts_the_merge() {
    let api = ApiServer::start(&["meshguard-q9d4m"]);
    let out = api.meshguard(&[
        "flows",
        "--cluster",
        "--verdict",
        "bypass-plaintext,bypass-tls",
        "-n",
        "shop",
        "--workload",
        "web",
        "--port",
        "5000",
        "--since",
        "1h",
        "--last",
        "2",
        "-o",
        "jsonl",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let proxied = api.proxied();
    assert_eq!(proxied.len(), 3);
    for s in &proxied {
        assert_eq!(
            s.query,
            "verdict=bypass-plaintext%2Cbypass-tls&since=1h&limit=2&namespace=shop&workload=web&port=5000",
            "{s:?}"
        );
    }
    // The replay ignores the filters: the CLI keeps the newest 2 of the merge, and names the
    // agent that failed on a trailing line.
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(ids(&lines[..2]), ["0000000000004b02", "0000000000002e71"]);
    assert_eq!(lines[0]["node"], "kind-worker");
    assert_eq!(lines[1]["node"], "kind-worker3");
    assert_eq!(lines[2]["failed_agent"]["node"], "kind-worker2");
    assert!(lines[2]["failed_agent"]["error"]
        .as_str()
        .unwrap()
        .starts_with("HTTP 503"));
}

#[test]
fn tables_have_a_node_column() {
    let api = ApiServer::start(&["meshguard-q9d4m"]);
    let out = api.meshguard(&["flows", "--cluster", "--last", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("TIME                NODE             VERDICT"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("Nov 28 22:31:39.020 kind-worker3     mtls"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("Nov 28 22:31:41.204 kind-worker      mtls"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("Nov 28 22:31:44.870 kind-worker3     bypass-tls"),
        "{text}"
    );
    assert!(lines[3].contains("vault/vault-0:8200"), "{text}");

    let wide = api.meshguard(&["flows", "--cluster", "--last", "1", "-o", "wide"]);
    assert_eq!(wide.status.code(), Some(0), "{}", stderr(&wide));
    let text = stdout(&wide);
    assert_eq!(text.lines().next().unwrap().matches("NODE").count(), 1);
    assert!(text.contains("0000000000002e71"), "{text}");
    assert!(
        text.contains("TLS 1.3 vault.vault.svc h2,http/1.1"),
        "{text}"
    );
}

#[test]
fn no_agent_answering_is_a_failure() {
    let api = ApiServer::start(&PODS.map(|(_, pod)| pod));
    let out = api.meshguard(&["flows", "--cluster"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    for (node, pod) in PODS {
        assert!(
            err.contains(&format!(
                "warning: no answer from node {node} (pod {pod}): HTTP 503"
            )),
            "{err}"
        );
    }
    assert!(
        err.contains(
            "error: no agent answered (3 asked, on kind-worker, kind-worker2, kind-worker3)"
        ),
        "{err}"
    );
}

#[test]
fn a_stalled_agent_is_given_up_on_after_its_timeout() {
    let api = ApiServer::start_with(&[], &["meshguard-z5rtn"]);
    let started = std::time::Instant::now();
    let out = api.meshguard(&["flows", "--cluster", "--agent-timeout", "1s", "-o", "jsonl"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let err = stderr(&out);
    assert!(
        err.contains(
            "warning: no answer from node kind-worker3 (pod meshguard-z5rtn): no answer within 1s"
        ),
        "{err}"
    );
    assert_eq!(
        stdout(&out).lines().count(),
        5 + 1,
        "two nodes' flows and the failed agent"
    );
}

#[test]
fn another_context_and_a_token_file() {
    let api = ApiServer::start(&[]);
    let token_file = api.dir.join("token");
    std::fs::write(&token_file, "a-token-from-a-file-0123456789\n").unwrap();
    let out = api.meshguard(&[
        "flows",
        "--cluster",
        "--kube-context",
        "staging",
        "--token-file",
        token_file.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["flows"].as_array().unwrap().len(), 8);
    assert_eq!(doc["failed_agents"], serde_json::json!([]));
    let seen = api.seen();
    assert!(
        !seen.iter().any(|s| s.path.contains("/secrets/")),
        "--token-file replaces the Secret"
    );
    for s in &seen {
        assert_eq!(
            s.authorization.as_deref(),
            Some("Bearer kube-token-staging"),
            "{s:?}"
        );
    }
    for s in api.proxied() {
        assert_eq!(
            s.meshguard_token.as_deref(),
            Some("a-token-from-a-file-0123456789")
        );
    }
}

#[test]
fn a_secret_out_of_reach_says_what_access_is_needed() {
    let api = ApiServer::start(&[]);
    let out = api.meshguard(&["flows", "--cluster", "--token-secret", "other-token"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(
            "error: reading the agents' API token from Secret meshguard/other-token: secrets \"other-token\" is forbidden"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "(this needs `get` on secrets/other-token in meshguard, which the meshguard-viewer Role does not grant; pass the token with --token-file)"
        ),
        "{err}"
    );
    assert!(
        api.proxied().is_empty(),
        "no agent is asked without a token"
    );
}

#[test]
fn bad_usage_exits_2() {
    let api = ApiServer::start(&[]);
    for (args, want) in [
        (
            &["flows", "--cluster", "--agent", "http://127.0.0.1:9465"][..],
            "--agent names one agent and --cluster asks every node's",
        ),
        (
            &["flows", "--cluster", "-f"][..],
            "--follow does not go with --cluster",
        ),
        (&["flows", "--agent-namespace", "mg"][..], "--cluster"),
        (
            &["flows", "--cluster", "--verdict", "bypass"][..],
            "unknown verdict",
        ),
        (
            &["flows", "--cluster", "--agent-timeout", "soon"][..],
            "is not a duration",
        ),
    ] {
        let out = api.meshguard(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    assert!(api.seen().is_empty(), "bad usage asks nobody");
}

#[test]
fn no_agent_pods_says_where_it_looked() {
    let api = ApiServer::start(&[]);
    let out = api.meshguard(&["flows", "--cluster", "--agent-namespace", "elsewhere"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("no agent pods in namespace elsewhere match app.kubernetes.io/name=meshguard"),
        "{err}"
    );
}
