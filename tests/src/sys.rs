//! Kernel objects a test makes and always removes: network namespaces, veth links, cgroup v2
//! directories (every process a test starts runs in one), scratch directories.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::run;

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
/// of them (with those of any cgroup nested below) are killed and the directories removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
    /// Left in place (with its processes) on drop.
    keep: bool,
}

impl Cgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Self::at(&Path::new("meshguard-tests").join(name))
    }

    /// A cgroup at `relative` below the cgroup v2 root, replacing one left by a crashed run.
    pub fn at(relative: &Path) -> anyhow::Result<Self> {
        let path = cgroup2_root()?.join(relative);
        if path.exists() {
            kill_and_remove(&path);
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep: false })
    }

    /// An existing cgroup, to be emptied and removed (with every cgroup below it) on drop.
    pub fn existing(path: PathBuf) -> Self {
        Self { path, keep: false }
    }

    /// The processes in this cgroup (not those of cgroups below it).
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Leaves this cgroup and its processes running after drop.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Spawns `cmd` inside this cgroup with its output appended to `log`: for processes that
    /// may outlive the test process (the demo node), which a closed pipe would kill.
    pub fn spawn_logged(&self, cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
        self.spawn_to(cmd, log, log)
    }

    /// Like [`Cgroup::spawn_logged`], with stdout and stderr appended to files of their own.
    pub fn spawn_to(
        &self,
        cmd: &mut Command,
        stdout: &Path,
        stderr: &Path,
    ) -> anyhow::Result<Child> {
        let open = |path: &Path| {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
        };
        self.enter_on_exec(cmd)?;
        cmd.stdin(Stdio::null())
            .stdout(open(stdout)?)
            .stderr(open(stderr)?);
        cmd.spawn().with_context(|| format!("starting {cmd:?}"))
    }

    /// Spawns `cmd` inside this cgroup, with its stdout and stderr piped.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<Child> {
        self.enter_on_exec(cmd)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().with_context(|| format!("starting {cmd:?}"))
    }

    /// Makes `cmd`'s process join this cgroup before it executes anything.
    fn enter_on_exec(&self, cmd: &mut Command) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// Starts a background service (a server) inside this cgroup; it is killed and reaped when
    /// the returned guard drops.
    pub fn start(&self, cmd: &mut Command) -> anyhow::Result<Service> {
        self.spawn(cmd).map(Service)
    }

    /// Runs `cmd` inside this cgroup to completion; fails with its stderr.
    pub fn run(&self, cmd: &mut Command) -> anyhow::Result<Output> {
        let out = self.spawn(cmd)?.wait_with_output()?;
        crate::succeeded(cmd, out)
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
        if self.keep {
            return;
        }
        kill_and_remove(&self.path);
    }
}

/// Kills every process in the cgroup at `path` and its descendants (`cgroup.kill` takes the
/// whole subtree), then removes the directories deepest first: a cgroup with children cannot go.
fn kill_and_remove(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    remove_tree(path);
}

fn remove_tree(path: &Path) {
    for child in fs::read_dir(path).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&child.path());
        }
    }
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
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
