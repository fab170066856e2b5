//! The node testbed behaves like a meshed node before meshguard is judged on it: sidecars
//! really carry mTLS with Istio's SNI and ALPN, the bypasses really are plaintext on the wire
//! (a packet capture on the node's bridge, no meshguard involved), every scenario's flows reach
//! the agent, and teardown leaves nothing behind, also after a crash.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use meshguard_tests::{
    cgroup2_root, privileged, run,
    testbed::{
        capture::{INBOUND_PORT, OUTBOUND_PORT},
        envoy::ISTIO_ALPN,
        scenarios::{self, Party, Wire},
        wire::{self, ClientHello},
        Curves, Node, PodSpec, TlsProfile, PROXY_CONTAINER,
    },
    Agent, Cgroup, TempDir,
};
use serde_json::Value;

/// Packets captured on the node's bridge (those `filter` takes) while `work` runs.
fn capture(node: &Node, dir: &TempDir, filter: &str, work: impl FnOnce()) -> std::path::PathBuf {
    let pcap = dir.path.join("bridge.pcap");
    wire::capture(node, &pcap, filter, work).unwrap();
    pcap
}

/// Packets on the bridge while every scenario runs once.
fn capture_scenarios(
    node: &Node,
    dir: &TempDir,
    all: &[scenarios::Scenario],
) -> std::path::PathBuf {
    capture(node, dir, "tcp", || {
        for scenario in all {
            scenario.run(node).unwrap();
        }
    })
}

