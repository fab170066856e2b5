//! Verdicts that hold on real mesh traffic. The real agent watches real Envoy sidecars in
//! every configuration the realism node has (Istio's TLS profile and Envoy's defaults, with
//! post-quantum and X25519-only curves, inbound handed over from 127.0.0.6, the pod's IP and
//! 127.0.0.1, IPv6, an ingress gateway): no record, stream line or metric says `bypass-*`, every
//! mesh hop is `mtls` or `in-pod`, and tshark agrees with meshguard on the encryption of every
//! connection that crossed the bridge. Then adversarial workloads, each of which once earned a
//! harmless verdict, must each be flagged with its reason.

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
};

use meshguard_tests::{
    meshguard_bin, privileged,
    testbed::{scenarios, wire, Node},
    Agent, Cgroup, TempDir,
};
use serde_json::Value;

const REQUESTS: usize = 200;

fn ip(v: &Value) -> IpAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

/// Where a pod is reached over the variant's family.
fn address(node: &Node, pod: &str, ipv6: bool) -> IpAddr {
    let pod = node.pod(pod);
    match pod.ip6 {
        Some(ip6) if ipv6 => ip6.into(),
        _ => pod.ip.into(),
    }
}

fn pod_ips(node: &Node, pod: &str) -> Vec<IpAddr> {
    let pod = node.pod(pod);
    std::iter::once(IpAddr::from(pod.ip))
        .chain(pod.ip6.map(IpAddr::from))
        .collect()
}

