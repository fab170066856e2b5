//! The ground meshguard's privileged tests stand on: network namespaces joined by veth pairs,
//! a cgroup v2 directory per test in which every process it starts runs, and the real agent
//! reporting flows as JSON. Everything made here is torn down on drop, also when a test fails.
//!
//! These tests need root. Without it they fail loudly in CI (`CI` set) and are skipped, saying
//! so, elsewhere.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// Whether privileged tests can run here. Panics in CI when they cannot: a CI run that skipped
/// them would claim a coverage it does not have.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        for tool in ["ip", "curl", "openssl", "socat", "python3"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(found, "{tool} is missing: run `cargo xtask setup`");
        }
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "privileged tests must run as root in CI (network namespaces, cgroups, eBPF)"
    );
    eprintln!("skipped: needs root (network namespaces, cgroups, eBPF)");
    false
}

/// Runs a command to completion; fails with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A network namespace with its loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        // A namespace left by a crashed run of the same test is replaced.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `cmd` to run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins two namespaces with a veth pair and gives each end an IPv4 and an IPv6 address.
pub fn link(a: &Netns, a_addrs: [&str; 2], b: &Netns, b_addrs: [&str; 2]) -> anyhow::Result<()> {
    let (ea, eb) = (format!("{}-v", a.name), format!("{}-v", b.name));
    ip(&[
        "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name,
    ])?;
    for (ns, dev, addrs) in [(a, &ea, a_addrs), (b, &eb, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["-n", &ns.name, "addr", "add", addr, "dev", dev];
            if addr.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("meshguard-test-{tag}-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A cgroup v2 directory for one test; every process started through it runs inside, and all
/// of them are killed and the directory removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = cgroup2_root()?.join("meshguard-tests");
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let path = root.join(name);
        if path.exists() {
            kill_and_remove(&path);
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Spawns `cmd` inside this cgroup, with its stdout and stderr piped.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<Child> {
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )?;
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().with_context(|| format!("starting {cmd:?}"))
    }

    /// Starts a background service (a server) inside this cgroup; it is killed and reaped when
    /// the returned guard drops.
    pub fn start(&self, cmd: &mut Command) -> anyhow::Result<Service> {
        self.spawn(cmd).map(Service)
    }

    /// Runs `cmd` inside this cgroup to completion; fails with its stderr.
    pub fn run(&self, cmd: &mut Command) -> anyhow::Result<Output> {
        let out = self.spawn(cmd)?.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }
}

/// A background process started by a test.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

fn kill_and_remove(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove {}", path.display());
}

pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split(' ').next()? != "cgroup2" {
                return None;
            }
            left.split(' ').nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 mount")
}

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

/// The real agent, running with `--log-flows`; its records are collected as they come.
pub struct Agent {
    child: Child,
    records: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts the agent in `cgroup` and waits until it has attached.
    pub fn start(cgroup: &Cgroup, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut child = cgroup.spawn(
            Command::new(meshguard_bin()?)
                .args(["agent", "--log-flows", "--node-name", "test-node"])
                .args(extra_args)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
        )?;
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
            records,
            stderr,
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
