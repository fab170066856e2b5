//! Enforcement on the testbed, one agent switched from mode to mode by the `meshguard.io/enforce`
//! label of the shop namespace in its pod list (no restart): in `audit` every bypass is
//! recorded as `would-refuse` and every scenario's traffic still succeeds; in `enforce` the
//! bypasses fail at their client with a reset, while every mesh, in-pod, probe and expected
//! flow succeeds, 1,000 mesh requests among them; back to `off`, nothing is refused. And
//! what the kernel keeps doing once the agent is gone: fail-open, or fail-closed when told.

use std::{
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use meshguard_tests::{
    privileged,
    testbed::{scenarios, Node, APP_UID},
    Agent, Cgroup, Pins,
};
use serde_json::{json, Value};

/// Sets the shop namespace's mode (`None`: no label) in the pod list, as `kubectl label` would,
/// written whole at once (the agent watches the file).
fn label_shop(pods: &Path, mode: Option<&str>) {
    let mut list: Value = serde_json::from_str(&std::fs::read_to_string(pods).unwrap()).unwrap();
    let items = list["items"].as_array_mut().unwrap();
    items.retain(|i| !(i["kind"] == "Namespace" && i["metadata"]["name"] == "shop"));
    let mut namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}},
    });
    if let Some(mode) = mode {
        namespace["metadata"]["labels"]["meshguard.io/enforce"] = json!(mode);
    }
    items.push(namespace);
    let scratch = pods.with_extension("json.new");
    std::fs::write(&scratch, serde_json::to_vec(&list).unwrap()).unwrap();
    std::fs::rename(&scratch, pods).unwrap();
}

