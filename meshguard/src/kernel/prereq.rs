//! What the agent needs from the node, checked before anything is loaded, with errors that say
//! what to do: privileges, a cgroup v2 mount, BTF, and the bpf and trace filesystems (mounted
//! here when they are missing and we may).

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// Where the kernel side attaches and what it may use.
#[derive(Clone, Debug)]
pub struct Node {
    /// The cgroup v2 root: programs attached here see every pod's sockets.
    pub cgroup_root: PathBuf,
    /// Kernel BTF is available: BTF tracepoints can load.
    pub btf: bool,
    /// Where pinned maps and links will live; `None` if bpffs could not be mounted.
    pub bpffs: Option<PathBuf>,
    /// For the classic tracepoint fallback; `None` if tracefs could not be mounted.
    pub tracefs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrereqError {
    #[error(
        "missing capabilities: {}. Run the agent as root, or grant CAP_BPF, CAP_PERFMON and \
         CAP_NET_ADMIN (CAP_SYS_ADMIN on kernels before 5.8)",
        .0.join(", ")
    )]
    Capabilities(Vec<&'static str>),
    #[error(
        "no cgroup v2 filesystem is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or, \
         in a container, mount the host's cgroup v2 root"
    )]
    NoCgroup2,
    #[error("--cgroup-root {0} is not a cgroup v2 directory (it has no cgroup.controllers)")]
    NotCgroup2(String),
    #[error("cannot read {path}: {reason}")]
    Read { path: &'static str, reason: String },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPFFS_PATH: &str = "/sys/fs/bpf";
const TRACEFS_PATH: &str = "/sys/kernel/tracing";

/// Checks the node. `cgroup_root` overrides the cgroup v2 root found in mountinfo: in a pod,
/// the agent's own `/sys/fs/cgroup` is its container's, and the host's is mounted elsewhere.
pub fn check(cgroup_root: Option<&Path>) -> Result<Node, PrereqError> {
    let status = read("/proc/self/status")?;
    let missing = missing_capabilities(effective_capabilities(&status));
    if !missing.is_empty() {
        return Err(PrereqError::Capabilities(missing));
    }
    let mountinfo = read("/proc/self/mountinfo")?;
    let cgroup_root = match cgroup_root {
        Some(root) if root.join("cgroup.controllers").exists() => root.to_path_buf(),
        Some(root) => return Err(PrereqError::NotCgroup2(root.display().to_string())),
        None => find_mount(&mountinfo, "cgroup2").ok_or(PrereqError::NoCgroup2)?,
    };
    raise_memlock();
    let btf = Path::new(super::btf::VMLINUX).exists();
    if !btf {
        warn!(
            path = super::btf::VMLINUX,
            "kernel BTF not found: flows will have no process attribution"
        );
    }
    Ok(Node {
        cgroup_root,
        btf,
        bpffs: ensure_mounted("bpf", BPFFS_PATH, BPF_FS_MAGIC),
        tracefs: ensure_mounted("tracefs", TRACEFS_PATH, TRACEFS_MAGIC),
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, not the memory cgroup; lift it where
/// allowed (later kernels ignore it).
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("RLIMIT_MEMLOCK not raised (fine on kernels from 5.11)");
    }
}

fn read(path: &'static str) -> Result<String, PrereqError> {
    fs::read_to_string(path).map_err(|e| PrereqError::Read {
        path,
        reason: e.to_string(),
    })
}

/// The `CapEff` mask from `/proc/self/status`.
pub fn effective_capabilities(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// CAP_SYS_ADMIN covers everything; otherwise CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|&(cap, _)| !has(cap))
    .map(|(_, name)| name)
    .collect()
}

/// The mount point of the first filesystem of type `fstype` in a `/proc/*/mountinfo` text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != fstype {
            return None;
        }
        let mount_point = left.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fs_magic(path: &str) -> Option<i64> {
    let c_path = CString::new(path).ok()?;
    // SAFETY: `statfs` writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        (libc::statfs(c_path.as_ptr(), &mut buf) == 0).then_some(buf.f_type as i64)
    }
}

/// Mounts `fstype` at `path` unless it is already there; `None` (with a warning) if it cannot.
fn ensure_mounted(fstype: &str, path: &str, magic: i64) -> Option<PathBuf> {
    if fs_magic(path) == Some(magic) {
        return Some(PathBuf::from(path));
    }
    let (Ok(c_fstype), Ok(c_path)) = (CString::new(fstype), CString::new(path)) else {
        return None;
    };
    // SAFETY: plain mount(2) with NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            c_fstype.as_ptr(),
            c_path.as_ptr(),
            c_fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!(fstype, path, "mounted");
        Some(PathBuf::from(path))
    } else {
        let err = std::io::Error::last_os_error();
        warn!(fstype, path, %err, "not mounted and could not mount it");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        let bit = |cap: u32| 1u64 << cap;
        let cases: [(u64, &[&str]); 5] = [
            (0, &["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]),
            (bit(CAP_SYS_ADMIN), &[]),
            (bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN), &[]),
            (bit(CAP_BPF) | bit(CAP_NET_ADMIN), &["CAP_PERFMON"]),
            (u64::MAX, &[]),
        ];
        for (mask, want) in cases {
            assert_eq!(missing_capabilities(mask), want, "{mask:x}");
        }
        let status = "Name:\tmeshguard\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), 0x1ff_ffff_ffff);
        assert_eq!(effective_capabilities("Name: x\n"), 0);
    }

    #[test]
    fn mounts() {
        let mountinfo = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
45 35 0:40 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
46 35 0:41 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
47 25 0:42 / /mnt/with\\040space rw - bpf bpf rw
";
        let cases = [
            ("cgroup2", Some("/sys/fs/cgroup/unified")),
            ("bpf", Some("/mnt/with space")),
            ("tracefs", None),
        ];
        for (fstype, want) in cases {
            assert_eq!(
                find_mount(mountinfo, fstype),
                want.map(PathBuf::from),
                "{fstype}"
            );
        }
        assert_eq!(find_mount("garbage\n\n - \n", "cgroup2"), None);
    }
}
