//! The real agent watching real traffic between network namespaces: every flow's 4-tuple,
//! direction, encryption, TLS SNI and ALPN, byte counts against what the peers say they sent,
//! and the process behind each socket.
//!
//! Each test builds its own pair of namespaces on its own subnet, in its own cgroup, and runs
//! its own agent; all of it is removed when the test ends, passed or failed.

use std::{process::Command, thread, time::Duration};

use meshguard_tests::{link, privileged, Agent, Cgroup, Netns, Pins, RecordExt, Service, TempDir};
use serde_json::Value;

/// Two namespaces joined by a veth pair: `client` at .1 / ::1, `server` at .2 / ::2 of the
/// test's own subnet, and a cgroup for every process the test starts.
struct Pair {
    // Field order is drop order: processes go before their namespaces and files.
    cgroup: Cgroup,
    dir: TempDir,
    client: Netns,
    server: Netns,
    v4: [String; 2],
    v6: [String; 2],
}

impl Pair {
    fn new(tag: &str, subnet: u8) -> Pair {
        let cgroup = Cgroup::new(tag).unwrap();
        let client = Netns::new(&format!("mgt-{tag}-c")).unwrap();
        let server = Netns::new(&format!("mgt-{tag}-s")).unwrap();
        let v4 = [1, 2].map(|h| format!("10.201.{subnet}.{h}"));
        let v6 = [1, 2].map(|h| format!("fd00:201:{subnet}::{h}"));
        link(
            &client,
            [&format!("{}/24", v4[0]), &format!("{}/64", v6[0])],
            &server,
            [&format!("{}/24", v4[1]), &format!("{}/64", v6[1])],
        )
        .unwrap();
        let dir = TempDir::new(tag).unwrap();
        Pair {
            cgroup,
            dir,
            client,
            server,
            v4,
            v6,
        }
    }
}

