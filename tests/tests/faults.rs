//! Faults meshguard must survive without losing a flagged flow: the agent killed with SIGKILL
//! and restarted while bypass traffic goes on, a ring buffer too small for a burst, a flow map
//! too small for the connections open, pinned programs replaced or uninstalled, and a
//! configuration reloaded with SIGHUP, broken or not.
//!
//! Each test brings up its own testbed node (or uses loopback only), its own agent and its own
//! bpffs pin directory; all of it is removed when the test ends, passed or failed.

use std::{collections::BTreeMap, process::Command, thread};

use meshguard_tests::{
    meshguard_bin, privileged,
    testbed::{scenarios, Node},
    Agent, Cgroup, Pins, RecordExt,
};
use serde_json::Value;

/// Checks that every flow of `scenarios` was reported `rounds` times, closed, with its stated
/// verdict; returns how many of those records came from reconciliation.
fn assert_every_flow_reported(
    agent: &Agent,
    node: &Node,
    scenarios: &[scenarios::Scenario],
    rounds: usize,
    since: usize,
) -> usize {
    let mut recovered = 0;
    for s in scenarios {
        for e in &s.expect {
            let found = agent
                .wait_for(since + rounds, &format!("{}: {}", s.name, e.what), |r| {
                    r["event"] == "closed" && e.matches(node, r)
                })
                .unwrap();
            let found = &found[since..];
            assert_eq!(found.len(), rounds, "{}: {}: {found:?}", s.name, e.what);
            for r in found {
                assert_eq!(
                    (r.str_at("/verdict"), r.str_at("/reason")),
                    (e.verdict, e.reason),
                    "{}: {}: {r}",
                    s.name,
                    e.what
                );
                recovered += usize::from(r["recovered"] == true);
            }
        }
    }
    recovered
}

/// Status once `ready` holds (or after 5 s, for the caller's assertion to fail on).
fn status_when(agent: &Agent, ready: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..50 {
        let s = agent.status();
        if ready(&s) {
            return s;
        }
        thread::sleep(std::time::Duration::from_millis(100));
    }
    agent.status()
}

#[test]
fn a_killed_agent_restarts_and_reports_every_bypass_of_the_meantime() {
    if !privileged() {
        return;
    }
    let pins = Pins::new("restart");
    let cgroup = Cgroup::new("faults-restart").unwrap();
    let node = Node::up("mgrestart", [245, 20], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let args = ["--inventory", &inventory, "--bpf-pin-dir", &pin_dir];
    let bypasses = scenarios::bypasses();

    let first = Agent::start(&cgroup, &args).unwrap();
    for s in &bypasses {
        s.run(&node).unwrap();
    }
    assert_every_flow_reported(&first, &node, &bypasses, 1, 0);
    let generations = pins.generations();
    assert_eq!(generations.len(), 1, "{generations:?}");
    first.kill9().unwrap();

    // While no agent runs: more bypasses, each connection opened and closed.
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        for s in &bypasses {
            s.run(&node).unwrap();
        }
    }

    let second = Agent::start(&cgroup, &args).unwrap();
    assert!(
        second.log().contains("adopted the pinned kernel side"),
        "{}",
        second.log()
    );
    assert_eq!(
        pins.generations(),
        generations,
        "the same programs, not a second attachment"
    );
    assert_eq!(second.status()["adopted"], true);
    // Every flow of the meantime, exactly once each, with its verdict: 0 lost.
    assert_every_flow_reported(&second, &node, &bypasses, ROUNDS, 0);
    let flows: usize = bypasses.iter().map(|s| s.expect.len()).sum();
    println!(
        "while the agent was down: {} flows of {} bypass scenarios x {ROUNDS} rounds, all reported after the restart",
        flows * ROUNDS,
        bypasses.len()
    );
    // And the adopted programs keep working.
    for s in &bypasses {
        s.run(&node).unwrap();
    }
    assert_every_flow_reported(&second, &node, &bypasses, 1, ROUNDS);
    let log = second.stop().unwrap();
    assert!(log.contains("the kernel programs stay attached"), "{log}");
    assert_eq!(pins.generations(), generations, "kept on exit");
}

