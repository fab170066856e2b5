//! `cargo xtask demo`: a node in a box with real Envoy sidecars, the agent watching it, and the
//! scenarios run once, each flow printed beside the verdict it must get. The node stays up
//! for exploration until `cargo xtask demo --down`.

use std::{
    collections::HashSet,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use meshguard_tests::{
    testbed::{scenarios, Node},
    Cgroup,
};
use serde_json::Value;

use crate::{cargo, step, workspace_root};

pub const NODE: &str = "mgdemo";
const SUBNET: [u8; 2] = [244, 1];

/// The demo agent's pins: its own, so that tearing the demo down leaves a real agent's alone.
const PINS: &str = "/sys/fs/bpf/meshguard-demo";

#[derive(clap::Args)]
pub struct Args {
    /// Tear the demo node down (everything it made, also after a crash) and exit.
    #[arg(long)]
    pub down: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.down {
        Node::down(NODE)?;
        // The agent's kernel side outlives it (pinned): unpinning detaches it.
        match fs::remove_dir_all(PINS) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::from(e).context(format!("removing {PINS}")))
            }
            _ => {}
        }
        println!("==> demo node {NODE} is down; nothing of it is left");
        return Ok(());
    }
    step(
        "build meshguard (release)",
        cargo().args(["build", "--release", "-p", "meshguard"]),
    )?;
    let bin = workspace_root().join("target/release/meshguard");

    let pods = scenarios::pods();
    println!(
        "==> bringing up node {NODE}: {} pods, {} Envoy sidecars, Istio-style capture",
        pods.len(),
        pods.iter().filter(|p| p.meshed()).count()
    );
    let started = Instant::now();
    let node = Node::up(NODE, SUBNET, pods)?;
    println!(
        "    up in {:.1}s; pods as `kubectl get pods -o json`: {}",
        started.elapsed().as_secs_f32(),
        node.dir.join("pods.json").display()
    );

    println!("==> starting the agent");
    let flows = node.dir.join("flows.jsonl");
    let log = node.dir.join("agent.log");
    let mut agent_cgroup = Cgroup::at(
        Path::new("meshguard-testbed")
            .join(NODE)
            .join("agent")
            .as_path(),
    )?;
    agent_cgroup.spawn_to(
        Command::new(&bin)
            .args([
                "agent",
                "--log-flows",
                "--node-name",
                NODE,
                "--metrics-addr",
                "127.0.0.1:9464",
                "--bpf-pin-dir",
                PINS,
                "--inventory",
            ])
            .arg(format!("file:{}", node.dir.join("pods.json").display()))
            .env("NO_COLOR", "1"),
        &flows,
        &log,
    )?;
    wait_for_line(&log, "watching flows", Duration::from_secs(20))
        .with_context(|| format!("the agent did not start; its log: {}", log.display()))?;

    let all = scenarios::all();
    for (i, scenario) in all.iter().enumerate() {
        println!(
            "==> scenario {}/{}: {} ({})",
            i + 1,
            all.len(),
            scenario.title,
            scenario.name
        );
        scenario.run(&node)?;
    }
    println!("==> waiting for the agent's records of every expected flow");
    let records = wait_for_records(&node, &all, &flows, Duration::from_secs(15))?;

    println!();
    let (mut right, mut total) = (0, 0);
    for scenario in &all {
        println!("{} — {}", scenario.name, scenario.title);
        for e in &scenario.expect {
            total += 1;
            let expected = format!("{} ({})", e.verdict, e.reason);
            let Some(r) = records.iter().find(|r| e.matches(&node, r)) else {
                println!("  ✗ {:<36} expected {expected}: NOT SEEN", e.what);
                continue;
            };
            let got = format!(
                "{} ({})",
                r["verdict"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?")
            );
            let mark = if got == expected {
                right += 1;
                "✓"
            } else {
                "✗"
            };
            println!("  {mark} {:<36} {got:<34} {}", e.what, describe(r));
            if got != expected {
                println!("      expected {expected}");
            }
            println!("      {}", r["detail"].as_str().unwrap_or(""));
        }
    }
    println!("\n{right} of {total} flows got the verdict their scenario states.");

    agent_cgroup.keep();
    let pods = node.dir.join("pods.json");
    node.keep_running();
    let bin = "./target/release/meshguard";
    println!(
        "\nThe node and its agent keep running. Ask the agent, as on-call would:\n  \
         {bin} flows --verdict bypass-plaintext,bypass-tls -A\n  \
         {bin} flows -n shop -o wide\n  \
         {bin} edges                    (is A -> B encrypted? one row per workload pair)\n  \
         {bin} strict-ready -n shop     (can shop switch to STRICT? exit code 0 or 1)\n  \
         {bin} explain <ID from -o wide>\n  \
         {bin} status\n  \
         curl -s http://127.0.0.1:9464/metrics | grep meshguard_flows_total\n\
         Make more traffic, and watch it with `{bin} flows -f` in another terminal:\n  \
         ip netns exec {NODE}-web setpriv --reuid 1000 --regid 1000 --clear-groups curl http://10.244.1.14:5000/\n\
         Every record is also in {flows}, the pods in {pods}.\n\
         Tear it all down: cargo xtask demo --down",
        flows = flows.display(),
        pods = pods.display(),
    );
    Ok(())
}

/// One line of what meshguard saw of a flow.
fn describe(r: &Value) -> String {
    let mut s = r["encryption"].as_str().unwrap_or("?").to_string();
    if let Some(sni) = r["tls"]["sni"].as_str() {
        s += &format!(" sni={sni}");
    }
    if let Some(alpn) = r["tls"]["alpn"].as_array().filter(|a| !a.is_empty()) {
        let alpn: Vec<&str> = alpn.iter().filter_map(Value::as_str).collect();
        s += &format!(" alpn={}", alpn.join(","));
    }
    if let Some(comm) = r["process"]["comm"].as_str() {
        s += &format!(" by {comm}");
    }
    if let Some(uid) = r["process"]["uid"].as_u64() {
        s += &format!(" uid={uid}");
    }
    if r["redirect"].is_object() {
        s += &format!(" redirected to :{}", r["redirect"]["port"]);
    }
    s
}

fn wait_for_line(path: &Path, needle: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("waited {limit:?} for {needle:?} in {}", path.display())
}

/// The closed-flow records, once every expected flow has one (or the time is up).
fn wait_for_records(
    node: &Node,
    all: &[scenarios::Scenario],
    flows: &Path,
    limit: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + limit;
    loop {
        let records: Vec<Value> = fs::read_to_string(flows)?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["event"] == "closed")
            .collect();
        let missing: HashSet<&str> = all
            .iter()
            .flat_map(|s| s.expect.iter())
            .filter(|e| !records.iter().any(|r| e.matches(node, r)))
            .map(|e| e.what)
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            return Ok(records);
        }
        thread::sleep(Duration::from_millis(100));
    }
}