/// Serves a 20,000-byte file over plain HTTP on `addr:port` inside `ns`.
fn http_server(pair: &Pair, ns: &Netns, addr: &str, port: u16) -> Service {
    let dir = pair.dir.path.join(format!("www-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "m".repeat(20_000)).unwrap();
    let child = pair
        .cgroup
        .start(
            ns.command("python3")
                .args([
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    addr,
                    "--directory",
                ])
                .arg(&dir),
        )
        .unwrap();
    wait_listening(ns, port);
    child
}

fn wait_listening(ns: &Netns, port: u16) {
    for _ in 0..100 {
        let out = ns
            .command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} in {}", ns.name);
}

/// Runs curl in `ns` and returns (bytes of the request, bytes of headers + body received).
fn curl(pair: &Pair, ns: &Netns, args: &[&str]) -> (u64, u64) {
    let out = pair
        .cgroup
        .run(
            ns.command("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_request} %{size_header} %{size_download}",
                ])
                .args(args),
        )
        .unwrap();
    let sizes: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    (sizes[0], sizes[1] + sizes[2])
}

fn is_closed(r: &Value, local_ip: &str, remote_ip: &str, server_port: u16) -> bool {
    r["event"] == "closed"
        && r["local"]["ip"] == local_ip
        && r["remote"]["ip"] == remote_ip
        && (r["local"]["port"] == server_port || r["remote"]["port"] == server_port)
}

/// Plain HTTP: checks both ends' records against what curl says went over the wire.
fn assert_plain_http(
    agent: &Agent,
    client_ip: &str,
    server_ip: &str,
    port: u16,
    sent: u64,
    received: u64,
) {
    let client = &agent
        .wait_for(1, "the client's closed flow", |r| {
            is_closed(r, client_ip, server_ip, port)
        })
        .unwrap()[0];
    assert_eq!(client.str_at("/direction"), "egress");
    assert_eq!(client.str_at("/protocol"), "tcp");
    assert_eq!(client.u64_at("/remote/port"), u64::from(port));
    assert_eq!(client.str_at("/encryption"), "plaintext");
    assert_eq!(client.str_at("/plaintext/protocol"), "http/1");
    assert_eq!(client.str_at("/plaintext/method"), "GET");
    assert_eq!(
        client.u64_at("/bytes_sent"),
        sent,
        "client bytes sent = curl's request size"
    );
    assert_eq!(
        client.u64_at("/bytes_received"),
        received,
        "client bytes received = curl's headers + body"
    );
    assert_eq!(client.str_at("/process/comm"), "curl");
    assert_eq!(client["tls"], Value::Null);
    assert_eq!(
        client["redirect"],
        Value::Null,
        "nothing redirects this traffic"
    );

    let server = &agent
        .wait_for(1, "the server's closed flow", |r| {
            is_closed(r, server_ip, client_ip, port)
        })
        .unwrap()[0];
    assert_eq!(server.str_at("/direction"), "ingress");
    assert_eq!(server.u64_at("/local/port"), u64::from(port));
    assert_eq!(
        server.u64_at("/remote/port"),
        client.u64_at("/local/port"),
        "the two ends of one connection"
    );
    assert_eq!(server.str_at("/encryption"), "plaintext");
    assert_eq!(server.u64_at("/bytes_received"), sent);
    assert_eq!(server.u64_at("/bytes_sent"), received);
    assert_eq!(server.str_at("/process/comm"), "python3");
}

#[test]
fn plaintext_http_between_namespaces() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("plain4", 11);
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let _server = http_server(&pair, &pair.server, &pair.v4[1], 8080);
    let (sent, received) = curl(
        &pair,
        &pair.client,
        &[&format!("http://{}:8080/", pair.v4[1])],
    );
    assert!(received > 20_000);
    assert_plain_http(&agent, &pair.v4[0], &pair.v4[1], 8080, sent, received);

    // A connection that stays open after its request: its classified record comes while it is
    // open. (One that opens and closes between two reads of the ring buffer gets its closed
    // record only.)
    let mut slow = pair
        .cgroup
        .spawn(pair.client.command("python3").args([
            "-c",
            &format!(
                "import socket, time\n\
                 s = socket.create_connection(('{}', 8080))\n\
                 s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
                 s.recv(100)\n\
                 time.sleep(3)\n",
                pair.v4[1]
            ),
        ]))
        .unwrap();
    let classified = agent
        .wait_for(1, "the client's classified flow", |r| {
            r["event"] == "classified" && r["local"]["ip"] == pair.v4[0].as_str()
        })
        .unwrap();
    assert!(
        slow.try_wait().unwrap().is_none(),
        "classified while the connection is open"
    );
    assert_eq!(classified[0].str_at("/state"), "open");
    assert_eq!(classified[0].str_at("/encryption"), "plaintext");
    assert_eq!(classified[0].str_at("/plaintext/method"), "GET");
    let _ = slow.kill();
    let _ = slow.wait();

    // SIGTERM: a clean exit that leaves the pinned programs for the next agent, and says so.
    let log = agent.stop().unwrap();
    assert!(
        log.contains("the kernel programs stay attached"),
        "the agent says what it left behind:\n{log}"
    );
}

#[test]
fn plaintext_http_over_ipv6() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("plain6", 12);
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let _server = http_server(&pair, &pair.server, &pair.v6[1], 8080);
    let (sent, received) = curl(
        &pair,
        &pair.client,
        &["-g", &format!("http://[{}]:8080/", pair.v6[1])],
    );
    assert_plain_http(&agent, &pair.v6[0], &pair.v6[1], 8080, sent, received);
}