#[test]
fn a_full_ring_buffer_loses_no_bypass_flow() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("faults-ringbuf").unwrap();
    let node = Node::up("mgringbuf", [245, 21], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    // One page: room for about three payload samples.
    let agent = Agent::start(
        &cgroup,
        &["--inventory", &inventory, "--ringbuf-bytes", "4096"],
    )
    .unwrap();
    let bypasses = scenarios::bypasses();

    // A burst: every bypass scenario from several clients at once.
    const CLIENTS: usize = 6;
    thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                for s in &bypasses {
                    s.run(&node).unwrap();
                }
            });
        }
    });

    let recovered = assert_every_flow_reported(&agent, &node, &bypasses, CLIENTS, 0);
    let status = status_when(&agent, |s| s["flows_recovered"].as_u64() > Some(0));
    let lost = status["events_lost"]["ringbuf_full"].as_u64().unwrap();
    println!("burst of {CLIENTS} x {} scenarios: {lost} events lost to the full ring buffer, {recovered} flow records recovered from the flow map", bypasses.len());
    assert!(lost > 0, "the burst overflowed the ring buffer: {status}");
    assert!(recovered > 0, "some flows came through reconciliation");
    assert!(status["flows_recovered"].as_u64().unwrap() > 0, "{status}");
    let log = agent.stop().unwrap();
    assert!(log.contains("kernel-side loss"), "{log}");
}

#[test]
fn a_full_flow_map_counts_its_evictions() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("faults-flowmap").unwrap();
    let agent = Agent::start(&cgroup, &["--flow-map-size", "64"]).unwrap();
    // 300 connections over loopback, all open at once, then closed: 600 sockets for 64 entries.
    let script = "
import socket
server = socket.socket()
server.bind(('127.0.0.1', 0))
server.listen(1024)
clients = [socket.create_connection(server.getsockname()) for _ in range(300)]
accepted = [server.accept()[0] for _ in clients]
for s in clients + accepted:
    s.close()
";
    let out = cgroup
        .run(Command::new("python3").args(["-c", script]))
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let evicted = agent
        .wait_for(1, "a flow closed after its eviction", |r| {
            r["evicted"] == true
        })
        .unwrap();
    assert_eq!(evicted[0].str_at("/state"), "closed");
    // Counters reach status and metrics on the agent's next health tick (every second).
    let status = status_when(&agent, |s| {
        s["events_lost"]["flow_evicted"].as_u64() > Some(0)
    });
    let lost: BTreeMap<String, u64> =
        serde_json::from_value(status["events_lost"].clone()).unwrap();
    println!("300 connections (600 sockets) open at once for a map of 64: {lost:?}");
    assert!(lost["flow_evicted"] > 0, "{status}");
    let metrics = agent.metrics_page();
    let exported = metrics
        .lines()
        .find(|l| l.starts_with("meshguard_events_lost_total{source=\"flow_evicted\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(exported > 0, "{metrics}");
    agent.stop().unwrap();
}

#[test]
fn other_pinned_programs_are_replaced_and_uninstall_removes_them() {
    if !privileged() {
        return;
    }
    let pins = Pins::new("replace");
    let cgroup = Cgroup::new("faults-replace").unwrap();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    Agent::start(&cgroup, &["--bpf-pin-dir", &pin_dir])
        .unwrap()
        .stop()
        .unwrap();
    let old = pins.generations();
    assert_eq!(old.len(), 1, "{old:?}");

    // Other settings (as another layout or build would): a new generation replaces the old.
    let agent = Agent::start(
        &cgroup,
        &["--bpf-pin-dir", &pin_dir, "--ringbuf-bytes", "65536"],
    )
    .unwrap();
    let new = pins.generations();
    assert_eq!(new.len(), 1, "only the new generation is left: {new:?}");
    assert_ne!(new, old);
    assert!(
        agent.log().contains("detaching an older generation"),
        "{}",
        agent.log()
    );
    agent.stop().unwrap();

    let out = Command::new(meshguard_bin().unwrap())
        .args(["uninstall", "--bpf-pin-dir", &pin_dir])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("detached and unpinned"), "{said}");
    assert!(!pins.path.exists(), "nothing left under {pin_dir}");
    let again = Command::new(meshguard_bin().unwrap())
        .args(["uninstall", "--bpf-pin-dir", &pin_dir])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing pinned"));
}

