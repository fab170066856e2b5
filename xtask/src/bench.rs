//! `cargo xtask bench`: what meshguard costs the node, side by side with no monitoring and with
//! the users' alternative, a full-packet tcpdump. Every round runs each configuration in turn
//! (A B C A B C ...) so that drift on a shared machine cancels; figures are medians with min and
//! max, and ratios to no agent. Then, in runs of their own: each kernel program's cost per run
//! (`kernel.bpf_stats_enabled`), the same while enforcing the client's container (every flow
//! through enforcement's whole decision), the agent under connection churn (losses counted),
//! and its memory with many open flows. The enforcing agent also runs in every round, beside
//! the plain one: enforce against off in the same rounds.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use meshguard_tests::{link, run, Cgroup, Netns, TempDir};
use serde_json::{json, Value};

use crate::{cargo, step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds per configuration.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Open flows for the memory figures, comma-separated (a connection between the bench's
    /// namespaces is two: the agent follows both of its ends).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    open_flows: Vec<usize>,
    /// A short run that only proves every figure is produced (for the test suite).
    #[arg(long)]
    smoke: bool,
    /// The meshguard binary to measure (default: a release build, made now).
    #[arg(long, value_name = "PATH")]
    meshguard: Option<PathBuf>,
    /// Also measure the floor: the same agent built with every kernel program returning at
    /// once. It runs in each round as a fourth configuration (what being attached costs), and
    /// its programs' cost per run is what the kernel's stats charge doing nothing. Builds
    /// meshguard a second time.
    #[arg(long)]
    floor: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    NoAgent,
    Agent,
    Tcpdump,
    /// The agent with programs that return at once (`--floor`).
    Floor,
    /// The agent enforcing the client's container: every flow takes enforcement's whole
    /// decision (and is allowed by a policy rule, so that the loads run).
    Enforce,
}

impl Config {
    const ALL: [Config; 5] = [
        Config::NoAgent,
        Config::Agent,
        Config::Tcpdump,
        Config::Floor,
        Config::Enforce,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::NoAgent => "no agent",
            Config::Agent => "meshguard agent",
            Config::Tcpdump => "tcpdump -w (full packets)",
            Config::Floor => "meshguard, programs emptied (floor)",
            Config::Enforce => "meshguard, enforce (every flow judged, allowed)",
        }
    }

    /// The configurations of a run, in the order each round runs them.
    fn of_run(floor: bool) -> impl Iterator<Item = Config> {
        Self::ALL
            .into_iter()
            .filter(move |c| floor || *c != Config::Floor)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    Stream,
    Rr,
    Crr,
}

impl Load {
    const ALL: [Load; 3] = [Load::Stream, Load::Rr, Load::Crr];

    /// Its key in the report's targets.
    fn key(self) -> &'static str {
        match self {
            Load::Stream => "stream",
            Load::Rr => "rr",
            Load::Crr => "crr",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Load::Stream => "stream (iperf3, Gbit/s)",
            Load::Rr => "request/response (transactions/s)",
            Load::Crr => "connect/request/close (transactions/s)",
        }
    }
}

/// What one program cost over one agent run.
#[derive(Default, Clone, Copy)]
struct ProgramCost {
    run_ns: u64,
    runs: u64,
}

