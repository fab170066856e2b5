//! The real agent under test, its flow records collected as they come.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{run, sys::Cgroup};

/// The meshguard binary under test: `MESHGUARD_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build, built now if missing.
pub fn meshguard_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("MESHGUARD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "meshguard"])
            .current_dir(workspace),
    )?;
    Ok(workspace.join("target/debug/meshguard"))
}

/// A build of meshguard whose kernel programs differ from [`meshguard_bin`]'s (the eBPF
/// crate's `variant` feature), to replace one with the other as an upgrade does:
/// `MESHGUARD_VARIANT_BIN` (set by `cargo xtask test`), else built now under `target/variant`.
pub fn variant_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("MESHGUARD_VARIANT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let target = workspace.join("target/variant");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "meshguard", "--target-dir"])
            .arg(&target)
            .env("MESHGUARD_EBPF_VARIANT", "1")
            .current_dir(workspace),
    )?;
    Ok(target.join("debug/meshguard"))
}

/// A bpffs directory of a test's own for the agent's pins (`--bpf-pin-dir`); dropping it runs
/// `meshguard uninstall` on it, so that nothing stays attached after the test, even a failed one.
pub struct Pins {
    pub path: PathBuf,
}

impl Pins {
    pub fn new(name: &str) -> Self {
        Self {
            path: PathBuf::from(format!(
                "/sys/fs/bpf/meshguard-test-{}-{name}",
                std::process::id()
            )),
        }
    }

    /// The pinned generations (one per set of programs attached).
    pub fn generations(&self) -> Vec<String> {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let uninstalled = meshguard_bin().ok().is_some_and(|bin| {
            Command::new(bin)
                .arg("uninstall")
                .arg("--bpf-pin-dir")
                .arg(&self.path)
                .output()
                .is_ok_and(|out| out.status.success())
        });
        if !uninstalled {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The real agent, running with `--log-flows`; its records are collected as they come.
pub struct Agent {
    child: Child,
    /// The agent's API socket.
    pub socket: PathBuf,
    records: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Pins of the agent's own (unless the test passed `--bpf-pin-dir`), removed after it.
    _pins: Option<Pins>,
}

impl Agent {
    /// Starts the agent in `cgroup` and waits until it has attached.
    pub fn start(cgroup: &Cgroup, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(&meshguard_bin()?, cgroup, extra_args)
    }

    /// As [`Agent::start`], with another build of meshguard.
    pub fn start_with(bin: &Path, cgroup: &Cgroup, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["agent", "--log-flows", "--node-name", "test-node"]);
        // Tests run beside each other and the demo: metrics on a free loopback port, the API
        // on a socket of the test's own.
        if !extra_args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let name = cgroup
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("agent");
        let socket =
            std::env::temp_dir().join(format!("meshguard-{}-{name}.sock", std::process::id()));
        if !extra_args.contains(&"--api-socket") {
            cmd.arg("--api-socket").arg(&socket);
        }
        let pins = (!extra_args.contains(&"--bpf-pin-dir")).then(|| Pins::new(name));
        if let Some(pins) = &pins {
            cmd.arg("--bpf-pin-dir").arg(&pins.path);
        }
        cmd.args(extra_args);
        let mut agent = Self::start_command(cgroup, cmd)?;
        agent.socket = socket;
        agent._pins = pins;
        Ok(agent)
    }

    /// Starts an agent from a command of the caller's (a wrapper such as setpriv, say), which
    /// names its `--bpf-pin-dir` (or "off").
    pub fn start_command(cgroup: &Cgroup, mut cmd: Command) -> anyhow::Result<Self> {
        let socket = PathBuf::new();
        let mut child = cgroup.spawn(cmd.env("RUST_LOG", "info").env("NO_COLOR", "1"))?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("agent stdout")?;
        let sink = Arc::clone(&records);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str(&line) {
                    Ok(v) => sink.lock().unwrap().push(v),
                    Err(e) => eprintln!("agent printed a line that is not JSON ({e}): {line}"),
                }
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let err = child.stderr.take().context("agent stderr")?;
        let log = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("watching flows") {
                    let _ = ready_tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        let mut agent = Self {
            child,
            socket,
            records,
            stderr,
            _pins: None,
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let status = agent.child.try_wait()?;
            bail!(
                "agent not ready (exit: {status:?}); its log:\n{}",
                agent.log()
            );
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the agent serves `/metrics`, from its log.
    pub fn metrics_addr(&self) -> Option<String> {
        self.stderr.lock().unwrap().iter().find_map(|line| {
            let at = line.find("addr=")? + 5;
            line[at..].split_whitespace().next().map(str::to_string)
        })
    }

    /// `meshguard status -o json` of the agent, through its API socket.
    pub fn status(&self) -> Value {
        let out = Command::new(meshguard_bin().expect("meshguard"))
            .args(["status", "-o", "json", "--agent"])
            .arg(&self.socket)
            .output()
            .expect("meshguard status");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The agent's `/metrics` page, read with curl.
    pub fn metrics_page(&self) -> String {
        let addr = self
            .metrics_addr()
            .expect("the agent logs its metrics address");
        let out = Command::new("curl")
            .args(["-sS", &format!("http://{addr}/metrics")])
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until `pick` finds `n` records (of the `closed` event, say) and returns them.
    pub fn wait_for(
        &self,
        n: usize,
        what: &str,
        pick: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found: Vec<Value> = self
                .records
                .lock()
                .unwrap()
                .iter()
                .filter(|r| pick(r))
                .cloned()
                .collect();
            if found.len() >= n {
                return Ok(found);
            }
            if Instant::now() > deadline {
                let all = self.records.lock().unwrap().clone();
                bail!(
                    "waited 15s for {n} record(s) of {what}, found {}:\n{}\nall records:\n{}\nagent log:\n{}",
                    found.len(),
                    pretty(&found),
                    pretty(&all),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent with SIGKILL, as a crash or the OOM killer would; returns its log.
    pub fn kill9(mut self) -> anyhow::Result<String> {
        let pid = i32::try_from(self.child.id())?;
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.child.wait()?;
        Ok(self.log())
    }

    /// Sends SIGHUP: the agent reads its configuration again.
    pub fn hangup(&self) {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    /// Records collected so far.
    pub fn records(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }

    /// Stops the agent as an operator would (SIGTERM) and checks that it exited cleanly.
    pub fn stop(mut self) -> anyhow::Result<String> {
        terminate(&mut self.child)?;
        let status = self.child.wait()?;
        let log = self.log();
        if !status.success() {
            bail!("agent exited with {status}; its log:\n{log}");
        }
        Ok(log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = terminate(&mut self.child);
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn terminate(child: &mut Child) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())?;
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    Ok(())
}

fn pretty(records: &[Value]) -> String {
    records
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Record field helpers, for readable assertions.
pub trait RecordExt {
    fn str_at(&self, pointer: &str) -> &str;
    fn u64_at(&self, pointer: &str) -> u64;
}

impl RecordExt for Value {
    fn str_at(&self, pointer: &str) -> &str {
        self.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{pointer} missing in {self}"))
    }
    fn u64_at(&self, pointer: &str) -> u64 {
        self.pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{pointer} missing in {self}"))
    }
}