/// tshark's fields for the packets matching `filter`, one row per packet.
fn tshark(pcap: &std::path::Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(pcap);
    // Decode the scenarios' ports as what they carry, whatever tshark guesses from the number.
    for (port, proto) in [
        (8080, "tls"),
        (8443, "tls"),
        (5000, "http"),
        (9080, "http"),
        (8081, "http"),
        (53, "http"),
        (15020, "http"),
        (2222, "ssh"),
    ] {
        cmd.args(["-d", &format!("tcp.port=={port},{proto}")]);
    }
    cmd.args(["-Y", filter, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = run(cmd.stderr(Stdio::piped())).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

#[test]
fn the_wire_shows_mtls_through_sidecars_and_plaintext_for_the_bypasses() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("ground-truth").unwrap();
    let node = Node::up("mgtruth", [245, 1], scenarios::pods()).unwrap();
    let all = scenarios::all();
    let pcap = capture_scenarios(&node, &dir, &all);

    assert_wire(&node, &pcap, &all);
}

/// Asserts that the capture shows each crossing of each scenario as its [`Wire`] says:
/// TLS and HTTP as tshark dissects them, the rest from the connections' bytes and tshark's
/// DNS, UDP and SSH dissectors.
fn assert_wire(node: &Node, pcap: &std::path::Path, all: &[scenarios::Scenario]) {
    let hellos = tshark(
        pcap,
        "tls.handshake.type == 1",
        &[
            "ip.src",
            "ip.dst",
            "tcp.dstport",
            "tcp.srcport",
            "tls.handshake.extensions_server_name",
            "tls.handshake.extensions_alpn_str",
        ],
    );
    let requests = tshark(
        pcap,
        "http.request",
        &[
            "ip.src",
            "ip.dst",
            "tcp.dstport",
            "tcp.srcport",
            "http.request.method",
        ],
    );
    let udp = tshark(
        pcap,
        "udp",
        &[
            "ip.src",
            "ip.dst",
            "udp.dstport",
            "udp.srcport",
            "dns.flags.response",
            "dns.a",
            "data.data",
            "dns.qry.name",
        ],
    );
    let ssh = tshark(
        pcap,
        "ssh.message_code",
        &[
            "ip.src",
            "ip.dst",
            "tcp.dstport",
            "tcp.srcport",
            "ssh.message_code",
        ],
    );
    let streams = wire::tcp_streams(pcap).unwrap();
    for s in all {
        for c in s.crossings() {
            let (client, server, port) = (
                c.client_ip(node).to_string(),
                node.pod(c.server).ip.to_string(),
                c.port.to_string(),
            );
            let what = format!("{}: {client} -> {}:{port}", s.name, c.server);
            let from_port = |p: &String| c.client_port.is_none_or(|want| *p == want.to_string());
            // Rows of a packet from the client to the server, or (`back`) the other way.
            let between = |row: &Vec<String>| {
                row[0] == client && row[1] == server && row[2] == port && from_port(&row[3])
            };
            let back = |row: &Vec<String>| {
                row[0] == server && row[1] == client && row[3] == port && from_port(&row[2])
            };
            match &c.wire {
                Wire::Tls { sni, alpn } => {
                    let hello = hellos.iter().find(|r| between(r)).unwrap_or_else(|| {
                        panic!("{what}: no ClientHello on the wire: {hellos:?}")
                    });
                    assert_eq!(&hello[4], sni, "{what}");
                    assert_eq!(hello[5], alpn.join(","), "{what}");
                    assert!(
                        !requests.iter().any(between),
                        "{what}: plaintext HTTP on the wire: {requests:?}"
                    );
                }
                Wire::PlaintextHttp => {
                    let request = requests.iter().find(|r| between(r)).unwrap_or_else(|| {
                        panic!("{what}: no plaintext request on the wire: {requests:?}")
                    });
                    assert_eq!(request[4], "GET", "{what}");
                }
                Wire::TlsThenPlaintextHttp { alpn } => {
                    let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
                    let spoofed = streams.iter().any(|t| {
                        t.between(client, server, c.port)
                            && from_port(&t.client.unwrap().1.to_string())
                            && t.client_hello().is_some_and(|h| {
                                h.alpn() == *alpn
                                    && t.to_server[h.len..]
                                        .windows(13)
                                        .any(|w| w == b"GET / HTTP/1.")
                            })
                    });
                    assert!(
                        spoofed,
                        "{what}: no ClientHello with ALPN {alpn:?} then HTTP"
                    );
                }
                Wire::Dns { name, answer } => {
                    // tshark writes the response flag as 0/1 (or False/True).
                    let response = |r: &Vec<String>| ["1", "True"].contains(&r[4].as_str());
                    let address = node.pod(answer).ip.to_string();
                    let asked = udp
                        .iter()
                        .any(|r| between(r) && !response(r) && r[7] == *name);
                    let answered = udp
                        .iter()
                        .any(|r| back(r) && response(r) && r[7] == *name && r[5] == address);
                    assert!(
                        asked && answered,
                        "{what}: no DNS query for {name} answered with {address}: {udp:?}"
                    );
                }
                Wire::PlaintextUdp => {
                    let datagrams: Vec<&Vec<String>> = udp.iter().filter(|r| between(r)).collect();
                    assert!(!datagrams.is_empty(), "{what}: no datagram: {udp:?}");
                    for d in datagrams {
                        let text = d[6].replace(':', "");
                        let bytes: Vec<u8> = (0..text.len() / 2)
                            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
                            .collect();
                        assert!(
                            bytes.starts_with(b"PLAINTEXT "),
                            "{what}: {:?}",
                            String::from_utf8_lossy(&bytes)
                        );
                    }
                }
                Wire::Ssh => {
                    // Both sides' KEXINIT (20), the client's key share (30), the server's
                    // reply with its host key and signature (31).
                    let sent = |from_client: bool, code: &str| {
                        ssh.iter().any(|r| {
                            (if from_client { between(r) } else { back(r) })
                                && r[4].split(',').any(|m| m == code)
                        })
                    };
                    assert!(
                        sent(true, "20")
                            && sent(false, "20")
                            && sent(true, "30")
                            && sent(false, "31"),
                        "{what}: no SSH key exchange: {ssh:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_scenario_flow_gets_its_verdict() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("testbed-agent").unwrap();
    let node = Node::up("mgflows", [245, 2], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    let mut wrong = Vec::new();
    for scenario in scenarios::all() {
        scenario.run(&node).unwrap();
        for e in &scenario.expect {
            let found = agent
                .wait_for(1, &format!("{}: {}", scenario.name, e.what), |r: &Value| {
                    r["event"] == "closed" && e.matches(&node, r)
                })
                .unwrap();
            let r = &found[0];
            // Hops inside a pod carry the application's plaintext; the bridge carries the wire.
            let wire_tls = matches!(scenario.wire, Wire::Tls { .. });
            let encryption = if e.verdict != "in-pod" && wire_tls {
                "tls"
            } else {
                "plaintext"
            };
            assert_eq!(
                r["encryption"], encryption,
                "{}: {}: {r}",
                scenario.name, e.what
            );
            if r["verdict"] != e.verdict || r["reason"] != e.reason {
                wrong.push(format!(
                    "{}: {}: expected {} ({}), got {} ({}): {}",
                    scenario.name,
                    e.what,
                    e.verdict,
                    e.reason,
                    r["verdict"],
                    r["reason"],
                    r["detail"]
                ));
            }
            assert!(!r["detail"].as_str().unwrap().is_empty());
            // A sidecar's capture (inbound, or its application's outbound): the sidecar's
            // socket says what the client dialled, the server and its port. No other socket
            // claims to have been dialled elsewhere.
            let dialled = &r["local"]["dialled"];
            let captured = r["direction"] == "ingress"
                && [INBOUND_PORT, OUTBOUND_PORT]
                    .iter()
                    .any(|&port| r["local"]["port"] == port);
            let server =
                SocketAddr::new(node.pod(scenario.server).ip.into(), scenario.port).to_string();
            if (captured && *dialled != server.as_str()) || (!captured && !dialled.is_null()) {
                wrong.push(format!(
                    "{}: {}: dialled {dialled}, not {server}: {r}",
                    scenario.name, e.what
                ));
            }
            // Declared intent against the wire: plaintext that STRICT api's application
            // accepted past its sidecar, and the plaintext a DestinationRule told web's sidecar
            // to send to ratings (counted at ratings' end), contradict it; compliant traffic
            // never does.
            let contradiction = match (scenario.name, e.what) {
                ("strict-excluded-inbound", "server socket") => Value::from("strict-plaintext"),
                ("rule-plaintext", "server sidecar accepting client") => {
                    Value::from("mtls-disabled")
                }
                _ => Value::Null,
            };
            if r["contradiction"] != contradiction {
                wrong.push(format!(
                    "{}: {}: contradiction {}, not {contradiction}",
                    scenario.name, e.what, r["contradiction"]
                ));
            }
            // What the PeerAuthentication objects beside the pods declare for the server
            // (shop STRICT, its reviews and ratings PERMISSIVE), on the port its client
            // dialled; and the DestinationRule that turns TLS off from web's sidecar to
            // ratings, on the connection's both ends.
            let rule = &r["policy"]["destination_rule"];
            // (Not on the hops inside ratings: their client is its sidecar's passthrough.)
            let ruled = scenario.name == "rule-plaintext"
                && !e.what.starts_with("server sidecar to")
                && !e.what.starts_with("server app");
            if ruled != (rule["name"] == "ratings-plaintext" && rule["tls"] == "DISABLE") {
                wrong.push(format!(
                    "{}: {}: destination rule {rule}",
                    scenario.name, e.what
                ));
            }
            let declared = match (scenario.name, e.what) {
                ("mesh-mtls", "server sidecar accepting client" | "client sidecar to server") => {
                    Some(("default", "STRICT", 8080))
                }
                (
                    "rule-plaintext",
                    "server sidecar accepting client" | "client sidecar to server",
                ) => Some(("ratings", "PERMISSIVE", 9080)),
                ("permissive-plaintext", _) => Some(("reviews", "PERMISSIVE", 9080)),
                ("strict-excluded-inbound", _) => Some(("default", "STRICT", 8081)),
                ("excluded-port", _) => None,
                _ => continue,
            };
            let policy = &r["policy"];
            let got = (!policy.is_null()).then(|| {
                (
                    policy["name"].as_str().unwrap_or("-"),
                    policy["mode"].as_str().unwrap_or("-"),
                    policy["port"].as_u64().unwrap_or(0) as u16,
                )
            });
            if got != declared || !(policy.is_null() || policy["namespace"] == "shop") {
                wrong.push(format!(
                    "{}: {}: declared {policy}, not {declared:?}",
                    scenario.name, e.what
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));

    // Each expectation names one flow, not several; flows name their pods' workloads.
    let records = agent
        .wait_for(0, "all", |r| r["event"] == "closed")
        .unwrap();
    for scenario in scenarios::all() {
        for e in &scenario.expect {
            let matching: Vec<&Value> = records.iter().filter(|r| e.matches(&node, r)).collect();
            assert_eq!(
                matching.len(),
                1,
                "{}: {} matches {} flows",
                scenario.name,
                e.what,
                matching.len()
            );
            if let Party::Pod(name) = e.local {
                assert_eq!(matching[0]["local"]["workload"], name, "{}", matching[0]);
            }
        }
    }
}

/// meshguard's encryption call on the flows that crossed the bridge agrees with tshark's.
#[test]
fn meshguard_agrees_with_the_wire() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("agree").unwrap();
    let cgroup = Cgroup::new("testbed-agree").unwrap();
    let node = Node::up("mgagree", [245, 5], scenarios::pods()).unwrap();
    let agent = Agent::start(&cgroup, &[]).unwrap();
    let all = scenarios::all();
    let pcap = capture_scenarios(&node, &dir, &all);
    let hellos = tshark(
        &pcap,
        "tls.handshake.type == 1",
        &["ip.src", "tcp.srcport", "ip.dst", "tcp.dstport"],
    );
    let requests = tshark(
        &pcap,
        "http.request",
        &["ip.src", "tcp.srcport", "ip.dst", "tcp.dstport"],
    );
    for s in &all {
        let client = s.client_ip(&node).to_string();
        let server = node.pod(s.server).ip.to_string();
        // The socket that put the connection on the bridge: the client's, or its sidecar's.
        let on_wire = agent
            .wait_for(1, s.name, |r| {
                r["event"] == "closed"
                    && r["direction"] == "egress"
                    && r["local"]["ip"] == client.as_str()
                    && r["remote"]["ip"] == server.as_str()
                    && r["remote"]["port"] == s.port
                    && r["redirect"].is_null()
            })
            .unwrap();
        let r = &on_wire[0];
        let tuple = [
            client.clone(),
            r["local"]["port"].to_string(),
            server.clone(),
            s.port.to_string(),
        ];
        let tshark_says = if hellos.contains(&tuple.to_vec()) {
            "tls"
        } else if requests.contains(&tuple.to_vec()) {
            "plaintext"
        } else {
            panic!(
                "{}: tshark saw neither a ClientHello nor a request for {tuple:?}",
                s.name
            )
        };
        assert_eq!(r["encryption"], tshark_says, "{}: {r}", s.name);
    }
}

#[test]
fn a_malformed_inventory_keeps_the_last_good_one_and_loses_no_flow() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("testbed-badinv").unwrap();
    let node = Node::up("mgbadinv", [245, 6], scenarios::pods()).unwrap();
    let file = node.dir.join("inventory.json");
    std::fs::copy(node.dir.join("pods.json"), &file).unwrap();
    let agent = Agent::start(
        &cgroup,
        &["--inventory", &format!("file:{}", file.display())],
    )
    .unwrap();
    let excluded = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();

    for (round, garbage) in [(1, Some("{\"kind\": \"List\", \"items\": [")), (2, None)] {
        match garbage {
            Some(text) => std::fs::write(&file, text).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        // The file source polls once a second: let it see the change.
        thread::sleep(Duration::from_millis(1500));
        excluded.run(&node).unwrap();
        for e in &excluded.expect {
            let found = agent
                .wait_for(round, e.what, |r: &Value| {
                    r["event"] == "closed" && e.matches(&node, r)
                })
                .unwrap();
            let r = &found[round - 1];
            assert_eq!(
                (r["verdict"].as_str(), r["reason"].as_str()),
                (Some(e.verdict), Some(e.reason)),
                "round {round}: {r}"
            );
        }
    }
    let log = agent.stop().unwrap();
    assert!(
        log.contains("inventory file is not a pod list; keeping the last good inventory"),
        "{log}"
    );
    assert!(
        log.contains("inventory file unreadable; keeping the last good inventory"),
        "{log}"
    );
}

#[test]
fn the_pod_list_reads_like_kubectl_get_pods() {
    if !privileged() {
        return;
    }
    let node = Node::up("mgpods", [245, 3], scenarios::pods()).unwrap();
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(node.dir.join("pods.json")).unwrap())
            .unwrap();
    assert_eq!(list["kind"], "List");
    // The pods, then the mesh policy declared for them: shop STRICT, its reviews and ratings
    // PERMISSIVE, as its sidecars' Envoy configurations are; the DestinationRule that web's
    // sidecar's plaintext cluster to ratings matches; a Service per serving deployment.
    let items = list["items"].as_array().unwrap();
    let (pods, rest) = items.split_at(node.pods.len());
    let of_kind = |kind: &'static str| rest.iter().filter(move |p| p["kind"] == kind);
    let declared: Vec<(&str, &str, &Value)> = of_kind("PeerAuthentication")
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap(),
                p["spec"]["mtls"]["mode"].as_str().unwrap(),
                &p["spec"]["selector"]["matchLabels"]["app"],
            )
        })
        .collect();
    assert_eq!(
        declared,
        [
            ("default", "STRICT", &Value::Null),
            ("ratings", "PERMISSIVE", &Value::from("ratings")),
            ("reviews", "PERMISSIVE", &Value::from("reviews")),
        ]
    );
    let rules: Vec<(&Value, &Value, &Value)> = of_kind("DestinationRule")
        .map(|r| {
            (
                &r["metadata"]["name"],
                &r["spec"]["host"],
                &r["spec"]["trafficPolicy"]["tls"]["mode"],
            )
        })
        .collect();
    assert_eq!(
        rules,
        [(
            &Value::from("ratings-plaintext"),
            &Value::from("ratings"),
            &Value::from("DISABLE")
        )]
    );
    let services: BTreeSet<&str> = of_kind("Service")
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        services,
        ["api", "catalog", "coredns", "ratings", "reviews", "vault"].into()
    );
    assert_eq!(rest.len(), declared.len() + rules.len() + services.len());
    for (item, pod) in pods.iter().zip(&node.pods) {
        assert_eq!(item["kind"], "Pod");
        let meta = &item["metadata"];
        assert_eq!(meta["namespace"], pod.spec.namespace.as_str());
        assert!(meta["name"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}-", pod.spec.deployment)));
        assert_eq!(meta["ownerReferences"][0]["kind"], "ReplicaSet");
        assert_eq!(item["spec"]["nodeName"], "mgpods");
        assert_eq!(item["status"]["podIP"], pod.ip.to_string().as_str());
        let meshed = meta["labels"]["security.istio.io/tlsMode"] == "istio";
        assert_eq!(meshed, pod.spec.meshed(), "{}", pod.spec.name);
        assert_eq!(
            meta["annotations"]["sidecar.istio.io/status"].is_string(),
            meshed
        );
        // Each container's status names the container whose cgroup holds its processes, at
        // the path the kubelet gives it.
        let pod_slice = cgroup2_root()
            .unwrap()
            .join("meshguard-testbed/mgpods/kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                meta["uid"].as_str().unwrap().replace('-', "_")
            ));
        let statuses = item["status"]["containerStatuses"].as_array().unwrap();
        let names: Vec<&str> = statuses
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, pod.spec.containers(), "{}", pod.spec.name);
        for status in statuses {
            let id = status["containerID"]
                .as_str()
                .unwrap()
                .strip_prefix("containerd://")
                .unwrap();
            assert!(
                id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
            let cgroup = pod_slice.join(format!("cri-containerd-{id}.scope"));
            assert!(cgroup.is_dir(), "{} missing", cgroup.display());
            let container = pod.container(status["name"].as_str().unwrap());
            assert_eq!(container.cgroup.path, cgroup);
            assert_eq!(
                status["state"]["running"]["startedAt"]
                    .as_str()
                    .unwrap()
                    .len(),
                20
            );
            let comms: Vec<String> = container
                .cgroup
                .pids()
                .iter()
                .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap())
                .collect();
            if container.name == PROXY_CONTAINER {
                assert_eq!(comms, ["envoy\n"], "{}", pod.spec.name);
            } else {
                assert_eq!(
                    comms.len(),
                    pod.spec.apps.len(),
                    "{}: {comms:?}",
                    pod.spec.name
                );
            }
        }
        // No other cgroup in the pod's slice: istio-init has exited, its cgroup gone.
        let scopes = std::fs::read_dir(&pod_slice)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count();
        assert_eq!(scopes, statuses.len());
    }
    // The API server's schema for Pod (Kubernetes 1.32), unknown fields refused.
    let dir = TempDir::new("pods").unwrap();
    let files: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let file = dir.path.join(format!("pod-{i}.json"));
            std::fs::write(&file, item.to_string()).unwrap();
            file
        })
        .collect();
    run(Command::new("kubernetes-validate")
        .args(["-k", "1.32.0", "--strict", "--quiet"])
        .args(&files))
    .unwrap();
    let web = items
        .iter()
        .find(|i| i["metadata"]["labels"]["app"] == "web")
        .unwrap();
    assert_eq!(
        web["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"],
        "5000,8443,2222"
    );
    let api = items
        .iter()
        .find(|i| i["metadata"]["labels"]["app"] == "api")
        .unwrap();
    assert_eq!(
        api["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        8081
    );
}

#[test]
fn teardown_leaves_nothing_behind_even_after_a_crash() {
    if !privileged() {
        return;
    }
    let pods = || -> Vec<PodSpec> {
        scenarios::pods()
            .into_iter()
            .filter(|p| ["web", "api"].contains(&p.name.as_str()))
            .collect()
    };
    // Every container's cgroup, and the pod slices above them.
    let cgroups = |node: &Node| -> Vec<std::path::PathBuf> {
        node.pods
            .iter()
            .flat_map(|p| &p.containers)
            .flat_map(|c| {
                [
                    c.cgroup.path.clone(),
                    c.cgroup.path.parent().unwrap().into(),
                ]
            })
            .collect()
    };
    // A run that dies without tearing down: its namespaces, sidecars and rules stay behind,
    // its processes running in their nested container cgroups.
    let crashed = Node::up("mgcrash", [245, 4], pods()).unwrap();
    let crashed_cgroups = cgroups(&crashed);
    let crashed_pids: Vec<i32> = crashed
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .flat_map(|c| c.cgroup.pids())
        .collect();
    assert!(!crashed_pids.is_empty());
    std::mem::forget(crashed);
    assert!(!Node::leftovers("mgcrash").unwrap().is_empty());
    // The next run replaces them and works.
    let node = Node::up("mgcrash", [245, 4], pods()).unwrap();
    for pid in crashed_pids {
        // Killed: gone, or a zombie of this test process (the crashed run never reaps it).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().unwrap_or("").chars().next();
        assert!(
            stat.is_empty() || state == Some('Z'),
            "a process of the crashed run still runs: {stat}"
        );
    }
    let mtls = scenarios::all()
        .into_iter()
        .find(|s| s.name == "mesh-mtls")
        .unwrap();
    mtls.run(&node).unwrap();
    assert_eq!(cgroups(&node), crashed_cgroups);
    let cgroups = cgroups(&node);
    drop(node);
    assert_eq!(Node::leftovers("mgcrash").unwrap(), Vec::<String>::new());
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
    // And tearing down what is not there is fine.
    Node::down("mgcrash").unwrap();
}

/// Writes the fuzz seed corpora from real traffic on the testbed: the first payload bytes of
/// every connection the scenarios make (ClientHellos from Envoy, curl and openssl; HTTP
/// requests and responses), and the node's pod list. Run by hand when the scenarios change:
/// `cargo test -p meshguard-tests --test testbed -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes meshguard/fuzz/corpus; run by hand"]
fn write_fuzz_seeds() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("seeds").unwrap();
    let node = Node::up("mgseeds", [245, 7], scenarios::pods()).unwrap();
    let all = scenarios::all();
    let pcap = capture_scenarios(&node, &dir, &all);
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../meshguard/fuzz/corpus");
    let seeds = corpus.join("fingerprint");
    std::fs::create_dir_all(&seeds).unwrap();
    let rows = tshark(
        &pcap,
        "tcp.len > 0",
        &["tcp.stream", "tcp.srcport", "tcp.payload"],
    );
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        // The first payload of each direction of each connection.
        if !seen.insert((row[0].clone(), row[1].clone())) {
            continue;
        }
        let hex = row[2].replace(':', "");
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let name = format!(
            "{:016x}",
            bytes
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b))
                    .wrapping_mul(0x100_0000_01b3))
        );
        std::fs::write(seeds.join(name), &bytes[..bytes.len().min(1024)]).unwrap();
    }
    let pods = corpus.join("pod_list");
    std::fs::create_dir_all(&pods).unwrap();
    std::fs::copy(node.dir.join("pods.json"), pods.join("testbed-pods.json")).unwrap();
}