impl ProgramCost {
    fn ns_per_run(self) -> f64 {
        self.run_ns as f64 / self.runs.max(1) as f64
    }
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
const SERVER: &str = "10.202.0.2";
const ECHO_PORT: u16 = 7000;
/// The first of the ports that hold connections open (two per holding process).
const HOLD_PORTS: [u16; 1] = [7100];

struct Bed {
    /// The container cgroup of a meshed pod that the client's loads run in (the inventory of
    /// `Config::Enforce` lists it), and its pod's: the container's first, dropped first.
    app: Cgroup,
    _pod: Cgroup,
    bin: PathBuf,
    /// The same agent with programs that return at once: the floor (`--floor`).
    floor_bin: Option<PathBuf>,
    xtask: PathBuf,
    cgroup: Cgroup,
    client: Netns,
    server: Netns,
    dir: TempDir,
}

pub fn bench(args: &Args) -> anyhow::Result<()> {
    let (rounds, seconds) = if args.smoke {
        (1, 1)
    } else {
        (args.rounds, args.seconds)
    };
    let open_flows = if args.smoke {
        vec![1000]
    } else {
        args.open_flows.clone()
    };
    let bin = match &args.meshguard {
        Some(bin) => bin.clone(),
        None => {
            step(
                "build meshguard (release)",
                cargo().args(["build", "--release", "-p", "meshguard"]),
            )?;
            workspace_root().join("target/release/meshguard")
        }
    };
    let (pod, app) = bench_pod()?;
    let bed = Bed {
        app,
        _pod: pod,
        bin,
        floor_bin: args
            .floor
            .then(|| build_floor(args.meshguard.is_none()))
            .transpose()?,
        xtask: std::env::current_exe()?,
        cgroup: Cgroup::new("bench")?,
        client: Netns::new("mgb-c")?,
        server: Netns::new("mgb-s")?,
        dir: TempDir::new("bench")?,
    };
    link(
        &bed.client,
        ["10.202.0.1/24", "fd00:202::1/64"],
        &bed.server,
        [&format!("{SERVER}/24"), "fd00:202::2/64"],
    )?;
    // Many connections from one address: use every ephemeral port.
    run(bed
        .client
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"]))?;
    // Connect/request/close leaves a TIME_WAIT socket per connection: let new connections reuse
    // them, or later runs slow down as ports run out and measure that instead.
    run(bed
        .client
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_tw_reuse=1"]))?;
    run(bed
        .server
        .command("sysctl")
        .args(["-qw", "net.core.somaxconn=65535"]))?;
    let _iperf = bed
        .cgroup
        .start(bed.server.command("iperf3").args(["-s", "-B", SERVER]))?;
    let _echo = bed
        .cgroup
        .start(bed.server.command(&bed.xtask.to_string_lossy()).args([
            "loadgen",
            "serve",
            "--listen",
            &format!("{SERVER}:{ECHO_PORT}"),
        ]))?;
    thread::sleep(Duration::from_millis(500));

    let mut report = Report {
        rounds,
        seconds,
        floor: args.floor,
        ..Report::default()
    };
    let stats_before = fs::read_to_string(BPF_STATS).unwrap_or_default();
    let measured = measure(&bed, &mut report, &open_flows);
    let _ = fs::write(BPF_STATS, stats_before.trim());
    measured?;

    report.complete()?;
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let markdown = report.markdown();
    fs::write(dir.join("report.md"), &markdown)?;
    fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    println!("{markdown}");
    println!("==> written to target/bench/report.md and report.json");
    Ok(())
}

fn measure(bed: &Bed, report: &mut Report, open_flows: &[usize]) -> anyhow::Result<()> {
    let (rounds, seconds) = (report.rounds, report.seconds);
    // Throughput with bpf_stats off: the stats' own clock reads would be charged to the agent.
    fs::write(BPF_STATS, "0").context("setting kernel.bpf_stats_enabled")?;
    for round in 0..rounds {
        for config in Config::of_run(report.floor) {
            println!("==> round {}/{rounds}: {}", round + 1, config.name());
            let mut running: Option<Child> = match (config, &bed.floor_bin) {
                (Config::NoAgent, _) => None,
                (Config::Agent, _) => Some(start_agent(bed, &[])?),
                (Config::Tcpdump, _) => Some(start_tcpdump(bed)?),
                (Config::Floor, Some(bin)) => Some(start_agent_of(bed, bin, &[])?),
                (Config::Floor, None) => continue,
                (Config::Enforce, _) => Some(start_enforcing(bed)?),
            };
            let cpu_before = running.as_ref().map(|c| cpu_seconds(c.id())).transpose()?;
            for load in Load::ALL {
                let value = run_load(bed, load, seconds)?;
                println!("    {}: {value:.2}", load.name());
                report
                    .results
                    .entry((load, config))
                    .or_default()
                    .push(value);
            }
            if let (Some(child), Some(before)) = (running.as_mut(), cpu_before) {
                let used = cpu_seconds(child.id())? - before;
                report
                    .cpu
                    .entry(config)
                    .or_default()
                    .push(used / (3.0 * f64::from(seconds)) * 100.0);
            }
            if let Some(mut child) = running {
                stop(&mut child)?;
            }
        }
    }

    println!("==> per-program cost (kernel.bpf_stats_enabled=1)");
    fs::write(BPF_STATS, "1")?;
    let programs = costs_by_load(bed, &bed.bin, seconds)?;
    (report.costs, report.load_costs, report.work) =
        (programs.totals, programs.by_load, programs.work);
    println!("==> the same, enforcing the client's container");
    let enforcing = costs_by_load_with(bed, &bed.bin, seconds, &enforce_args(bed))?;
    (report.enforce_costs, report.enforce_work) = (enforcing.by_load, enforcing.work);
    if let Some(bin) = &bed.floor_bin {
        println!("==> the same with empty programs (what the stats charge doing nothing)");
        let floor = costs_by_load(bed, bin, seconds)?;
        (report.floor_costs, report.floor_work) = (floor.by_load, floor.work);
    }
    fs::write(BPF_STATS, "0")?;

    println!("==> connection churn: the agent's losses at the highest new-connection rate");
    let socket = bed.dir.path.join("churn.sock");
    let mut agent = start_agent(bed, &["--api-socket", &socket.to_string_lossy()])?;
    let churn = (|| {
        let out = loadgen(bed, Load::Crr, seconds.max(2) * 2, 4)?;
        thread::sleep(Duration::from_millis(500));
        let status: Value = serde_json::from_slice(
            &run(Command::new(&bed.bin)
                .args(["status", "-o", "json", "--agent"])
                .arg(&socket))?
            .stdout,
        )?;
        anyhow::Ok((
            out["tps"].as_f64().unwrap_or(0.0),
            status["events_lost"].clone(),
        ))
    })();
    stop(&mut agent)?;
    report.churn = Some(churn?);

    for &n in open_flows {
        println!("==> agent memory with {n} open flows");
        report.memory.push((n, memory_with_open_flows(bed, n)?));
    }
    Ok(())
}

/// Each program's cost, by name.
type Costs = BTreeMap<String, ProgramCost>;
/// Each program's cost under each load on its own.
type LoadCosts = BTreeMap<(Load, String), ProgramCost>;

/// What one agent binary's programs cost under each load, and what the agent spent.
struct LoadRun {
    totals: Costs,
    by_load: LoadCosts,
    /// Per load: its figure (transactions/s for rr and crr), and the agent's CPU seconds.
    work: BTreeMap<Load, (f64, f64)>,
}

fn costs_by_load(bed: &Bed, bin: &std::path::Path, seconds: u32) -> anyhow::Result<LoadRun> {
    costs_by_load_with(bed, bin, seconds, &[])
}

fn costs_by_load_with(
    bed: &Bed,
    bin: &std::path::Path,
    seconds: u32,
    extra: &[String],
) -> anyhow::Result<LoadRun> {
    let started = SystemTime::now() - Duration::from_secs(1);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut agent = start_agent_of(bed, bin, &extra)?;
    if !extra.is_empty() {
        wait_enforcing(bed, &mut agent)?;
    }
    let mut by_load = LoadCosts::new();
    let mut work = BTreeMap::new();
    let result = (|| {
        let mut before = program_costs(started)?;
        for load in Load::ALL {
            let cpu = cpu_seconds(agent.id())?;
            let value = run_load(bed, load, seconds)?;
            work.insert(load, (value, cpu_seconds(agent.id())? - cpu));
            let after = program_costs(started)?;
            for (name, total) in &after {
                let earlier = before.get(name).copied().unwrap_or_default();
                by_load.insert(
                    (load, name.clone()),
                    ProgramCost {
                        run_ns: total.run_ns - earlier.run_ns,
                        runs: total.runs - earlier.runs,
                    },
                );
            }
            before = after;
        }
        anyhow::Ok(before)
    })();
    stop(&mut agent)?;
    Ok(LoadRun {
        totals: result?,
        by_load,
        work,
    })
}

/// Builds the agent with programs that return at once (see meshguard/build.rs), in a target
/// dir of its own.
fn build_floor(release: bool) -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/floor");
    let mut cmd = cargo();
    cmd.args(["build", "-p", "meshguard", "--target-dir"])
        .arg(&dir)
        .env("MESHGUARD_EBPF_VARIANT", "empty");
    if release {
        cmd.arg("--release");
    }
    step("build meshguard with empty programs (the floor)", &mut cmd)?;
    Ok(dir
        .join(if release { "release" } else { "debug" })
        .join("meshguard"))
}

fn loadgen(bed: &Bed, load: Load, seconds: u32, connections: usize) -> anyhow::Result<Value> {
    let mode = if load == Load::Rr { "rr" } else { "crr" };
    let out = run_in(
        &bed.app,
        bed.client
            .command(&bed.xtask.to_string_lossy())
            .args([
                "loadgen",
                "run",
                "--mode",
                mode,
                "--target",
                &format!("{SERVER}:{ECHO_PORT}"),
            ])
            .args([
                "--seconds",
                &seconds.to_string(),
                "--connections",
                &connections.to_string(),
            ]),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn run_load(bed: &Bed, load: Load, seconds: u32) -> anyhow::Result<f64> {
    match load {
        Load::Stream => iperf(bed, seconds),
        Load::Rr | Load::Crr => Ok(loadgen(bed, load, seconds, 2)?["tps"]
            .as_f64()
            .unwrap_or(0.0)),
    }
}

fn start_agent(bed: &Bed, extra: &[&str]) -> anyhow::Result<Child> {
    start_agent_of(bed, &bed.bin, extra)
}

fn start_agent_of(bed: &Bed, bin: &std::path::Path, extra: &[&str]) -> anyhow::Result<Child> {
    let started = SystemTime::now() - Duration::from_secs(1);
    let mut cmd = Command::new(bin);
    // Nothing pinned: each run's programs go with its agent, and the next run starts clean.
    cmd.args(["agent", "--metrics-addr", "off", "--bpf-pin-dir", "off"])
        .env("RUST_LOG", "warn");
    if !extra.contains(&"--api-socket") {
        cmd.args(["--api-socket", "off"]);
    }
    let mut child = bed.cgroup.spawn(cmd.args(extra))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while program_costs(started)?.len() < 4 {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            bail!("the agent did not attach");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Runs `cmd` to completion in `cgroup`; fails on a failing exit.
fn run_in(cgroup: &Cgroup, cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cgroup.spawn(cmd)?.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The bench client's pod, as the kubelet would lay out its cgroups: a pod slice and the
/// application container's scope below it.
const BENCH_POD_UID: &str = "6f1c2d3e-4a5b-4c6d-8e7f-90a1b2c3d4e5";
const BENCH_APP_ID: &str = "b3ec0a1f5d2e4c6b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b";
const BENCH_PROXY_ID: &str = "c4fd1b2a6e3f5d7c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f0e1d2c";

fn bench_pod() -> anyhow::Result<(Cgroup, Cgroup)> {
    let pod = PathBuf::from(format!(
        "meshguard-tests/kubepods-pod{}.slice",
        BENCH_POD_UID.replace('-', "_")
    ));
    let app = pod.join(format!("cri-containerd-{BENCH_APP_ID}.scope"));
    Ok((Cgroup::at(&pod)?, Cgroup::at(&app)?))
}

/// What makes the agent enforce the bench client's container, every flow allowed: the pod
/// (meshed, in namespace bench labelled enforce) and a policy whose rule expects the loads'
/// plaintext.
fn enforce_args(bed: &Bed) -> Vec<String> {
    let inventory = bed.dir.path.join("enforce-pods.json");
    let policy = bed.dir.path.join("enforce-policy.json");
    let status = |name: &str, id: &str| json!({"name": name, "containerID": format!("containerd://{id}"), "ready": true, "started": true, "restartCount": 0, "state": {"running": {}}});
    let pods = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "bench", "labels": {"meshguard.io/enforce": "enforce"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "bench-client", "namespace": "bench", "uid": BENCH_POD_UID,
                      "labels": {"app": "bench-client", "security.istio.io/tlsMode": "istio"},
                      "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
         "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
         "status": {"phase": "Running", "podIP": "10.202.0.1", "podIPs": [{"ip": "10.202.0.1"}],
                    "containerStatuses": [status("app", BENCH_APP_ID), status("istio-proxy", BENCH_PROXY_ID)]}}
    ]});
    let rule = json!({"expected": [{"rule": "bench", "ports": [ECHO_PORT, 5201], "to": ["any"]}]});
    let written =
        fs::write(&inventory, pods.to_string()).and_then(|()| fs::write(&policy, rule.to_string()));
    if let Err(e) = written {
        eprintln!("writing the bench's inventory: {e}");
    }
    vec![
        "--inventory".into(),
        format!("file:{}", inventory.display()),
        "--policy".into(),
        policy.display().to_string(),
        "--api-socket".into(),
        bed.dir.path.join("enforce.sock").display().to_string(),
    ]
}

/// The agent of `Config::Enforce`, once it enforces the client's container.
fn start_enforcing(bed: &Bed) -> anyhow::Result<Child> {
    let args = enforce_args(bed);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = start_agent(bed, &args)?;
    wait_enforcing(bed, &mut agent)?;
    Ok(agent)
}

/// Waits until the agent's status says it enforces a container cgroup.
fn wait_enforcing(bed: &Bed, agent: &mut Child) -> anyhow::Result<()> {
    let socket = bed.dir.path.join("enforce.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = Command::new(&bed.bin)
            .args(["status", "-o", "json", "--agent"])
            .arg(&socket)
            .output()?;
        let enforced = serde_json::from_slice::<Value>(&status.stdout)
            .ok()
            .and_then(|s| s["enforced_cgroups"].as_u64())
            .unwrap_or(0);
        if enforced > 0 {
            return Ok(());
        }
        if Instant::now() > deadline || agent.try_wait()?.is_some() {
            bail!("the agent never enforced the bench client's container");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn start_tcpdump(bed: &Bed) -> anyhow::Result<Child> {
    let pcap = bed.dir.path.join("bench.pcap");
    let mut child = bed.cgroup.spawn(
        bed.client
            .command("tcpdump")
            .args(["-i", "mgb-c-v", "-s", "0", "-n", "-w"])
            .arg(&pcap),
    )?;
    let stderr = child.stderr.take().context("tcpdump stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    while let Some(line) = lines.next().transpose()? {
        if line.contains("listening on") {
            break;
        }
    }
    // Keep draining its stderr so that it never blocks on a full pipe.
    thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

fn stop(child: &mut Child) -> anyhow::Result<()> {
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    Ok(())
}

/// Run time and count of meshguard's programs loaded since `since`.
fn program_costs(since: SystemTime) -> anyhow::Result<BTreeMap<String, ProgramCost>> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("flow_") || info.loaded_at().is_some_and(|t| t < since) {
            continue;
        }
        let cost: &mut ProgramCost = out.entry(name.to_string()).or_default();
        cost.run_ns += info.run_time().as_nanos() as u64;
        cost.runs += info.run_count();
    }
    Ok(out)
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A process's resident memory now and at its peak, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
}

/// Connections one process holds: processes may be limited to fewer descriptors than the
/// flows we want open (20,000 on some machines), so the load is spread over several.
const PER_PROCESS: usize = 15_000;

/// The agent's memory once `n` flows are open (and tracked): both ends of each connection are
/// sockets the agent follows, so `n / 2` connections between the namespaces. A failure is
/// reported in the figure, not fatal: the other figures still get written.
fn memory_with_open_flows(bed: &Bed, flows: usize) -> anyhow::Result<Value> {
    let n = flows.div_ceil(2);
    let socket = bed.dir.path.join(format!("memory-{flows}.sock"));
    let mut agent = start_agent(bed, &["--api-socket", &socket.to_string_lossy()])?;
    let mut children = Vec::new();
    let started = Instant::now();
    let result = (|| -> anyhow::Result<u64> {
        let mut open = 0;
        let xtask = bed.xtask.to_string_lossy();
        for (i, chunk) in (0..n).step_by(PER_PROCESS).enumerate() {
            let count = PER_PROCESS.min(n - chunk);
            let base = HOLD_PORTS[0] + 2 * i as u16;
            let listen = format!("{SERVER}:{base},{SERVER}:{}", base + 1);
            children.push(bed.cgroup.spawn(bed.server.command(&xtask).args([
                "loadgen",
                "hold-serve",
                "--listen",
                &listen,
            ]))?);
            thread::sleep(Duration::from_millis(200));
            let mut holder = bed.cgroup.spawn(bed.client.command(&xtask).args([
                "loadgen",
                "hold",
                "--targets",
                &listen,
                "--connections",
                &count.to_string(),
            ]))?;
            let mut line = String::new();
            BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
            let mut why = String::new();
            if line.trim().is_empty() {
                let _ = holder.wait();
                if let Some(mut e) = holder.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut why);
                }
            }
            children.push(holder);
            let opened: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("opening {count} connections: {}", why.trim()))?;
            open += opened["open"].as_u64().unwrap_or(0);
        }
        Ok(open)
    })();
    let open_secs = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(2));
    let (rss, peak) = rss_mib(agent.id())?;
    // What the agent's table holds, and what was dropped to make room: a figure for flows the
    // agent does not keep means nothing.
    let status: Value = run(Command::new(&bed.bin)
        .args(["status", "-o", "json", "--agent"])
        .arg(&socket))
    .ok()
    .and_then(|out| serde_json::from_slice(&out.stdout).ok())
    .unwrap_or_default();
    let lost = &status["events_lost"];
    let evicted: u64 = ["agent_table_evicted", "flow_evicted", "flow_map_full"]
        .iter()
        .map(|source| lost[source].as_u64().unwrap_or(0))
        .sum();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    stop(&mut agent)?;
    Ok(match result {
        Ok(open) => {
            json!({
                "connections": open,
                "rss_mib": rss,
                "peak_rss_mib": peak,
                "seconds_to_open": open_secs,
                "flows_tracked": status["flows_tracked"],
                "evicted": evicted,
            })
        }
        Err(e) => json!({ "error": format!("{e:#}") }),
    })
}

/// One iperf3 stream test; returns the receiver's Gbit/s.
fn iperf(bed: &Bed, seconds: u32) -> anyhow::Result<f64> {
    let out = run_in(
        &bed.app,
        bed.client
            .command("iperf3")
            .args(["-c", SERVER, "-J", "-t", &seconds.to_string()]),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3 gave no throughput: {v}"))
}

#[derive(Default)]
struct Report {
    rounds: usize,
    seconds: u32,
    /// The floor configuration was measured (`--floor`).
    floor: bool,
    results: BTreeMap<(Load, Config), Vec<f64>>,
    cpu: BTreeMap<Config, Vec<f64>>,
    costs: Costs,
    /// The same, under each load on its own.
    load_costs: LoadCosts,
    /// The same with empty programs (`--floor`).
    floor_costs: LoadCosts,
    floor_work: BTreeMap<Load, (f64, f64)>,
    /// Each load's figure and the agent's CPU seconds during it, in the per-program run.
    work: BTreeMap<Load, (f64, f64)>,
    /// The same while enforcing the client's container.
    enforce_costs: LoadCosts,
    enforce_work: BTreeMap<Load, (f64, f64)>,
    /// New connections per second reached, and the agent's losses by source.
    churn: Option<(f64, Value)>,
    memory: Vec<(usize, Value)>,
}

/// A program's cost under stream and request/response together.
fn sampled_cost(costs: &LoadCosts, program: &str) -> ProgramCost {
    let mut cost = ProgramCost::default();
    for load in [Load::Stream, Load::Rr] {
        if let Some(c) = costs.get(&(load, program.to_string())) {
            cost.run_ns += c.run_ns;
            cost.runs += c.runs;
        }
    }
    cost
}

/// A program's nanoseconds per run under one load (NaN when it did not run).
fn ns_under(costs: &LoadCosts, load: Load, program: &str) -> f64 {
    costs
        .get(&(load, program.to_string()))
        .map_or(f64::NAN, |c| c.ns_per_run())
}

/// Median, min and max.
fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    (
        median,
        *v.first().unwrap_or(&f64::NAN),
        *v.last().unwrap_or(&f64::NAN),
    )
}

impl Report {
    /// Fails unless every figure the report promises was produced.
    fn complete(&self) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for load in Load::ALL {
            for config in Config::of_run(self.floor) {
                if !self.median(load, config).is_finite() || self.median(load, config) <= 0.0 {
                    missing.push(format!("{} with {}", load.name(), config.name()));
                }
            }
        }
        for program in [
            "flow_egress",
            "flow_ingress",
            "flow_lifecycle",
            "flow_release",
            "flow_sender",
        ] {
            if self.costs.get(program).is_none_or(|c| c.runs == 0) {
                missing.push(format!("the cost of {program}"));
            }
        }
        if self.enforce_per_transaction(Load::Crr).is_none() {
            missing.push("the cost of enforcing".into());
        }
        if self.churn.is_none() {
            missing.push("connection churn".into());
        }
        if self.memory.is_empty()
            || self
                .memory
                .iter()
                .any(|(_, m)| m["rss_mib"].as_f64().unwrap_or(0.0) <= 0.0)
        {
            missing.push("memory with open flows".into());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            bail!("the bench did not produce: {}", missing.join("; "))
        }
    }

    /// The ratio of a configuration's median to no agent's, for one load.
    fn ratio(&self, load: Load, config: Config) -> f64 {
        self.median(load, config) / self.median(load, Config::NoAgent)
    }

    /// Each cost target of the issue tracker, with this run's figure: its key, the figure,
    /// what it must be, and whether it is.
    fn targets(&self) -> Vec<(String, f64, String, bool)> {
        let mut out = Vec::new();
        let mut at_least = |key: &str, value: f64, target: f64| {
            out.push((
                key.to_string(),
                value,
                format!(">= {target}"),
                value >= target,
            ));
        };
        at_least(
            "stream.ratio",
            self.ratio(Load::Stream, Config::Agent),
            0.99,
        );
        at_least("rr.ratio", self.ratio(Load::Rr, Config::Agent), 0.98);
        at_least("crr.ratio", self.ratio(Load::Crr, Config::Agent), 0.95);
        let (crr, tcpdump) = (
            self.ratio(Load::Crr, Config::Agent),
            self.ratio(Load::Crr, Config::Tcpdump),
        );
        out.push((
            "crr.ratio_minus_tcpdump".into(),
            crr - tcpdump,
            "> 0".into(),
            crr > tcpdump,
        ));
        // "Once a flow is sampled": the loads of long-lived connections, where nearly every
        // packet belongs to a flow whose evidence is taken. Under connect/request/close most
        // packets are a new flow's first (its figure is in the report beside these).
        for (key, program) in [
            ("egress.ns_per_run", "flow_egress"),
            ("ingress.ns_per_run", "flow_ingress"),
        ] {
            let ns = sampled_cost(&self.load_costs, program).ns_per_run();
            out.push((key.into(), ns, "<= 60".into(), ns <= 60.0));
        }
        if let Some((n, m)) = self.memory.iter().max_by_key(|(n, _)| *n) {
            let rss = m["rss_mib"].as_f64().unwrap_or(f64::NAN);
            out.push((
                format!("memory.{n}.rss_mib"),
                rss,
                "<= 64".into(),
                rss <= 64.0,
            ));
            let tracked = m["flows_tracked"].as_u64().map_or(f64::NAN, |t| t as f64);
            out.push((
                format!("memory.{n}.flows_tracked"),
                tracked,
                format!(">= {n}"),
                tracked >= *n as f64,
            ));
            let evicted = m["evicted"].as_u64().map_or(f64::NAN, |e| e as f64);
            out.push((
                format!("memory.{n}.evicted"),
                evicted,
                "0".into(),
                evicted == 0.0,
            ));
        }
        if let Some((_, lost)) = &self.churn {
            let lost: f64 = lost.as_object().map_or(f64::NAN, |l| {
                l.values().filter_map(Value::as_u64).sum::<u64>() as f64
            });
            out.push(("churn.events_lost".into(), lost, "0".into(), lost == 0.0));
        }
        out
    }

    /// What one transaction of a request/response load costs, in microseconds: the kernel
    /// programs' run time (bpf_stats on, so each run includes the stats' own clock reads) and
    /// the agent's CPU. Steadier than a ratio on a noisy machine: it counts work, not time.
    fn per_transaction(&self, load: Load) -> Option<(f64, f64)> {
        self.work_per_transaction(&self.load_costs, &self.work, load)
    }

    /// The same with empty programs (`--floor`): what being attached costs a transaction.
    fn floor_per_transaction(&self, load: Load) -> Option<(f64, f64)> {
        self.work_per_transaction(&self.floor_costs, &self.floor_work, load)
    }

    /// The same while enforcing the client's container.
    fn enforce_per_transaction(&self, load: Load) -> Option<(f64, f64)> {
        self.work_per_transaction(&self.enforce_costs, &self.enforce_work, load)
    }

    fn work_per_transaction(
        &self,
        costs: &LoadCosts,
        work: &BTreeMap<Load, (f64, f64)>,
        load: Load,
    ) -> Option<(f64, f64)> {
        let (tps, agent_cpu) = *work.get(&load)?;
        let transactions = tps * f64::from(self.seconds);
        if transactions <= 0.0 {
            return None;
        }
        let kernel_ns: u64 = costs
            .iter()
            .filter(|((l, _), _)| *l == load)
            .map(|(_, c)| c.run_ns)
            .sum();
        Some((
            kernel_ns as f64 / transactions / 1e3,
            agent_cpu / transactions * 1e6,
        ))
    }

    fn median(&self, load: Load, config: Config) -> f64 {
        summary(
            self.results
                .get(&(load, config))
                .map_or(&[][..], Vec::as_slice),
        )
        .0
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# meshguard overhead\n");
        let _ = writeln!(
            md,
            "`cargo xtask bench --rounds {r} --seconds {s}`: two network namespaces joined by veth; each round runs every configuration in turn; median (min to max) of {r} runs.\n",
            r = self.rounds,
            s = self.seconds
        );
        let _ = writeln!(
            md,
            "| load | configuration | median (min to max) | ratio to no agent |\n|---|---|---|---|"
        );
        for ((load, config), values) in &self.results {
            let (median, min, max) = summary(values);
            let ratio = median / self.median(*load, Config::NoAgent);
            let _ = writeln!(
                md,
                "| {} | {} | {median:.2} ({min:.2} to {max:.2}) | {ratio:.3} |",
                load.name(),
                config.name()
            );
        }
        let _ = writeln!(
            md,
            "\n| process | CPU, % of one core, during the loads |\n|---|---|"
        );
        for (config, values) in &self.cpu {
            let (median, min, max) = summary(values);
            let _ = writeln!(
                md,
                "| {} | {median:.1} ({min:.1} to {max:.1}) |",
                config.name()
            );
        }
        let _ = writeln!(
            md,
            "\n| kernel program | runs | ns per run | under stream | request/response | connect/request/close |\n|---|---|---|---|---|---|"
        );
        for (name, cost) in &self.costs {
            let under = |load: Load| ns_under(&self.load_costs, load, name);
            let _ = writeln!(
                md,
                "| `{name}` | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                cost.runs,
                cost.ns_per_run(),
                under(Load::Stream),
                under(Load::Rr),
                under(Load::Crr),
            );
        }
        if !self.floor_costs.is_empty() {
            let empty = &self.floor_costs;
            let _ = writeln!(
                md,
                "\nThe floor (`--floor`): the same agent with every program emptied (they return at once) scores {:.3} stream, {:.3} request/response and {:.3} connect/request/close of no agent, in the same rounds: what being attached costs. Its packet programs measure {:.0} ns egress and {:.0} ns ingress per run under stream and request/response ({:.0} and {:.0} under connect/request/close): what the kernel's stats charge a program that does nothing, on this machine.",
                self.ratio(Load::Stream, Config::Floor),
                self.ratio(Load::Rr, Config::Floor),
                self.ratio(Load::Crr, Config::Floor),
                sampled_cost(empty, "flow_egress").ns_per_run(),
                sampled_cost(empty, "flow_ingress").ns_per_run(),
                ns_under(empty, Load::Crr, "flow_egress"),
                ns_under(empty, Load::Crr, "flow_ingress"),
            );
        }
        for load in [Load::Rr, Load::Crr] {
            if let Some((kernel, agent)) = self.per_transaction(load) {
                let _ = write!(
                    md,
                    "\nPer {} transaction: {kernel:.2} us in the kernel programs, {agent:.2} us of the agent's CPU",
                    load.key()
                );
                if let Some((kernel, agent)) = self.floor_per_transaction(load) {
                    let _ = write!(md, " (floor: {kernel:.2} and {agent:.2})");
                }
                if let Some((kernel, agent)) = self.enforce_per_transaction(load) {
                    let _ = write!(md, "; enforcing: {kernel:.2} and {agent:.2}");
                }
                let _ = writeln!(md, ".");
            }
        }
        let _ = writeln!(
            md,
            "\nEnforce against off, in the same rounds (medians, enforcing over the plain agent): stream {:.3}, request/response {:.3}, connect/request/close {:.3}.",
            self.median(Load::Stream, Config::Enforce) / self.median(Load::Stream, Config::Agent),
            self.median(Load::Rr, Config::Enforce) / self.median(Load::Rr, Config::Agent),
            self.median(Load::Crr, Config::Enforce) / self.median(Load::Crr, Config::Agent),
        );
        if let Some((rate, lost)) = &self.churn {
            let _ = writeln!(md, "\nConnection churn (4 connect/request/close loops): {rate:.0} new connections/s; agent losses: {lost}.");
        }
        for (n, m) in &self.memory {
            let _ = writeln!(
                md,
                "\nAgent memory with {n} open flows: {:.1} MiB resident, {:.1} MiB peak; {} flows in the agent's table, {} evicted.",
                m["rss_mib"].as_f64().unwrap_or(0.0),
                m["peak_rss_mib"].as_f64().unwrap_or(0.0),
                m["flows_tracked"],
                m["evicted"]
            );
        }
        let _ = writeln!(
            md,
            "\n| target | this run | wanted | met |\n|---|---|---|---|"
        );
        for (key, value, wanted, met) in self.targets() {
            let _ = writeln!(
                md,
                "| `{key}` | {value:.3} | {wanted} | {} |",
                if met { "yes" } else { "no" }
            );
        }
        md
    }

    fn json(&self) -> Value {
        let stat = |values: &[f64]| {
            let (median, min, max) = summary(values);
            json!({"median": median, "min": min, "max": max, "runs": values})
        };
        let loads: serde_json::Map<_, _> = Load::ALL
            .iter()
            .map(|load| {
                let configs: serde_json::Map<_, _> = Config::ALL
                    .iter()
                    .filter_map(|c| {
                        self.results.get(&(*load, *c)).map(|v| {
                            let mut s = stat(v);
                            s["ratio_to_no_agent"] =
                                json!(self.median(*load, *c) / self.median(*load, Config::NoAgent));
                            (c.name().to_string(), s)
                        })
                    })
                    .collect();
                (load.name().to_string(), Value::Object(configs))
            })
            .collect();
        json!({
            "rounds": self.rounds,
            "seconds": self.seconds,
            "loads": loads,
            "cpu_percent": self.cpu.iter().map(|(c, v)| (c.name().to_string(), stat(v))).collect::<serde_json::Map<_, _>>(),
            "programs": self.costs.iter().map(|(n, c)| {
                let by_load: serde_json::Map<_, _> = Load::ALL.iter().filter_map(|load| {
                    self.load_costs.get(&(*load, n.clone())).map(|c| (load.key().to_string(), json!({"runs": c.runs, "ns_per_run": c.ns_per_run()})))
                }).collect();
                let empty: serde_json::Map<_, _> = Load::ALL.iter()
                    .filter(|load| self.floor_costs.contains_key(&(**load, n.clone())))
                    .map(|load| (load.key().to_string(), json!(ns_under(&self.floor_costs, *load, n))))
                    .collect();
                let mut v = json!({"runs": c.runs, "ns_per_run": c.ns_per_run(), "sampled_ns_per_run": sampled_cost(&self.load_costs, n).ns_per_run(), "by_load": by_load});
                if !empty.is_empty() {
                    v["empty_program_ns_per_run"] = json!({"sampled": sampled_cost(&self.floor_costs, n).ns_per_run(), "by_load": empty});
                }
                (n.clone(), v)
            }).collect::<serde_json::Map<_, _>>(),
            "per_transaction": ([Load::Rr, Load::Crr].iter().filter_map(|load| {
                let (kernel, agent) = self.per_transaction(*load)?;
                let mut v = json!({"kernel_us": kernel, "agent_cpu_us": agent});
                if let Some((kernel, agent)) = self.floor_per_transaction(*load) {
                    v["floor"] = json!({"kernel_us": kernel, "agent_cpu_us": agent});
                }
                if let Some((kernel, agent)) = self.enforce_per_transaction(*load) {
                    v["enforce"] = json!({"kernel_us": kernel, "agent_cpu_us": agent});
                }
                Some((load.key().to_string(), v))
            }).collect::<serde_json::Map<_, _>>()),
            "enforce_vs_off": Load::ALL.iter().map(|load| (load.key().to_string(), json!(self.median(*load, Config::Enforce) / self.median(*load, Config::Agent)))).collect::<serde_json::Map<_, _>>(),
            "churn": self.churn.as_ref().map(|(rate, lost)| json!({"new_connections_per_second": rate, "events_lost": lost})),
            "memory": self.memory.iter().map(|(n, m)| json!({"open_flows": n, "agent": m})).collect::<Vec<_>>(),
            "targets": self.targets().into_iter().map(|(key, value, wanted, met)| (key, json!({"value": value, "wanted": wanted, "met": met}))).collect::<serde_json::Map<_, _>>(),
        })
    }
}