#[test]
fn tls_with_sni_and_alpn() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("tls", 13);
    let (cert, key) = (
        pair.dir.path.join("cert.pem"),
        pair.dir.path.join("key.pem"),
    );
    meshguard_tests::run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
            ])
            .args(["-subj", "/CN=svc.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )
    .unwrap();
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let _server = pair
        .cgroup
        .start(
            pair.server
                .command("openssl")
                .args(["s_server", "-quiet", "-www", "-accept", "8443", "-cert"])
                .arg(&cert)
                .arg("-key")
                .arg(&key),
        )
        .unwrap();
    wait_listening(&pair.server, 8443);
    let resolve = format!("svc.test:8443:{}", pair.v4[1]);
    curl(
        &pair,
        &pair.client,
        &[
            "-k",
            "--http1.1",
            "--resolve",
            &resolve,
            "https://svc.test:8443/",
        ],
    );

    let client = &agent
        .wait_for(1, "the client's closed flow", |r| {
            is_closed(r, &pair.v4[0], &pair.v4[1], 8443)
        })
        .unwrap()[0];
    let server = &agent
        .wait_for(1, "the server's closed flow", |r| {
            is_closed(r, &pair.v4[1], &pair.v4[0], 8443)
        })
        .unwrap()[0];
    for (end, comm, direction) in [(client, "curl", "egress"), (server, "openssl", "ingress")] {
        assert_eq!(end.str_at("/encryption"), "tls", "{end}");
        assert_eq!(end.str_at("/tls/sni"), "svc.test", "{end}");
        assert_eq!(end["tls"]["alpn"], serde_json::json!(["http/1.1"]), "{end}");
        assert_eq!(end.str_at("/tls/version"), "TLS 1.3", "{end}");
        assert_eq!(end.str_at("/process/comm"), comm);
        assert_eq!(end.str_at("/direction"), direction);
        assert!(end.u64_at("/bytes_sent") > 0 && end.u64_at("/bytes_received") > 0);
    }
    // What one end sent, the other received: both are counted on this node.
    assert_eq!(
        client.u64_at("/bytes_sent"),
        server.u64_at("/bytes_received")
    );
    assert_eq!(
        client.u64_at("/bytes_received"),
        server.u64_at("/bytes_sent")
    );
}

/// A bulk exchange: both ends of the connection carry thousands of packets each way, so every
/// direction goes quiet (counted in the socket's storage, see meshguard-ebpf/src/skb.rs); the
/// closed records still count every payload byte, once.
#[test]
fn bulk_transfer_counts_every_byte_both_ways() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("bulk", 20);
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let server_addr = &pair.v4[1];
    let port = 18020;
    let _server = pair
        .cgroup
        .start(pair.server.command("socat").args([
            &format!("TCP-LISTEN:{port},bind={server_addr},reuseaddr"),
            "EXEC:cat",
        ]))
        .unwrap();
    wait_listening(&pair.server, port);
    // Not a round number: a count off by a segment, a SYN or a FIN shows.
    let n: u64 = 3_000_017;
    let mut client = pair
        .cgroup
        .spawn(pair.client.command("sh").args([
            "-c",
            &format!("head -c {n} /dev/urandom | socat -t 5 - TCP:{server_addr}:{port} | wc -c"),
        ]))
        .unwrap();
    assert!(client.wait().unwrap().success());

    let client = &agent
        .wait_for(1, "the client's closed flow", |r| {
            is_closed(r, &pair.v4[0], &pair.v4[1], port) && r["direction"] == "egress"
        })
        .unwrap()[0];
    let server = &agent
        .wait_for(1, "the server's closed flow", |r| {
            is_closed(r, &pair.v4[1], &pair.v4[0], port)
        })
        .unwrap()[0];
    for (end, record) in [("client", client), ("server", server)] {
        assert_eq!(record.u64_at("/bytes_sent"), n, "{end} sent");
        assert_eq!(record.u64_at("/bytes_received"), n, "{end} received");
        assert!(
            record.u64_at("/packets_sent") >= n / 65_536,
            "{end}: {record}"
        );
    }
}