/// Waits until the agent's status says shop's mode is `mode`: the plan is written by then.
fn wait_for_mode(agent: &Agent, mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = agent.status();
        let shop = status["enforcement"]
            .as_array()
            .and_then(|all| all.iter().find(|n| n["namespace"] == "shop").cloned());
        if shop.as_ref().is_some_and(|s| s["mode"] == mode) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shop never became {mode}: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ends of the scenarios' connections that enforcement judges, with the rule each meets:
/// the meshed clients' sockets that sent plaintext past their sidecar, and STRICT api's
/// application accepting plaintext past its own.
const ENFORCED: [(&str, &str, &str); 4] = [
    ("excluded-port", "client socket", "egress-bypass"),
    ("proxy-uid-app", "client socket", "egress-bypass"),
    ("no-capture", "client socket", "egress-bypass"),
    ("strict-excluded-inbound", "server socket", "strict-inbound"),
];

fn is_bypass_scenario(name: &str) -> bool {
    ENFORCED.iter().any(|(s, ..)| *s == name)
}

/// One end a scenario states.
fn expected(scenario: &str, what: &str) -> scenarios::Expected {
    let s = scenarios::all()
        .into_iter()
        .find(|s| s.name == scenario)
        .unwrap();
    s.expect.iter().find(|e| e.what == what).unwrap().clone()
}

/// Distinct flows among records.
fn flows(records: &[&Value]) -> usize {
    records
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn curl_failed_fast(out: &anyhow::Error) -> bool {
    let text = format!("{out:#}");
    // curl's "(56) Recv failure" (reset, aborted) or "(52) Empty reply", never its timeout.
    (text.contains("reset") || text.contains("abort") || text.contains("(52)"))
        && !text.contains("(28)")
}

#[test]
fn audit_then_enforce_then_off_without_a_restart() {
    if !privileged() {
        return;
    }
    // Every scenario with a bypass is one enforcement refuses, and no other.
    let bypasses: Vec<&str> = scenarios::bypasses().iter().map(|s| s.name).collect();
    assert_eq!(bypasses, ENFORCED.map(|(s, ..)| s));
    let cgroup = Cgroup::new("enforcement").unwrap();
    let node = Node::up("mgenforce", [245, 11], scenarios::pods()).unwrap();
    let pods = node.dir.join("pods.json");
    label_shop(&pods, Some("audit"));
    let inventory = format!("file:{}", pods.display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    wait_for_mode(&agent, "audit");

    // Audit: everything passes; each enforced end says what enforce would have done.
    for s in scenarios::all() {
        s.run(&node).unwrap();
    }
    for (scenario, what, rule) in ENFORCED {
        let e = expected(scenario, what);
        let r = agent
            .wait_for(1, &format!("{scenario}: {what}"), |r| {
                r["event"] == "closed" && e.matches(&node, r)
            })
            .unwrap()
            .remove(0);
        assert_eq!(
            (&r["action"], &r["action_rule"], &r["verdict"]),
            (
                &Value::from("would-refuse"),
                &Value::from(rule),
                &Value::from("bypass-plaintext")
            ),
            "{scenario}: {what}: {r}"
        );
    }
    // Settled: every scenario's every end recorded; no other record carries an action.
    for s in scenarios::all() {
        for e in &s.expect {
            agent
                .wait_for(1, e.what, |r| r["event"] == "closed" && e.matches(&node, r))
                .unwrap();
        }
    }
    let audited = agent.records();
    let acted: Vec<&Value> = audited.iter().filter(|r| !r["action"].is_null()).collect();
    assert_eq!(flows(&acted), ENFORCED.len(), "{acted:#?}");
    let metrics = agent.metrics_page();
    assert!(
        metrics.contains("meshguard_enforcement_actions_total{enforced_namespace=\"shop\",enforced_workload=\"web\",mode=\"audit\",reason=\"excluded-port\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("enforcement"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Enforce, by the label alone: the bypasses fail at their client at once, the rest passes.
    label_shop(&pods, Some("enforce"));
    wait_for_mode(&agent, "enforce");
    let before = agent.records().len();
    for s in scenarios::all() {
        let result = s.run(&node);
        match (is_bypass_scenario(s.name), result) {
            (true, Ok(())) => panic!("{}: the bypass was not refused", s.name),
            (true, Err(e)) => {
                eprintln!("{}: refused: {e:#}", s.name);
                assert!(curl_failed_fast(&e), "{}: {e:#}", s.name);
            }
            (false, Err(e)) => panic!("{}: refused: {e:#}", s.name),
            (false, Ok(())) => {}
        }
    }
    let refused: Vec<Value> = agent
        .wait_for(ENFORCED.len(), "refused flows", |r| {
            r["action"] == "refused" && r["event"] == "closed"
        })
        .unwrap();
    assert_eq!(
        flows(&refused.iter().collect::<Vec<_>>()),
        ENFORCED.len(),
        "each bypass refused once: {refused:#?}"
    );
    for (scenario, what, rule) in ENFORCED {
        let e = expected(scenario, what);
        let r = refused
            .iter()
            .find(|r| e.matches(&node, r))
            .unwrap_or_else(|| panic!("{scenario}: {what}: not among {refused:#?}"));
        assert_eq!(r["action_rule"], rule, "{r}");
    }

    // Not one byte of a refused client's plaintext reached its server: catalog's end of the
    // refused connections (accepted, then reset) received nothing.
    let ip = |pod: &str| Value::from(node.pod(pod).ip.to_string());
    let refused_at_catalog = |r: &Value| {
        r["event"] == "closed"
            && r["local"]["ip"] == ip("catalog")
            && [ip("web"), ip("batch")].contains(&r["remote"]["ip"])
    };
    // (The audit phase's two are before these.)
    agent
        .wait_for(4, "catalog's ends", refused_at_catalog)
        .unwrap();
    let reached: Vec<Value> = agent.records()[before..]
        .iter()
        .filter(|r| refused_at_catalog(r))
        .cloned()
        .collect();
    assert_eq!(reached.len(), 2, "catalog accepted the refused connections");
    assert!(
        reached.iter().all(|r| r["bytes_received"] == 0),
        "{reached:#?}"
    );

    // A genuine ClientHello, then plaintext, past the sidecar: refused at the plaintext after the
    // handshake record (an `enforced` record, after the flow's first). catalog saw the hello
    // and never the request.
    let spoofed = scenarios::adversarial()
        .into_iter()
        .find(|s| s.name == "spoofed-alpn")
        .unwrap();
    // Its client takes a refused request in its stride: the records say what happened.
    let _ = spoofed.run(&node);
    let (client_end, server_end) = (&spoofed.expect[0], &spoofed.expect[1]);
    let refused = agent
        .wait_for(1, "the spoofed handshake's client, refused", |r| {
            r["action"] == "refused" && client_end.matches(&node, r)
        })
        .unwrap();
    assert_eq!(refused[0]["action_rule"], "egress-bypass", "{}", refused[0]);
    let reached = agent
        .wait_for(1, "the spoofed handshake's server end", |r| {
            r["event"] == "closed" && server_end.matches(&node, r)
        })
        .unwrap();
    let (sent, received) = (
        refused[0]["bytes_sent"].as_u64().unwrap(),
        reached[0]["bytes_received"].as_u64().unwrap(),
    );
    assert!(
        received < sent,
        "only the hello reached catalog: {received} of the {sent} bytes sent"
    );

    // 1,000 mesh requests, each on a connection of its own: not one refused.
    let web = node.pod("web");
    let api = node.pod("api");
    let out: Output = web
        .run(
            web.command(APP_UID, "curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-m",
                    "30",
                    "-w",
                    "%{http_code}\\n",
                ])
                .args(["-H", "Connection: close"])
                .arg(format!("http://{}:8080/?n=[1-1000]", api.ip)),
        )
        .unwrap();
    let ok = String::from_utf8_lossy(&out.stdout).matches("200").count();
    assert_eq!(
        ok,
        1000,
        "mesh requests under enforce: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Off again: the bypass passes.
    label_shop(&pods, None);
    wait_for_mode(&agent, "off");
    let excluded = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();
    excluded.run(&node).unwrap();
    let log = agent.stop().unwrap();
    for line in log.lines().filter(|l| l.contains("enforcement")) {
        eprintln!("{line}");
    }
    assert!(log.contains("enforcement: refused"), "{log}");
    assert!(
        !log.contains("enforcement refused a flow that its verdict does not call a bypass"),
        "{log}"
    );
}

/// What the kernel does once the agent is gone, programs pinned: by default it refuses nothing
/// (at once after a clean stop, within the agent's 10 s word after a crash); with
/// `--on-exit keep-enforcing` it keeps refusing (the connection then times out: no agent resets
/// it).
#[test]
fn fail_open_by_default_fail_closed_when_told() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("enforcement-exit").unwrap();
    let node = Node::up("mgexit", [245, 12], scenarios::pods()).unwrap();
    let pods = node.dir.join("pods.json");
    label_shop(&pods, Some("enforce"));
    let inventory = format!("file:{}", pods.display());
    let pins = Pins::new("enforcement-exit");
    let pin_dir = pins.path.display().to_string();
    let start = |extra: &[&str]| {
        let mut args = vec!["--inventory", &inventory, "--bpf-pin-dir", &pin_dir];
        args.extend(extra);
        let agent = Agent::start(&cgroup, &args).unwrap();
        wait_for_mode(&agent, "enforce");
        agent
    };
    let bypass = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();

    let agent = start(&[]);
    assert!(bypass.run(&node).is_err(), "refused while the agent runs");
    agent.stop().unwrap();
    bypass
        .run(&node)
        .expect("a clean stop withdraws the agent's word at once");

    let agent = start(&[]);
    assert!(bypass.run(&node).is_err(), "{}", agent.log());
    agent.kill9().unwrap();
    let crashed = Instant::now();
    let err = bypass.run(&node).unwrap_err();
    assert!(
        format!("{err:#}").contains("(28)"),
        "refused on the crashed agent's last word, with no agent to reset it: {err:#}"
    );
    std::thread::sleep(Duration::from_secs(11).saturating_sub(crashed.elapsed()));
    bypass
        .run(&node)
        .expect("the crashed agent's word lapsed: fail-open");

    let agent = start(&["--on-exit", "keep-enforcing"]);
    assert!(bypass.run(&node).is_err());
    agent.stop().unwrap();
    std::thread::sleep(Duration::from_secs(11));
    let err = bypass.run(&node).unwrap_err();
    assert!(
        format!("{err:#}").contains("(28)"),
        "still refused with no agent (fail-closed): {err:#}"
    );
    drop(pins);
    bypass.run(&node).expect("uninstalled: nothing refused");
}