/// `meshguard flows -f -o jsonl` against the agent: every line it prints, as it prints them.
struct Follower {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(agent: &Agent) -> Self {
        let mut child = Command::new(meshguard_bin().unwrap())
            .args(["flows", "-f", "-o", "jsonl", "--agent"])
            .arg(&agent.socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

#[test]
fn real_sidecars_in_every_configuration_raise_no_false_alarm() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("fidelity").unwrap();
    let cgroup = Cgroup::new("fidelity-agent").unwrap();
    let node = Node::up("mgfidel", [247, 1], scenarios::realism_pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    let follower = Follower::start(&agent);
    thread::sleep(std::time::Duration::from_millis(300));
    let variants = scenarios::realism_variants();
    let pcap = dir.path.join("bridge.pcap");
    wire::capture(&node, &pcap, "tcp", || {
        for v in &variants {
            scenarios::mesh_requests(&node, v, REQUESTS).unwrap();
        }
    })
    .unwrap();

    // Both ends of every mesh hop, closed.
    let mut hops = Vec::new();
    for v in &variants {
        let (from, to, port) = v.mesh_hop;
        let (src, dst) = (address(&node, from, v.ipv6), address(&node, to, v.ipv6));
        let hop = |r: &Value| {
            r["event"] == "closed"
                && ((r["direction"] == "egress"
                    && ip(&r["local"]["ip"]) == src
                    && ip(&r["remote"]["ip"]) == dst
                    && r["remote"]["port"] == port
                    && r["redirect"].is_null())
                    || (r["direction"] == "ingress"
                        && ip(&r["local"]["ip"]) == dst
                        && ip(&r["remote"]["ip"]) == src))
        };
        hops.push((v.name, agent.wait_for(2 * REQUESTS, v.name, hop).unwrap()));
    }
    let records = agent.records();
    let stream = follower.stop();

    // Nothing anywhere says bypass: not a record, not a stream line, not a metric. (Of this
    // node's pods: the programs see every namespace of the machine.)
    let ours: Vec<IpAddr> = node
        .pods
        .iter()
        .flat_map(|p| pod_ips(&node, &p.spec.name))
        .collect();
    let of_ours =
        |r: &Value| ours.contains(&ip(&r["local"]["ip"])) || ours.contains(&ip(&r["remote"]["ip"]));
    let is_bypass = |r: &Value| {
        r["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("bypass-"))
    };
    let bypasses: Vec<&Value> = records
        .iter()
        .filter(|r| of_ours(r) && is_bypass(r))
        .collect();
    assert!(
        bypasses.is_empty(),
        "{} false alarms, e.g. {}",
        bypasses.len(),
        bypasses[0]
    );
    let stream: Vec<Value> = stream
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r| of_ours(r))
        .collect();
    assert_eq!(
        stream.iter().filter(|r| is_bypass(r)).count(),
        0,
        "stream lines saying bypass"
    );
    assert!(
        stream.len() >= REQUESTS * variants.len(),
        "the follower saw the flows: {}",
        stream.len()
    );
    let text = agent.metrics_page();
    let namespaces: Vec<String> = node
        .pods
        .iter()
        .map(|p| format!("namespace=\"{}\"", p.spec.namespace))
        .collect();
    for line in text.lines().filter(|l| {
        l.starts_with("meshguard_flows_total{")
            && namespaces.iter().any(|ns| l.contains(ns.as_str()))
    }) {
        assert!(!line.contains("verdict=\"bypass-"), "{line}");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("meshguard_verdict_corrections_total{")),
        "no verdict was corrected later: {text}"
    );

    // Both ends of every mesh hop: mesh mTLS, from the proxy's container, with its whole
    // ClientHello.
    for (name, found) in &hops {
        for r in found {
            assert_eq!(
                (r["verdict"].as_str(), r["reason"].as_str()),
                (Some("mtls"), Some("istio-mtls")),
                "{name}: {r}"
            );
            assert_eq!(r["owner"]["kind"], "proxy", "{name}: {r}");
            assert_eq!(r["owner"]["container"], "istio-proxy", "{name}: {r}");
            assert_eq!(
                r["tls"]["alpn"],
                serde_json::json!(["istio-peer-exchange", "istio"]),
                "{name}: the whole ClientHello: {r}"
            );
        }
    }
    // Every flow of a variant's pods is mesh mTLS or inside a pod, but for the plaintext an
    // outside client sends the gateway (what a gateway is for).
    for v in &variants {
        let pods: Vec<IpAddr> = [v.client, v.server, v.mesh_hop.1]
            .iter()
            .flat_map(|p| pod_ips(&node, p))
            .collect();
        for r in records
            .iter()
            .filter(|r| r["event"] == "closed" && pods.contains(&ip(&r["local"]["ip"])))
        {
            let (verdict, reason) = (
                r["verdict"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
            );
            let gateway_edge =
                v.client != v.mesh_hop.0 && matches!(reason, "unmeshed-client" | "gateway-inbound");
            assert!(
                matches!(verdict, "mtls" | "in-pod") || gateway_edge,
                "{}: {verdict} ({reason}): {r}",
                v.name
            );
        }
    }

    // tshark and meshguard agree on every connection that crossed the bridge: the socket that
    // put it there says TLS exactly when tshark saw a ClientHello.
    let streams = wire::tcp_streams(&pcap).unwrap();
    let mut compared = 0;
    for s in &streams {
        let (Some((client, cport)), Some((server, sport))) = (s.client, s.server) else {
            continue;
        };
        if s.to_server.is_empty() {
            continue;
        }
        let tshark_says = if s.client_hello().is_some() {
            "tls"
        } else {
            "plaintext"
        };
        let on_wire = records.iter().find(|r| {
            r["event"] == "closed"
                && r["direction"] == "egress"
                && ip(&r["local"]["ip"]) == client
                && r["local"]["port"] == cport
                && ip(&r["remote"]["ip"]) == server
                && r["remote"]["port"] == sport
        });
        let r =
            on_wire.unwrap_or_else(|| panic!("no record of {client}:{cport} -> {server}:{sport}"));
        assert_eq!(
            r["encryption"], tshark_says,
            "{client}:{cport} -> {server}:{sport}: {r}"
        );
        compared += 1;
    }
    assert!(
        compared >= REQUESTS * variants.len(),
        "compared {compared} connections"
    );
    eprintln!(
        "{} records, {} stream lines, {compared} connections compared with tshark, 0 bypass",
        records.len(),
        stream.len()
    );
}

#[test]
fn adversarial_workloads_are_flagged_with_their_reason() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("adversary-agent").unwrap();
    let node = Node::up("mgadvers", [247, 2], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    let mut wrong = Vec::new();
    for scenario in scenarios::adversarial() {
        scenario.run(&node).unwrap();
        for e in &scenario.expect {
            // Its first record, whether it closed yet or not (a server's UDP socket stays
            // open): the first report is the one that must stand, and every later one too.
            let what = format!("{}: {}", scenario.name, e.what);
            let found = agent.wait_for(1, &what, |r| e.matches(&node, r)).unwrap();
            for r in &found {
                if r["verdict"] != e.verdict || r["reason"] != e.reason {
                    wrong.push(format!(
                        "{what}: {} record: expected {} ({}), got {} ({}): {}",
                        r["event"], e.verdict, e.reason, r["verdict"], r["reason"], r["detail"]
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}
