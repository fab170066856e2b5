//! What a hostile pod on the node, or an ordinary upgrade, must not do to the agent: lose the
//! events an older version queued, stall it with connections, make reconciliation publish a
//! flow twice or feed its own overload, have a restart report open flows again, or blind it by
//! removing its pins or detaching its programs.
//!
//! Each test brings up its own testbed node (or uses loopback only), its own agent and its own
//! bpffs pin directory; all of it is removed when the test ends, passed or failed.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use meshguard_tests::{
    privileged,
    testbed::{scenarios, Node},
    variant_bin, Agent, Cgroup, Pins, RecordExt, TempDir,
};
use serde_json::Value;

/// Checks that every flow of `scenarios` was reported closed exactly `rounds` times after the
/// first `since`, with its stated verdict.
fn assert_every_flow_reported(
    agent: &Agent,
    node: &Node,
    scenarios: &[scenarios::Scenario],
    rounds: usize,
    since: usize,
) {
    for s in scenarios {
        for e in &s.expect {
            let what = format!("{}: {}", s.name, e.what);
            let found = agent
                .wait_for(since + rounds, &what, |r| {
                    r["event"] == "closed" && e.matches(node, r)
                })
                .unwrap();
            // No more than that either, a moment later: each flow is reported once.
            thread::sleep(Duration::from_millis(200));
            let all: Vec<Value> = agent
                .records()
                .into_iter()
                .filter(|r| r["event"] == "closed" && e.matches(node, r))
                .collect();
            assert_eq!(all.len(), since + rounds, "{what}: {all:?}");
            for r in &found[since..] {
                assert_eq!(
                    (r.str_at("/verdict"), r.str_at("/reason")),
                    (e.verdict, e.reason),
                    "{what}: {r}"
                );
            }
        }
    }
}