#[test]
fn udp_exchange() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("udp", 14);
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let server_addr = &pair.v4[1];
    let _server = pair
        .cgroup
        .start(pair.server.command("socat").args([
            "-T",
            "5",
            &format!("UDP-LISTEN:5300,bind={server_addr}"),
            "EXEC:cat",
        ]))
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let payload = "meshguard udp probe ".repeat(30);
    let mut client = pair
        .cgroup
        .spawn(pair.client.command("sh").args([
            "-c",
            &format!("printf '%s' \"$0\" | socat -t 1 - UDP:{server_addr}:5300"),
            &payload,
        ]))
        .unwrap();
    assert!(client.wait().unwrap().success());
    let n = payload.len() as u64;

    let client = &agent
        .wait_for(1, "the client's closed UDP flow", |r| {
            is_closed(r, &pair.v4[0], &pair.v4[1], 5300)
        })
        .unwrap()[0];
    assert_eq!(client.str_at("/protocol"), "udp");
    assert_eq!(client.str_at("/direction"), "egress");
    assert_eq!(client.u64_at("/bytes_sent"), n);
    assert_eq!(client.u64_at("/bytes_received"), n, "the echo");
    assert_eq!(client.str_at("/encryption"), "plaintext");
    assert_eq!(client.str_at("/process/comm"), "socat");

    // The server's socket is still open; its classified record names the client as its peer.
    let server = &agent
        .wait_for(1, "the server's UDP flow", |r| {
            r["local"]["ip"] == pair.v4[1].as_str()
                && r["local"]["port"] == 5300
                && r["protocol"] == "udp"
        })
        .unwrap()[0];
    assert_eq!(server.str_at("/direction"), "ingress");
    assert_eq!(server.str_at("/remote/ip"), pair.v4[0]);
    assert_eq!(server.str_at("/encryption"), "plaintext");
}

#[test]
fn loopback_inside_a_namespace() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("loop", 15);
    let agent = Agent::start(&pair.cgroup, &[]).unwrap();
    let port = 18015;
    let _server = http_server(&pair, &pair.client, "127.0.0.1", port);
    let (sent, received) = curl(&pair, &pair.client, &[&format!("http://127.0.0.1:{port}/")]);
    let records = agent
        .wait_for(2, "both ends on loopback", |r| {
            is_closed(r, "127.0.0.1", "127.0.0.1", port)
        })
        .unwrap();
    let client = records
        .iter()
        .find(|r| r["direction"] == "egress")
        .expect("client end");
    let server = records
        .iter()
        .find(|r| r["direction"] == "ingress")
        .expect("server end");
    assert_eq!(client.u64_at("/remote/port"), u64::from(port));
    assert_eq!(client.u64_at("/bytes_sent"), sent);
    assert_eq!(client.u64_at("/bytes_received"), received);
    assert_eq!(server.u64_at("/bytes_received"), sent);
    assert_eq!(client.str_at("/process/comm"), "curl");
    assert_eq!(server.str_at("/process/comm"), "python3");
    assert_eq!(
        client.u64_at("/netns_cookie"),
        server.u64_at("/netns_cookie"),
        "both ends in one namespace"
    );
}

#[test]
fn process_attribution_falls_back_to_the_classic_tracepoint() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("tpfall", 16);
    let agent = Agent::start(&pair.cgroup, &["--process-attribution", "tracepoint"]).unwrap();
    let _server = http_server(&pair, &pair.server, &pair.v4[1], 8080);
    let (sent, received) = curl(
        &pair,
        &pair.client,
        &[&format!("http://{}:8080/", pair.v4[1])],
    );
    assert_plain_http(&agent, &pair.v4[0], &pair.v4[1], 8080, sent, received);
    assert!(
        agent.log().contains("flow_sender_tracepoint"),
        "{}",
        agent.log()
    );
}

#[test]
fn without_process_attribution_flows_still_flow_and_the_agent_says_so() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("noproc", 17);
    let agent = Agent::start(&pair.cgroup, &["--process-attribution", "off"]).unwrap();
    assert!(
        agent.log().contains("degraded: no process attribution"),
        "{}",
        agent.log()
    );
    let _server = http_server(&pair, &pair.server, &pair.v4[1], 8080);
    curl(
        &pair,
        &pair.client,
        &[&format!("http://{}:8080/", pair.v4[1])],
    );
    let client = &agent
        .wait_for(1, "the client's closed flow", |r| {
            is_closed(r, &pair.v4[0], &pair.v4[1], 8080)
        })
        .unwrap()[0];
    assert_eq!(client.str_at("/encryption"), "plaintext");
    assert_eq!(client["process"]["comm"], Value::Null);
    assert_eq!(
        client.u64_at("/process/uid"),
        0,
        "the owner uid comes from cgroup_skb"
    );
}