/// Where a variant's pod is reached: its IPv6 address for the IPv6 variant.
fn address(node: &Node, pod: &str, ipv6: bool) -> IpAddr {
    let pod = node.pod(pod);
    match pod.ip6 {
        Some(ip6) if ipv6 => ip6.into(),
        _ => pod.ip.into(),
    }
}

/// The size range of some ClientHellos, or of their ALPN offsets, for the report.
fn range(values: impl Iterator<Item = usize>) -> String {
    let values: Vec<usize> = values.collect();
    match (values.iter().min(), values.iter().max()) {
        (Some(min), Some(max)) if min == max => format!("{min}"),
        (Some(min), Some(max)) => format!("{min}-{max}"),
        _ => "-".into(),
    }
}

/// The mesh as the real world varies it (TLS profiles, curves, inbound forwarding, IPv6, a
/// gateway) really carries every request across the bridge as mTLS with Istio's ALPN, and its
/// ClientHellos have the sizes and layouts meshguard must handle: larger than 1024 bytes with
/// the default (post-quantum) curves, the ALPN past byte 1024 of a resumed TLS 1.2 ClientHello
/// under Envoy's defaults. Prints what it measured (`--nocapture`).
#[test]
fn realism_variants_carry_every_request_as_mtls_with_istio_s_alpn() {
    if !privileged() {
        return;
    }
    const REQUESTS: usize = 200;
    let dir = TempDir::new("realism").unwrap();
    let node = Node::up("mgreal", [246, 1], scenarios::realism_pods()).unwrap();
    let variants = scenarios::realism_variants();
    let pcap = capture(&node, &dir, "tcp", || {
        for v in &variants {
            scenarios::mesh_requests(&node, v, REQUESTS).unwrap();
        }
    });
    let streams = wire::tcp_streams(&pcap).unwrap();
    for v in &variants {
        let (from, to, port) = v.mesh_hop;
        let (src, dst) = (address(&node, from, v.ipv6), address(&node, to, v.ipv6));
        let hop: Vec<&wire::TcpStream> = streams
            .iter()
            .filter(|s| s.between(src, dst, port))
            .collect();
        assert_eq!(
            hop.len(),
            REQUESTS,
            "{}: connections {from} -> {to}:{port}",
            v.name
        );
        let hellos: Vec<ClientHello> = hop
            .iter()
            .map(|s| {
                s.client_hello().unwrap_or_else(|| {
                    panic!(
                        "{}: a connection {from} -> {to} that did not open with a ClientHello: {:?}",
                        v.name,
                        String::from_utf8_lossy(&s.to_server[..s.to_server.len().min(64)])
                    )
                })
            })
            .collect();
        for h in &hellos {
            assert_eq!(h.alpn(), ISTIO_ALPN, "{}", v.name);
        }
        // Nothing in plaintext between the two pods, whatever the port or family.
        let pod_ips = |pod: &str| {
            let pod = node.pod(pod);
            std::iter::once(IpAddr::from(pod.ip))
                .chain(pod.ip6.map(IpAddr::from))
                .collect::<Vec<_>>()
        };
        let (from_ips, to_ips) = (pod_ips(from), pod_ips(to));
        for s in &streams {
            let (Some((c, _)), Some((d, _))) = (s.client, s.server) else {
                continue;
            };
            if from_ips.contains(&c) && to_ips.contains(&d) {
                assert!(
                    !s.to_server.windows(5).any(|w| w == b"GET /"),
                    "{}: plaintext HTTP from {from} to {to}",
                    v.name
                );
            }
        }
        if v.ipv6 {
            let v4 = |pod: &str| IpAddr::from(node.pod(pod).ip);
            assert!(
                !streams.iter().any(|s| s.between(v4(from), v4(to), port)),
                "{}: the mesh hop went over IPv4 too",
                v.name
            );
        }

        let (resumed, full): (Vec<&ClientHello>, Vec<&ClientHello>) =
            hellos.iter().partition(|h| h.resumes());
        eprintln!(
            "{}: {} ClientHellos over {}: {} full, {} bytes, ALPN at byte {}; {} resuming, {} \
             bytes, ALPN at byte {}, session ticket {} bytes; groups {:04x?}",
            v.name,
            hellos.len(),
            if src.is_ipv6() { "IPv6" } else { "IPv4" },
            full.len(),
            range(full.iter().map(|h| h.len)),
            range(full.iter().filter_map(|h| h.alpn_offset())),
            resumed.len(),
            range(resumed.iter().map(|h| h.len)),
            range(resumed.iter().filter_map(|h| h.alpn_offset())),
            range(resumed.iter().map(|h| h.session_ticket().len())),
            hellos[0].groups(),
        );
        let post_quantum = |h: &ClientHello| {
            h.groups()
                .iter()
                .any(|g| wire::POST_QUANTUM_GROUPS.contains(g))
        };
        if v.sidecar.tls == TlsProfile::Istio && v.sidecar.curves == Curves::EnvoyDefault {
            for h in &hellos {
                assert!(h.len > 1024 && post_quantum(h), "{}: {h:?}", v.name);
            }
        }
        if v.sidecar.tls == TlsProfile::EnvoyDefaults {
            let with_ticket: Vec<&ClientHello> = hellos
                .iter()
                .filter(|h| !h.session_ticket().is_empty())
                .collect();
            assert!(
                with_ticket.len() >= REQUESTS / 2,
                "{}: {} with a ticket",
                v.name,
                with_ticket.len()
            );
            for h in with_ticket {
                let ticket = h.extension(wire::EXT_SESSION_TICKET).unwrap().0;
                let alpn = h.alpn_offset().unwrap();
                assert!(
                    h.len > 1024 && alpn > 1024 && ticket < alpn,
                    "{}: {h:?}",
                    v.name
                );
            }
        }
        if v.sidecar.curves == Curves::X25519Only {
            for h in &hellos {
                assert!(
                    !h.groups().is_empty() && h.groups().iter().all(|g| *g == wire::X25519),
                    "{}: groups {:04x?}",
                    v.name,
                    h.groups()
                );
            }
        }
        if v.client != from {
            // The gateway: its client's requests reach it in plaintext.
            let gateway = address(&node, v.server, false);
            let client = address(&node, v.client, false);
            let requests = streams
                .iter()
                .filter(|s| {
                    s.between(client, gateway, v.port) && s.to_server.starts_with(b"GET /?n=")
                })
                .count();
            assert_eq!(
                requests, REQUESTS,
                "{}: plaintext requests to the gateway",
                v.name
            );
        }
    }
}

/// The adversarial workloads really do on the wire what they are meant to: a genuine
/// ClientHello with Istio's ALPN followed by plaintext, plaintext from renamed processes and
/// to ports a policy might trust, DNS then plaintext datagrams from one UDP socket, a real SSH
/// key exchange. Ground truth only: meshguard's verdicts on them are another matter.
#[test]
fn adversarial_workloads_show_on_the_wire_what_they_are() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("adversarial").unwrap();
    let node = Node::up("mgadverse", [246, 2], scenarios::pods()).unwrap();
    let all = scenarios::adversarial();
    let pcap = capture(&node, &dir, "tcp or udp", || {
        for scenario in &all {
            scenario.run(&node).unwrap();
        }
    });
    assert_wire(&node, &pcap, &all);
}
