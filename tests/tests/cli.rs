//! The on-call CLI against a live agent on the testbed: every filter and output format,
//! following new flows, explaining a flagged one, bad flags and bad API requests, a stopped
//! agent, and the flagged store surviving a flood of ordinary flows.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use meshguard_tests::{
    meshguard_bin, privileged,
    testbed::{scenarios, Node},
    Agent, Cgroup,
};
use serde_json::Value;

fn cli(agent: &Agent, args: &[&str]) -> Output {
    Command::new(meshguard_bin().unwrap())
        .args(args)
        .arg("--agent")
        .arg(&agent.socket)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn json(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the agent has recorded every flow the scenarios state.
fn settle(agent: &Agent, node: &Node) {
    for s in scenarios::all() {
        for e in &s.expect {
            agent
                .wait_for(1, e.what, |r| r["event"] == "closed" && e.matches(node, r))
                .unwrap();
        }
    }
}

#[test]
fn on_call_queries() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("cli").unwrap();
    let node = Node::up("mgcli", [245, 9], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    assert_eq!(
        std::fs::metadata(&agent.socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    for s in scenarios::all() {
        s.run(&node).unwrap();
    }
    settle(&agent, &node);

    // Exactly the scenarios' bypass-plaintext ends.
    let bypasses = json(&cli(
        &agent,
        &["flows", "--verdict", "bypass-plaintext", "-A", "-o", "json"],
    ));
    let mut got: Vec<String> = bypasses
        .iter()
        .map(|f| f["reason"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = scenarios::all()
        .iter()
        .flat_map(|s| {
            s.expect
                .iter()
                .filter(|e| e.verdict == "bypass-plaintext")
                .map(|e| e.reason.to_string())
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // Each filter narrows to what it names.
    let catalog_pod = bypasses
        .iter()
        .find_map(|f| {
            f["remote"]["pod"]
                .as_str()
                .filter(|p| p.starts_with("catalog-"))
        })
        .unwrap()
        .to_string();
    let either =
        |f: &Value, key: &str, want: &str| f["local"][key] == want || f["remote"][key] == want;
    type Check<'a> = Box<dyn Fn(&Value) -> bool + 'a>;
    let filters: Vec<(Vec<&str>, Check)> = vec![
        (
            vec!["-n", "legacy"],
            Box::new(|f: &Value| either(f, "namespace", "legacy")),
        ),
        (
            vec!["--workload", "catalog"],
            Box::new(|f: &Value| either(f, "workload", "catalog")),
        ),
        (
            vec!["--pod", &catalog_pod],
            Box::new(|f: &Value| either(f, "pod", &catalog_pod)),
        ),
        (
            vec!["--port", "8443"],
            Box::new(|f: &Value| f["local"]["port"] == 8443 || f["remote"]["port"] == 8443),
        ),
        (
            vec!["--verdict", "mtls,in-pod"],
            Box::new(|f: &Value| f["verdict"] == "mtls" || f["verdict"] == "in-pod"),
        ),
        (vec!["--since", "5m"], Box::new(|_: &Value| true)),
    ];
    let all = json(&cli(&agent, &["flows", "-o", "json"]));
    for (args, check) in &filters {
        let mut full = vec!["flows", "-o", "json"];
        full.extend(args);
        let some = json(&cli(&agent, &full));
        assert!(!some.is_empty(), "{args:?} found nothing");
        assert!(some.iter().all(check), "{args:?}");
        assert_eq!(
            some.len(),
            all.iter().filter(|f| check(f)).count(),
            "{args:?} missed some"
        );
    }
    thread::sleep(Duration::from_millis(1100));
    // (The agent sees the whole host: only the testbed's flows are known to have stopped.)
    let testbed_ns = bypasses
        .iter()
        .find(|f| f["remote"]["pod"] == catalog_pod.as_str())
        .and_then(|f| f["remote"]["namespace"].as_str())
        .unwrap();
    assert!(
        json(&cli(
            &agent,
            &["flows", "--since", "1s", "-n", testbed_ns, "-o", "json"]
        ))
        .is_empty(),
        "nothing in the last second"
    );
    assert_eq!(
        json(&cli(&agent, &["flows", "--last", "2", "-o", "json"])).len(),
        2
    );

    // Every output format.
    let table =
        String::from_utf8(cli(&agent, &["flows", "--verdict", "bypass-tls"]).stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("TIME")
            && lines[0].contains("VERDICT")
            && lines[0].contains("DESTINATION"),
        "{table}"
    );
    assert_eq!(
        lines.len(),
        3,
        "a header and the two app-tls ends:\n{table}"
    );
    assert!(
        lines[1].contains("bypass-tls")
            && lines[1].contains("vault-")
            && !lines[1].contains('\x1b'),
        "{table}"
    );
    let wide =
        String::from_utf8(cli(&agent, &["flows", "--verdict", "bypass-tls", "-o", "wide"]).stdout)
            .unwrap();
    assert!(
        wide.lines().next().unwrap().contains("PROCESS")
            && wide.contains("vault.legacy.svc.cluster.local"),
        "{wide}"
    );
    let jsonl = String::from_utf8(cli(&agent, &["flows", "-o", "jsonl"]).stdout).unwrap();
    assert_eq!(jsonl.lines().count(), all.len());
    assert!(jsonl
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));

    // explain on a flagged flow.
    let id = bypasses
        .iter()
        .find(|f| f["reason"] == "excluded-port" && f["direction"] == "egress")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = cli(&agent, &["explain", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    for needle in [
        "verdict: bypass-plaintext (excluded-port)",
        "netfilter: not redirected",
        "socket created in container web: not the mesh proxy",
        "process: curl",
        "payload: plaintext (http/1 GET /)",
        "excludeOutboundPorts",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }

    // explain on a contradiction: the rule that told web's sidecar to send plaintext.
    let id = all
        .iter()
        .find(|f| f["contradiction"] == "mtls-disabled")
        .unwrap_or_else(|| panic!("no mtls-disabled record in {all:#?}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let text = String::from_utf8(cli(&agent, &["explain", &id]).stdout).unwrap();
    for needle in [
        "verdict: plaintext (tls-disabled)",
        "declared: PeerAuthentication shop/ratings sets PERMISSIVE for the server's port 9080",
        "declared: DestinationRule shop/ratings-plaintext sets tls DISABLE for the client's sidecar towards ratings.shop.svc.cluster.local:9080",
        "contradiction: mtls-disabled (DestinationRule shop/ratings-plaintext, DISABLE)",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }

    // edges: is A -> B encrypted? One row a workload pair and port, each connection once
    // (both of its ends' records are here), what the mesh declares, one word.
    let edges = json(&cli(&agent, &["edges", "-o", "json"]));
    let edge = |source: &str, destination: &str, port: u16| {
        let found: Vec<&Value> = edges
            .iter()
            .filter(|e| {
                e["source"].as_str().is_some_and(|s| s.ends_with(source))
                    && e["destination"]
                        .as_str()
                        .is_some_and(|d| d.ends_with(destination))
                    && e["port"] == port
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{source} -> {destination}:{port} in {edges:#?}"
        );
        found[0].clone()
    };
    for (source, destination, port, state, declared, contradictions) in [
        ("/web", "/api", 8080, "encrypted", "STRICT", 0),
        (
            "/client",
            "/reviews",
            9080,
            "plaintext-allowed",
            "PERMISSIVE",
            0,
        ),
        ("/web", "/catalog", 5000, "bypassed", "", 0),
        // Plaintext between two sidecars, as a DestinationRule told web's: allowed by
        // ratings' PERMISSIVE, and a contradiction of the mesh's own intent.
        (
            "/web",
            "/ratings",
            9080,
            "plaintext-allowed",
            "PERMISSIVE",
            1,
        ),
        ("/client", "/api", 8081, "bypassed", "STRICT", 1),
        ("node", "/api", 8081, "plaintext-allowed", "STRICT", 0),
    ] {
        let e = edge(source, destination, port);
        assert_eq!(e["flows"], 1, "{e}");
        assert_eq!(e["state"], state, "{e}");
        assert_eq!(e["declared"].as_str().unwrap_or(""), declared, "{e}");
        assert_eq!(e["contradictions"], contradictions, "{e}");
    }
    let table = String::from_utf8(cli(&agent, &["edges"]).stdout).unwrap();
    assert!(
        table.starts_with("SOURCE") && table.contains("plaintext-allowed"),
        "{table}"
    );
    let graph = String::from_utf8(cli(&agent, &["edges", "-o", "dot"]).stdout).unwrap();
    assert!(
        graph.starts_with("digraph meshguard {") && graph.contains("color=red"),
        "{graph}"
    );

    // strict-ready: reviews is PERMISSIVE, and its sidecar accepted plaintext from the
    // unmeshed client and from web's application running as the proxy's uid: STRICT would
    // break both. ratings' sidecar accepted the plaintext web's sidecar was told to send.
    // api's sidecar only saw mTLS (its excluded port is past the sidecar).
    let out = cli(&agent, &["strict-ready", "-n", "shop", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not ready for STRICT: shop/ratings, shop/reviews"),
        "{}",
        stderr(&out)
    );
    let ready: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let workload = |name: &str| {
        ready
            .iter()
            .find(|w| w["workload"] == name)
            .unwrap_or_else(|| panic!("{name} in {ready:#?}"))
            .clone()
    };
    let reviews = workload("shop/reviews");
    assert_eq!(
        (&reviews["ready"], &reviews["declared"]),
        (&Value::from(false), &Value::from("PERMISSIVE"))
    );
    let mut clients: Vec<&str> = reviews["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["workload"].as_str().unwrap())
        .collect();
    clients.sort_unstable();
    assert_eq!(clients, ["legacy/client", "shop/web"], "{reviews}");
    assert!(reviews["clients"][0]["pod"].is_string(), "{reviews}");
    let ratings = workload("shop/ratings");
    assert_eq!(ratings["ready"], false, "{ratings}");
    assert_eq!(ratings["clients"][0]["workload"], "shop/web", "{ratings}");
    let api = workload("shop/api");
    assert_eq!(
        (&api["ready"], &api["declared"]),
        (&Value::from(true), &Value::from("STRICT"))
    );
    // Once those clients stop, a window without them is ready (exit code 0).
    thread::sleep(Duration::from_millis(3100));
    let mesh = scenarios::all()
        .into_iter()
        .find(|s| s.name == "mesh-mtls")
        .unwrap();
    mesh.run(&node).unwrap();
    for e in &mesh.expect {
        agent
            .wait_for(2, e.what, |r| r["event"] == "closed" && e.matches(&node, r))
            .unwrap();
    }
    let out = cli(&agent, &["strict-ready", "-n", "shop", "--since", "3s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains("shop/api")
            && !text.contains("shop/reviews")
            && !text.contains("shop/ratings"),
        "{text}"
    );

    // status, both ways.
    let status: Value =
        serde_json::from_slice(&cli(&agent, &["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(status["programs_attached"].as_array().unwrap().len(), 5);
    let pods = scenarios::pods().len();
    assert_eq!(status["inventory"]["pods"], pods);
    let text = String::from_utf8(cli(&agent, &["status"]).stdout).unwrap();
    assert!(
        text.contains("Health:      ok") && text.contains(&format!("{pods} pods from file:")),
        "{text}"
    );

    // Follow: a new bypass shows up while it happens.
    let mut follower = Command::new(meshguard_bin().unwrap())
        .args([
            "flows",
            "-f",
            "-o",
            "jsonl",
            "--verdict",
            "bypass-plaintext",
            "--agent",
        ])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "follow starts from now");
    let excluded = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();
    excluded.run(&node).unwrap();
    let done = Instant::now();
    let (at, line) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the new bypass reached the follower");
    let _ = follower.kill();
    let _ = follower.wait();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["verdict"], "bypass-plaintext");
    let lag = at.saturating_duration_since(done);
    eprintln!("follow: the new flow arrived {lag:?} after the request finished");
    assert!(lag < Duration::from_secs(1), "{lag:?}");

    // Bad flags: exit 2, with a message that says how to fix it.
    for (args, needle) in [
        (
            vec!["flows", "--verdict", "nope"],
            "unknown verdict \"nope\"",
        ),
        (vec!["flows", "--last", "0"], "give a number from 1"),
        (vec!["flows", "--since", "soon"], "give a duration like"),
        (vec!["flows", "--port", "http"], "invalid value"),
        (vec!["flows", "-n", "a", "-A"], "cannot be used with"),
        (vec!["explain", "not-an-id"], "is not a flow id"),
        (vec!["flows", "--colour"], "unexpected argument"),
    ] {
        let out = cli(&agent, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let out = cli(&agent, &["explain", "ffffffffffffffff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no flow with id"), "{}", stderr(&out));

    // Bad API requests: a 4xx with a JSON error, and the agent carries on.
    for (path, code, needle) in [
        ("/v1/flows?since=bogus", 400, "not a duration"),
        ("/v1/flows?limit=99999999", 400, "limit"),
        ("/v1/flows?verdict=%ff", 400, "unknown verdict"),
        ("/v1/flows?bad=1", 400, "unknown parameter"),
        ("/v1/flows/0123", 404, "no flow with id"),
        ("/v2/anything", 404, "no such endpoint"),
    ] {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&agent.socket)
            .arg(format!("http://agent{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap();
        assert_eq!(status, code.to_string(), "{path}: {body}");
        let v: Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }
    assert!(
        cli(&agent, &["status"]).status.success(),
        "the agent is still there"
    );

    // A stopped agent: exit 1, saying where the CLI looked.
    let socket = agent.socket.clone();
    agent.stop().unwrap();
    let out = Command::new(meshguard_bin().unwrap())
        .args(["flows", "--agent"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cannot reach the agent at {}", socket.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn flagged_flows_survive_a_flood() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("cli-flood").unwrap();
    let node = Node::up("mgflood", [245, 10], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(
        &cgroup,
        &[
            "--inventory",
            &inventory,
            "--store-flows",
            "50",
            "--store-flagged",
            "10",
        ],
    )
    .unwrap();
    let excluded = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();
    excluded.run(&node).unwrap();
    // 150 ordinary connections, unmeshed to unmeshed: three times what the store keeps.
    let client = node.pod("client");
    let url = format!("http://{}:5000/", node.pod("catalog").ip);
    let script = format!("for i in $(seq 150); do curl -s -o /dev/null {url}; done");
    client
        .run(client.command(1000, "sh").args(["-c", &script]))
        .unwrap();
    agent
        .wait_for(300, "the flood", |r| {
            r["event"] == "closed" && r["verdict"] == "unmeshed"
        })
        .unwrap();

    let all = json(&cli(&agent, &["flows", "-o", "json"]));
    assert!(all.len() <= 60, "the store is bounded: {}", all.len());
    let flagged = json(&cli(
        &agent,
        &["flows", "--verdict", "bypass-plaintext", "-o", "json"],
    ));
    assert_eq!(
        flagged.len(),
        2,
        "both ends of the bypass survived the flood"
    );
}