/// A counter's value on the agent's `/metrics` page (summed over its series), if exported.
fn metric(agent: &Agent, name: &str, labels: &str) -> Option<f64> {
    let page = agent.metrics_page();
    let values: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits up to 10 s for `ready`.
fn eventually(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_upgrade_to_other_programs_reports_what_the_old_ones_queued() {
    if !privileged() {
        return;
    }
    let pins = Pins::new("upgrade");
    let cgroup = Cgroup::new("hardening-upgrade").unwrap();
    let node = Node::up("mgupgrade", [245, 40], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let args = ["--inventory", &inventory, "--bpf-pin-dir", &pin_dir];
    let bypasses = scenarios::bypasses();

    // The version before: a build whose programs differ.
    let before = Agent::start_with(&variant_bin().unwrap(), &cgroup, &args).unwrap();
    for s in &bypasses {
        s.run(&node).unwrap();
    }
    assert_every_flow_reported(&before, &node, &bypasses, 1, 0);
    let old = pins.generations();
    assert_eq!(old.len(), 1, "{old:?}");
    before.kill9().unwrap();

    // While the DaemonSet rolls: bypasses the old programs see and queue.
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        for s in &bypasses {
            s.run(&node).unwrap();
        }
    }

    let after = Agent::start(&cgroup, &args).unwrap();
    let new = pins.generations();
    assert_eq!(new.len(), 1, "only the new generation is left: {new:?}");
    assert_ne!(new, old, "other programs, another generation");
    assert!(
        after.log().contains("detaching an older generation"),
        "{}",
        after.log()
    );
    assert_every_flow_reported(&after, &node, &bypasses, ROUNDS, 0);
    let s = after.status();
    assert_eq!(s["events_lost"]["undecodable"], 0, "{s}");
    assert!(
        s["kernel_repairs"]
            .to_string()
            .contains("drained a replaced generation"),
        "{s}"
    );
    let flows: usize = bypasses.iter().map(|s| s.expect.len()).sum();
    println!(
        "upgrade: {} flows queued by the old programs, all reported by the new agent",
        flows * ROUNDS
    );
    after.stop().unwrap();
}

/// Opens connections from `sources` to `ports` and holds them, some sending a request one byte
/// a second, others asking for /metrics again and again, for `seconds`.
const HOSTILE: &str = r#"
import resource, socket, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ports = [int(p) for p in sys.argv[1].split(",")]
sources = sys.argv[2].split(",")
per, seconds = int(sys.argv[3]), float(sys.argv[4])
end = time.time() + seconds
held, opened = [], 0
def slow(port, src):
    while time.time() < end:
        try:
            s = socket.socket(); s.bind((src, 0)); s.connect(("127.0.0.1", port))
            for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if time.time() > end: break
                s.send(bytes([b])); time.sleep(0.5)
        except OSError:
            time.sleep(0.1)
def hammer(port, src):
    while time.time() < end:
        try:
            s = socket.socket(); s.bind((src, 0)); s.connect(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while s.recv(65536): pass
            s.close()
        except OSError:
            time.sleep(0.01)
for port in ports:
    for src in sources:
        for _ in range(8):
            threading.Thread(target=slow, args=(port, src), daemon=True).start()
        threading.Thread(target=hammer, args=(port, src), daemon=True).start()
while time.time() < end:
    for port in ports:
        for src in sources:
            if len(held) >= per * len(ports) * len(sources):
                break
            try:
                s = socket.socket(); s.setblocking(False); s.bind((src, 0))
                s.connect_ex(("127.0.0.1", port)); held.append(s); opened += 1
            except OSError:
                pass
    time.sleep(0.01)
print(opened, flush=True)
"#;

#[test]
fn thousands_of_idle_and_slow_connections_do_not_stall_the_agent() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("hardening-flood").unwrap();
    let node = Node::up("mghostile", [245, 41], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let dir = TempDir::new("hardening-flood").unwrap();
    let token_file = dir.path.join("token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef").unwrap();
    let token_arg = token_file.to_string_lossy().into_owned();
    let agent = Agent::start(
        &cgroup,
        &[
            "--inventory",
            &inventory,
            "--api-addr",
            "127.0.0.1:0",
            "--api-token-file",
            &token_arg,
        ],
    )
    .unwrap();
    let metrics_port = agent
        .metrics_addr()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let api_port = agent
        .log()
        .lines()
        .find(|l| l.contains("serving the API on TCP"))
        .and_then(|l| {
            Some(
                l[l.find("addr=")? + 5..]
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .and_then(|a| a.rsplit(':').next().map(str::to_string))
        .expect("the API's TCP port in the log");

    // Four hostile "pods" (loopback sources of their own), 2,500 connections each to each port.
    const SECONDS: u64 = 25;
    let hostile = cgroup
        .spawn(
            Command::new("python3")
                .args(["-c", HOSTILE, &format!("{metrics_port},{api_port}")])
                .args(["127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5", "2500"])
                .arg(SECONDS.to_string())
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let started = Instant::now();
    thread::sleep(Duration::from_secs(3));

    // Meanwhile: bypass traffic, and the on-call engineer's queries, each answered promptly.
    let bypasses = scenarios::bypasses();
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(SECONDS - 5) {
        for s in &bypasses {
            s.run(&node).unwrap();
        }
        rounds += 1;
        let asked = Instant::now();
        let s = agent.status();
        assert!(s["flows_tracked"].is_number(), "{s}");
        let out = Command::new("curl")
            .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args([
                "-H",
                "Authorization: Bearer 0123456789abcdef0123456789abcdef",
            ])
            .arg(format!("http://127.0.0.1:{api_port}/v1/flows?limit=10"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
        assert!(agent.metrics_page().contains("meshguard_flows_total"));
        slowest = slowest.max(asked.elapsed());
    }
    let out = hostile.wait_with_output().unwrap();
    let opened = String::from_utf8_lossy(&out.stdout).trim().to_string();

    assert_every_flow_reported(&agent, &node, &bypasses, rounds, 0);
    let s = agent.status();
    let lost: BTreeMap<String, u64> = serde_json::from_value(s["events_lost"].clone()).unwrap();
    assert!(lost.values().all(|n| *n == 0), "no loss: {lost:?}");
    let refused = metric(&agent, "meshguard_connections_refused_total", "").unwrap();
    println!(
        "{opened} hostile connections held, slow senders and /metrics hammering on both ports: {rounds} rounds of bypasses all judged, slowest status+API+metrics round {slowest:?}, {refused} connections refused, events lost {lost:?}"
    );
    assert!(refused > 0.0, "the limits were reached and counted");
    assert_eq!(s["connections_refused"].as_f64(), Some(refused), "{s}");
    assert!(slowest < Duration::from_secs(3), "{slowest:?}");
    agent.stop().unwrap();
}

#[test]
fn reconciliation_under_overflow_publishes_each_flow_once_at_a_bounded_rate() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("hardening-reconcile").unwrap();
    let agent = Agent::start(
        &cgroup,
        &["--ringbuf-bytes", "4096", "--flow-map-size", "64"],
    )
    .unwrap();
    // 12 s of bursts: 100 connections at once with a request each way, over and over; the
    // ring buffer overflows all along, and the map's walk meets entries deleted under it.
    let script = "
import socket, time
server = socket.socket()
server.bind(('127.0.0.1', 0))
server.listen(1024)
end, n = time.time() + 12, 0
while time.time() < end:
    clients = [socket.create_connection(server.getsockname()) for _ in range(100)]
    accepted = [server.accept()[0] for _ in clients]
    for c, a in zip(clients, accepted):
        c.sendall(b'GET /burst HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); a.recv(100)
        a.sendall(b'HTTP/1.1 200 OK\\r\\n\\r\\n'); c.recv(100)
    for s in clients + accepted:
        s.close()
    n += len(clients)
print(n)
";
    let started = Instant::now();
    let out = cgroup
        .run(Command::new("python3").args(["-c", script]))
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    thread::sleep(Duration::from_secs(3));
    let elapsed = started.elapsed();

    let mut closed: BTreeMap<String, usize> = BTreeMap::new();
    for r in agent.records() {
        if r["event"] == "closed" {
            *closed.entry(r.str_at("/id").to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = closed.iter().filter(|(_, n)| **n > 1).collect();
    let passes = metric(&agent, "meshguard_reconcile_passes_total", "").unwrap();
    let s = agent.status();
    println!(
        "{} connections in bursts for {elapsed:?}: {} flows closed, {} published closed twice, {passes} reconciliation passes, ring buffer overflows {}, walks {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        closed.len(),
        twice.len(),
        s["events_lost"]["ringbuf_full"],
        s["reconcile"]
    );
    assert!(
        s["events_lost"]["ringbuf_full"].as_u64() > Some(0),
        "it overflowed: {s}"
    );
    assert!(twice.is_empty(), "each flow closed once: {twice:?}");
    // At start, then at most one pass per 5 s of overflow.
    let bound = 2.0 + elapsed.as_secs_f64() / 5.0;
    assert!(passes <= bound, "{passes} passes in {elapsed:?}");
    assert!(passes >= 2.0, "overflows made it reconcile: {passes}");
    assert_eq!(s["reconcile"]["passes"].as_f64(), Some(passes), "{s}");
    agent.stop().unwrap();
}

#[test]
fn a_restarted_agent_does_not_report_open_flows_again() {
    if !privileged() {
        return;
    }
    let pins = Pins::new("reported");
    let cgroup = Cgroup::new("hardening-reported").unwrap();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let args = ["--bpf-pin-dir", &pin_dir];
    let first = Agent::start(&cgroup, &args).unwrap();
    // 20 connections that carry a request each way, then stay open until told to close.
    let dir = TempDir::new("hardening-reported").unwrap();
    let release = dir.path.join("release");
    let script = "
import os, socket, sys, time
server = socket.socket()
server.bind(('127.0.0.1', 0))
server.listen(64)
clients = [socket.create_connection(server.getsockname()) for _ in range(20)]
accepted = [server.accept()[0] for _ in clients]
for c, a in zip(clients, accepted):
    c.sendall(b'GET /kept-open HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); a.recv(100)
    a.sendall(b'HTTP/1.1 200 OK\\r\\n\\r\\n'); c.recv(100)
print(server.getsockname()[1], flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
";
    let mut held = cgroup
        .spawn(Command::new("python3").args(["-c", script]).arg(&release))
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u64 = line.trim().parse().expect("the server's port");
    let is_ours = move |r: &Value| {
        r["local"]["port"].as_u64() == Some(port) || r["remote"]["port"].as_u64() == Some(port)
    };
    let reported = first
        .wait_for(40, "both ends of 20 open connections", |r| {
            r["event"] == "classified" && is_ours(r)
        })
        .unwrap();
    let verdicts: BTreeMap<String, (String, String)> = reported
        .iter()
        .map(|r| {
            (
                r.str_at("/id").to_string(),
                (
                    r.str_at("/verdict").to_string(),
                    r.str_at("/reason").to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(verdicts.len(), 40, "{reported:?}");
    first.kill9().unwrap();

    let second = Agent::start(&cgroup, &args).unwrap();
    thread::sleep(Duration::from_secs(3));
    let again: Vec<Value> = second
        .records()
        .into_iter()
        .filter(|r| verdicts.contains_key(r.str_at("/id")))
        .collect();
    assert!(
        again.is_empty(),
        "reported again after the restart: {again:?}"
    );

    // They close now: each closing record keeps the verdict the first agent gave.
    std::fs::write(&release, "").unwrap();
    held.wait().unwrap();
    let closed = second
        .wait_for(verdicts.len(), "the closes of the kept flows", |r| {
            r["event"] == "closed" && verdicts.contains_key(r.str_at("/id"))
        })
        .unwrap();
    for r in &closed {
        let (verdict, reason) = &verdicts[r.str_at("/id")];
        assert_eq!(
            (r.str_at("/verdict"), r.str_at("/reason")),
            (verdict.as_str(), reason.as_str()),
            "{r}"
        );
        assert!(r.get("corrected_from").is_none(), "{r}");
    }
    println!(
        "{} open flows across a restart: none reported again, each close with its first verdict",
        verdicts.len()
    );
    second.stop().unwrap();
}

/// Detaches a pinned link, as `bpftool link detach` would: the program leaves its cgroup
/// though the link (and its pin) stay.
fn detach_link(pin: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) with attribute structs of the layout each command reads.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut get as *mut ObjGet,
            size_of::<ObjGet>() as libc::c_uint,
        )
    };
    assert!(fd >= 0, "BPF_OBJ_GET {}", std::io::Error::last_os_error());
    let mut link_fd = [fd as u32, 0];
    // SAFETY: as above; `link_fd` is the `link_detach` attribute.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            link_fd.as_mut_ptr(),
            size_of::<[u32; 2]>() as libc::c_uint,
        )
    };
    assert_eq!(
        ret,
        0,
        "BPF_LINK_DETACH {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the fd is ours.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn an_agent_whose_pins_are_removed_or_programs_detached_repairs_itself() {
    if !privileged() {
        return;
    }
    let pins = Pins::new("blind");
    let cgroup = Cgroup::new("hardening-blind").unwrap();
    let node = Node::up("mgblind", [245, 42], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let agent = Agent::start(
        &cgroup,
        &["--inventory", &inventory, "--bpf-pin-dir", &pin_dir],
    )
    .unwrap();
    let bypasses = scenarios::bypasses();
    let generation = pins.generations();
    assert_eq!(generation.len(), 1);
    let dir = pins.path.join(&generation[0]);
    let pinned: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();

    // Someone removes the pins (a hostPath cleanup, an uninstall run by mistake).
    std::fs::remove_dir_all(&dir).unwrap();
    for s in &bypasses {
        s.run(&node).unwrap();
    }
    assert_every_flow_reported(&agent, &node, &bypasses, 1, 0);
    eventually("the pins are back", || {
        pinned.iter().all(|name| dir.join(name).exists())
    });
    assert!(metric(&agent, "meshguard_kernel_repairs_total", "repinned").unwrap() > 0.0);
    assert!(agent.status()["kernel_repairs"]
        .to_string()
        .contains("pinned again"));

    // Someone detaches a program behind the agent's back.
    detach_link(&dir.join("flow_lifecycle"));
    eventually("the programs are attached again", || {
        metric(&agent, "meshguard_kernel_repairs_total", "reattached") >= Some(1.0)
    });
    let ready = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/readyz", agent.metrics_addr().unwrap()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "200");
    for s in &bypasses {
        s.run(&node).unwrap();
    }
    assert_every_flow_reported(&agent, &node, &bypasses, 1, 1);
    let s = agent.status();
    println!(
        "pins removed, then a program detached: repairs {}",
        s["kernel_repairs"]
    );
    assert!(
        s["kernel_repairs"]
            .to_string()
            .contains("programs found detached"),
        "{s}"
    );
    assert_eq!(pins.generations().len(), 1, "{:?}", pins.generations());
    agent.stop().unwrap();
}
