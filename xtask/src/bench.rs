//! `cargo xtask bench`: what meshguard costs the node. Runs the same load with and without the
//! agent, alternating A B A B in one go so that drift on a shared machine cancels, and reports
//! medians with min and max and the ratio to no agent; then each kernel program's cost per run
//! (`kernel.bpf_stats_enabled`) in a run of its own.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use meshguard_tests::{link, Cgroup, Netns};
use serde_json::{json, Value};

use crate::{cargo, step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds per configuration.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// A short run that only proves every figure is produced (for the test suite).
    #[arg(long)]
    smoke: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    NoAgent,
    Agent,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::NoAgent => "no agent",
            Config::Agent => "meshguard agent",
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

pub fn run(args: &Args) -> anyhow::Result<()> {
    let (rounds, seconds) = if args.smoke {
        (1, 1)
    } else {
        (args.rounds, args.seconds)
    };
    step(
        "build meshguard (release)",
        cargo().args(["build", "--release", "-p", "meshguard"]),
    )?;
    let bin = workspace_root().join("target/release/meshguard");

    let cgroup = Cgroup::new("bench")?;
    let client = Netns::new("mgb-c")?;
    let server = Netns::new("mgb-s")?;
    link(
        &client,
        ["10.202.0.1/24", "fd00:202::1/64"],
        &server,
        [&format!("{SERVER}/24"), "fd00:202::2/64"],
    )?;
    let _iperf = cgroup.start(server.command("iperf3").args(["-s", "-B", SERVER]))?;
    thread::sleep(Duration::from_millis(500));

    let mut report = Report {
        rounds,
        seconds,
        ..Report::default()
    };
    // Throughput with bpf_stats off: the stats' own clock reads would be charged to the agent.
    let stats_before = fs::read_to_string(BPF_STATS).unwrap_or_default();
    set_bpf_stats("0")?;
    let measured = measure(&bin, &cgroup, &client, &mut report);
    let _ = set_bpf_stats(stats_before.trim());
    measured?;

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

fn measure(bin: &Path, cgroup: &Cgroup, client: &Netns, report: &mut Report) -> anyhow::Result<()> {
    let (rounds, seconds) = (report.rounds, report.seconds);
    for round in 0..rounds {
        for config in [Config::NoAgent, Config::Agent] {
            println!("==> round {}/{rounds}: {} ...", round + 1, config.name());
            let agent = match config {
                Config::Agent => Some(start_agent(bin, cgroup)?),
                Config::NoAgent => None,
            };
            let cpu_before = agent.as_ref().map(|a| cpu_seconds(a.id())).transpose()?;
            let gbps = iperf(client, seconds)?;
            report.throughput.entry(config).or_default().push(gbps);
            if let (Some(mut agent), Some(before)) = (agent, cpu_before) {
                let used = cpu_seconds(agent.id())? - before;
                report.agent_cpu.push(used / f64::from(seconds) * 100.0);
                stop(&mut agent)?;
            }
            println!("    {gbps:.2} Gbit/s");
        }
    }

    println!("==> per-program cost (kernel.bpf_stats_enabled=1) ...");
    set_bpf_stats("1")?;
    let started = SystemTime::now() - Duration::from_secs(1);
    let mut agent = start_agent(bin, cgroup)?;
    let result = iperf(client, seconds).and_then(|_| program_costs(started));
    stop(&mut agent)?;
    report.costs = result?;
    Ok(())
}

fn set_bpf_stats(value: &str) -> anyhow::Result<()> {
    fs::write(BPF_STATS, value).context("setting kernel.bpf_stats_enabled")
}

fn start_agent(bin: &Path, cgroup: &Cgroup) -> anyhow::Result<Child> {
    let mut child = cgroup.spawn(Command::new(bin).arg("agent").env("RUST_LOG", "warn"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while program_costs(SystemTime::now() - Duration::from_secs(10))?.len() < 4 {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            bail!("the agent did not attach");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn stop(agent: &mut Child) -> anyhow::Result<()> {
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    agent.wait()?;
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

/// One iperf3 stream test; returns the receiver's Gbit/s.
fn iperf(client: &Netns, seconds: u32) -> anyhow::Result<f64> {
    let out = client
        .command("iperf3")
        .args(["-c", SERVER, "-J", "-t", &seconds.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
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
    throughput: BTreeMap<Config, Vec<f64>>,
    costs: BTreeMap<String, ProgramCost>,
    agent_cpu: Vec<f64>,
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
    fn median(&self, config: Config) -> f64 {
        summary(self.throughput.get(&config).map_or(&[][..], Vec::as_slice)).0
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# meshguard overhead\n");
        let _ = writeln!(
            md,
            "`cargo xtask bench --rounds {r} --seconds {s}`: iperf3 stream between two network \
             namespaces over veth, configurations alternated A B A B; median (min to max) of {r} \
             runs each.\n",
            r = self.rounds,
            s = self.seconds
        );
        let _ = writeln!(
            md,
            "| configuration | stream Gbit/s | ratio to no agent |\n|---|---|---|"
        );
        for (config, values) in &self.throughput {
            let (median, min, max) = summary(values);
            let ratio = median / self.median(Config::NoAgent);
            let _ = writeln!(
                md,
                "| {} | {median:.2} ({min:.2} to {max:.2}) | {ratio:.3} |",
                config.name()
            );
        }
        let _ = writeln!(
            md,
            "\n| kernel program | runs | ns per run |\n|---|---|---|"
        );
        for (name, cost) in &self.costs {
            let _ = writeln!(
                md,
                "| `{name}` | {} | {:.0} |",
                cost.runs,
                cost.ns_per_run()
            );
        }
        let (cpu, min, max) = summary(&self.agent_cpu);
        let _ = writeln!(
            md,
            "\nAgent CPU during the stream: {cpu:.1} % of one core ({min:.1} to {max:.1})."
        );
        md
    }

    fn json(&self) -> Value {
        let stat = |values: &[f64]| {
            let (median, min, max) = summary(values);
            json!({"median": median, "min": min, "max": max, "runs": values})
        };
        let throughput: serde_json::Map<_, _> = self
            .throughput
            .iter()
            .map(|(c, v)| (c.name().to_string(), stat(v)))
            .collect();
        let programs: serde_json::Map<_, _> = self
            .costs
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    json!({"runs": c.runs, "ns_per_run": c.ns_per_run()}),
                )
            })
            .collect();
        json!({
            "rounds": self.rounds,
            "seconds": self.seconds,
            "stream_gbps": throughput,
            "stream_ratio_to_no_agent": self.median(Config::Agent) / self.median(Config::NoAgent),
            "programs": programs,
            "agent_cpu_percent": stat(&self.agent_cpu),
        })
    }
}