#[test]
fn the_agent_names_missing_capabilities() {
    if !privileged() {
        return;
    }
    let bin = meshguard_tests::meshguard_bin().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps",
            "-all",
        ])
        .arg(bin)
        .arg("agent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing capabilities: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{stderr}"
    );
}

/// The DaemonSet grants only CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: the agent must do its whole
/// job with exactly those.
#[test]
fn runs_with_only_bpf_perfmon_and_net_admin() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("caps", 18);
    let bin = meshguard_tests::meshguard_bin().unwrap();
    let socket = pair.dir.path.join("agent.sock");
    let pins = Pins::new("caps");
    // As root, a process gets every capability of its bounding set: shrink the set to the three.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set",
        "-all,+bpf,+perfmon,+net_admin",
        "--inh-caps",
        "-all",
    ])
    .arg(&bin)
    .args([
        "agent",
        "--log-flows",
        "--metrics-addr",
        "127.0.0.1:0",
        "--api-socket",
    ])
    .arg(&socket)
    .arg("--bpf-pin-dir")
    .arg(&pins.path);
    let agent = Agent::start_command(&pair.cgroup, cmd).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    assert_eq!(
        u64::from_str_radix(&cap_eff, 16).unwrap(),
        (1 << 12) | (1 << 38) | (1 << 39),
        "CapEff {cap_eff}"
    );
    let _server = http_server(&pair, &pair.server, &pair.v4[1], 8080);
    let (sent, received) = curl(
        &pair,
        &pair.client,
        &[&format!("http://{}:8080/", pair.v4[1])],
    );
    assert_plain_http(&agent, &pair.v4[0], &pair.v4[1], 8080, sent, received);
    assert!(!agent.log().contains("degraded"), "{}", agent.log());
}

/// Payload never leaves the agent raw: by default records carry the fingerprint (an HTTP path
/// without its query string); `--evidence redacted` adds the request head with every header
/// value redacted. Neither ever shows the secrets the request carried.
#[test]
fn payload_secrets_never_leave_the_agent() {
    if !privileged() {
        return;
    }
    let pair = Pair::new("redact", 19);
    let _server = http_server(&pair, &pair.server, &pair.v4[1], 8080);
    let url = format!("http://{}:8080/index.html?token=s3cret-query", pair.v4[1]);
    let auth = "Authorization: Bearer s3cret-header";
    for evidence in ["fingerprint", "redacted"] {
        let agent = Agent::start(&pair.cgroup, &["--evidence", evidence]).unwrap();
        curl(&pair, &pair.client, &["-H", auth, &url]);
        let client = agent
            .wait_for(1, "the client's closed flow", |r| {
                is_closed(r, &pair.v4[0], &pair.v4[1], 8080)
            })
            .unwrap()
            .remove(0);
        assert_eq!(client.str_at("/plaintext/path"), "/index.html", "{client}");
        let head = client["redacted_sample"].as_str();
        if evidence == "redacted" {
            let head = head.unwrap_or_else(|| panic!("no redacted sample: {client}"));
            assert!(head.starts_with("GET /index.html HTTP/1.x"), "{head}");
            assert!(head.contains("Authorization: <redacted>"), "{head}");
        } else {
            assert_eq!(head, None, "only when asked: {client}");
        }
        let explain = Command::new(meshguard_tests::meshguard_bin().unwrap())
            .args(["explain", client.str_at("/id"), "--agent"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(explain.status.success(), "{explain:?}");
        let everything = format!(
            "{}\n{}\n{}",
            agent
                .records()
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&explain.stdout),
            agent.stop().unwrap()
        );
        assert!(
            !everything.contains("s3cret"),
            "{evidence}: a secret left the agent:\n{everything}"
        );
    }
}