#[test]
fn sighup_reloads_the_policy_and_a_broken_one_changes_nothing() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("faults-sighup").unwrap();
    let node = Node::up("mgsighup", [245, 22], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let policy = node.dir.join("policy.json");
    std::fs::write(&policy, "{}").unwrap();
    let agent = Agent::start(
        &cgroup,
        &[
            "--inventory",
            &inventory,
            "--policy",
            &policy.to_string_lossy(),
        ],
    )
    .unwrap();
    let excluded = scenarios::all()
        .into_iter()
        .find(|s| s.name == "excluded-port")
        .unwrap();
    let client = &excluded.expect[0];
    assert_eq!(client.verdict, "bypass-plaintext");
    let port = client.remote_port.unwrap();
    let verdict_of_round = |round: usize| {
        excluded.run(&node).unwrap();
        let found = agent
            .wait_for(round, client.what, |r| {
                r["event"] == "closed" && client.matches(&node, r)
            })
            .unwrap();
        found[round - 1].str_at("/verdict").to_string()
    };
    assert_eq!(verdict_of_round(1), "bypass-plaintext");

    // A rule with a port and no destination is refused: a port alone is a number anyone picks.
    std::fs::write(
        &policy,
        format!(r#"{{"expected": [{{"rule": "legacy-catalog", "ports": [{port}]}}]}}"#),
    )
    .unwrap();
    agent.hangup();
    thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(verdict_of_round(2), "bypass-plaintext");

    // The operator declares that port's plaintext to catalog expected, and reloads.
    std::fs::write(
        &policy,
        format!(r#"{{"expected": [{{"rule": "legacy-catalog", "ports": [{port}], "to": ["pods:app=catalog"]}}]}}"#),
    )
    .unwrap();
    agent.hangup();
    thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(verdict_of_round(3), "expected");

    // A broken policy: a warning, the agent stays up with what it had.
    std::fs::write(&policy, r#"{"expected": "#).unwrap();
    agent.hangup();
    thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(verdict_of_round(4), "expected");
    let log = agent.stop().unwrap();
    assert!(log.contains("SIGHUP: policy reloaded"), "{log}");
    assert!(log.contains("SIGHUP: keeping the current policy"), "{log}");
}

#[test]
fn a_missing_api_token_leaves_only_the_tcp_api_off() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("faults-notoken").unwrap();
    let agent = Agent::start(
        &cgroup,
        &[
            "--api-addr",
            "127.0.0.1:0",
            "--api-token-file",
            "/nonexistent/meshguard-token",
        ],
    )
    .unwrap();
    let status = agent.status();
    let degraded = status["degraded"].to_string();
    assert!(
        degraded.contains("no API on 127.0.0.1:0") && degraded.contains("does not exist"),
        "{status}"
    );
    agent.stop().unwrap();
}

#[test]
fn a_stuck_api_client_never_holds_up_the_agent() {
    use std::{io::Write, os::unix::net::UnixStream};
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("faults-stuck").unwrap();
    let agent = Agent::start(&cgroup, &[]).unwrap();
    // A follower that never reads, and a client that never finishes its request.
    let mut follower = UnixStream::connect(&agent.socket).unwrap();
    follower
        .write_all(b"GET /v1/flows/stream HTTP/1.1\r\nHost: meshguard\r\n\r\n")
        .unwrap();
    let mut half = UnixStream::connect(&agent.socket).unwrap();
    half.write_all(b"GET /v1/flows HTTP/1.1\r\nHost: mesh")
        .unwrap();

    // Thousands of flows (with payload: each is judged and streamed) while they hang on.
    const FLOWS: usize = 2000;
    let script = format!(
        "
import socket, threading
server = socket.socket()
server.bind(('127.0.0.1', 0))
server.listen(1024)
print(server.getsockname()[1], flush=True)
def serve():
    while True:
        c, _ = server.accept()
        c.recv(64)
        c.sendall(b'pong')
        c.close()
threading.Thread(target=serve, daemon=True).start()
for _ in range({FLOWS}):
    s = socket.create_connection(server.getsockname())
    s.sendall(b'ping')
    s.recv(64)
    s.close()
"
    );
    let out = cgroup
        .run(Command::new("python3").args(["-c", &script]))
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let clients = agent
        .wait_for(FLOWS, "every client socket", |r| {
            r["event"] == "closed" && r["remote"]["port"] == port
        })
        .unwrap();
    assert_eq!(clients.len(), FLOWS);
    // And the API still answers everyone else.
    assert_eq!(
        agent.status()["programs_attached"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    drop((follower, half));
    agent.stop().unwrap();
}
