//! Which container owns a cgroup. The kernel names a socket's owner by its cgroup id, the inode
//! number of the owner's cgroup v2 directory (what `bpf_skb_cgroup_id` returns); the kubelet
//! and the container runtime name those directories after the pod uid and the container id.
//! This module reads the names back: a pure parser of one directory name, and an index of a
//! node's tree from cgroup id to owner.
//!
//! Below a container's own directory the names are never read, only inherited: a runtime may
//! delegate that subtree to the container (crun puts the processes in a `container` child), and
//! a container must not pass for another, say the proxy, by naming a sub-cgroup after its id.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt, fs, io,
    os::unix::fs::DirEntryExt as _,
    path::Path,
};

use serde::Serialize;

/// Runtimes that prefix a pod status's `containerID` (`cri-dockerd` reports `docker`).
const RUNTIMES: [&str; 3] = ["containerd", "cri-o", "docker"];
/// `docker ps` and some runtimes print ids cut to this length.
const SHORT_ID_LEN: usize = 12;
const FULL_ID_LEN: usize = 64;

/// A container runtime's id of a container: 12 to 64 hex digits, held lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ContainerId(String);

impl ContainerId {
    /// A bare id, as a cgroup name or `crictl ps` shows it.
    pub fn from_hex(hex: &str) -> Result<ContainerId, String> {
        if !(SHORT_ID_LEN..=FULL_ID_LEN).contains(&hex.len())
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!(
                "{hex:?} is not a container id ({SHORT_ID_LEN} to {FULL_ID_LEN} hex digits)"
            ));
        }
        Ok(ContainerId(hex.to_ascii_lowercase()))
    }

    /// A pod status's `containerID`: `containerd://ID`, `cri-o://ID` or `docker://ID`.
    pub fn from_status(status: &str) -> Result<ContainerId, String> {
        let Some((runtime, id)) = status.split_once("://") else {
            return Err(format!("containerID {status:?} is not RUNTIME://ID"));
        };
        if !RUNTIMES.contains(&runtime) {
            return Err(format!(
                "containerID {status:?}: runtime {runtime:?} is not one of {}",
                RUNTIMES.join(", ")
            ));
        }
        ContainerId::from_hex(id).map_err(|e| format!("containerID {status:?}: {e}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the whole id, not a short form of it.
    pub fn is_full(&self) -> bool {
        self.0.len() == FULL_ID_LEN
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a cgroup directory's name says it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupOwner {
    Container(ContainerId),
    /// The pod-level cgroup (its containers sit below it); the uid as in `metadata.uid`.
    Pod {
        uid: String,
    },
}

/// Reads one cgroup directory name as the kubelet's systemd or cgroupfs driver and the
/// runtimes make it; anything else (QoS slices, system services, `crio-conmon-ID.scope`, the
/// monitor beside a CRI-O container rather than the container) is `None`.
pub fn parse_cgroup_name(dir_name: &str) -> Option<CgroupOwner> {
    if let Some(unit) = dir_name.strip_suffix(".slice") {
        // systemd: `-` nests slices, so the uid's dashes are written `_`:
        // kubepods-burstable-pod<uid_>.slice, kind's kubelet-kubepods-pod<uid_>.slice.
        let (parents, pod) = unit.rsplit_once('-')?;
        if !parents.split('-').any(|p| p == "kubepods") {
            return None;
        }
        let uid = pod_uid(&pod.strip_prefix("pod")?.replace('_', "-"))?;
        return Some(CgroupOwner::Pod { uid });
    }
    if let Some(unit) = dir_name.strip_suffix(".scope") {
        let id = ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|prefix| unit.strip_prefix(prefix))?;
        return full_id(id).map(CgroupOwner::Container);
    }
    // cgroupfs: pod<uid> with its dashes, then <id> or crio-<id>.
    if let Some(uid) = dir_name.strip_prefix("pod") {
        return pod_uid(uid).map(|uid| CgroupOwner::Pod { uid });
    }
    full_id(dir_name.strip_prefix("crio-").unwrap_or(dir_name)).map(CgroupOwner::Container)
}

/// Runtimes name cgroups with the whole id; a shorter hex name is not theirs.
fn full_id(hex: &str) -> Option<ContainerId> {
    ContainerId::from_hex(hex).ok().filter(ContainerId::is_full)
}

/// A pod uid as the API server writes it (a UUID), or a static pod's (32 hex digits, the
/// hash of its manifest, which its mirror pod carries in `kubernetes.io/config.mirror`).
fn pod_uid(uid: &str) -> Option<String> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    let uuid = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g));
    let static_pod = uid.len() == 32 && hex(uid);
    (uuid || static_pod).then(|| uid.to_ascii_lowercase())
}

/// Who owns one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupEntry {
    /// The container, or the pod when the cgroup is the pod's own or one of its others (the
    /// CRI-O monitor's); a cgroup below a container's is that container's.
    pub owner: CgroupOwner,
    /// The nearest pod-level ancestor's uid (the pod's own for a pod cgroup).
    pub pod_uid: Option<String>,
}

/// What a directory is, from its parent's entry and its own name.
fn place(parent: Option<&CgroupEntry>, name: &str) -> Option<CgroupEntry> {
    if let Some(
        inside @ CgroupEntry {
            owner: CgroupOwner::Container(_),
            ..
        },
    ) = parent
    {
        return Some(inside.clone());
    }
    match parse_cgroup_name(name) {
        Some(CgroupOwner::Pod { uid }) => Some(CgroupEntry {
            pod_uid: Some(uid.clone()),
            owner: CgroupOwner::Pod { uid },
        }),
        Some(container) => Some(CgroupEntry {
            owner: container,
            pod_uid: parent.and_then(|p| p.pod_uid.clone()),
        }),
        None => parent.cloned(),
    }
}

/// How far a scan goes.
#[derive(Clone, Copy, Debug)]
pub struct ScanLimits {
    /// Levels below the root (kind's deepest container cgroups are at 5).
    pub max_depth: usize,
    pub max_dirs: usize,
}

impl Default for ScanLimits {
    fn default() -> Self {
        ScanLimits {
            max_depth: 12,
            max_dirs: 200_000,
        }
    }
}

/// Directories a scan did not index, by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub too_deep: usize,
    /// Seen once the directory limit was reached (a lower bound: their children went unseen).
    pub over_limit: usize,
    /// Gone between being listed and being read: containers come and go.
    pub vanished: usize,
    pub unreadable: usize,
}

impl Skipped {
    pub fn is_empty(&self) -> bool {
        *self == Skipped::default()
    }

    fn count_error(&mut self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::NotFound => self.vanished += 1,
            _ => self.unreadable += 1,
        }
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} too deep, {} past the directory limit, {} vanished, {} unreadable",
            self.too_deep, self.over_limit, self.vanished, self.unreadable
        )
    }
}

/// Cgroup id to owner, for the pods' and containers' cgroups of one node.
#[derive(Debug, Default)]
pub struct CgroupIndex {
    entries: HashMap<u64, CgroupEntry>,
    /// The other cgroups the walk found (the node's own), so that a socket in one of them needs
    /// no walk again to be known as the host's.
    others: HashSet<u64>,
    containers: usize,
    skipped: Skipped,
}

impl CgroupIndex {
    /// From directories given by their path below the root (`/`-separated) and cgroup id, in
    /// any order; the pure core of [`CgroupIndex::scan`].
    pub fn from_entries<'a>(dirs: impl IntoIterator<Item = (&'a str, u64)>) -> CgroupIndex {
        let mut index = CgroupIndex::default();
        for (path, id) in dirs {
            let entry = path
                .split('/')
                .filter(|c| !c.is_empty())
                .fold(None, |parent, name| place(parent.as_ref(), name));
            index.insert(id, entry);
        }
        index.count_containers();
        index
    }

    /// Walks the cgroup v2 tree below `root` (its mount point, or the node's view of it).
    pub fn scan(root: &Path) -> io::Result<CgroupIndex> {
        CgroupIndex::scan_with(root, ScanLimits::default())
    }

    /// Breadth-first, so that the levels the kubelet makes are all read before anything
    /// deeper, and the directory limit cuts the deepest first. Symlinks are not followed; a
    /// directory that vanishes or cannot be read is counted and skipped; only an unreadable
    /// root is an error.
    pub fn scan_with(root: &Path, limits: ScanLimits) -> io::Result<CgroupIndex> {
        let mut index = CgroupIndex::default();
        let mut queue = VecDeque::from([(root.to_path_buf(), 0, None::<CgroupEntry>)]);
        let mut seen = 0;
        while let Some((dir, depth, parent)) = queue.pop_front() {
            let listing = match fs::read_dir(&dir) {
                Ok(listing) => listing,
                Err(e) if depth == 0 => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cgroup v2 tree {}: {e} (mount the host's /sys/fs/cgroup there)",
                            dir.display()
                        ),
                    ))
                }
                Err(e) => {
                    index.skipped.count_error(&e);
                    continue;
                }
            };
            for dirent in listing {
                let dirent = match dirent {
                    Ok(d) => d,
                    Err(e) => {
                        index.skipped.count_error(&e);
                        continue;
                    }
                };
                // The entry's own type: a symlink is not a directory here.
                match dirent.file_type() {
                    Ok(t) if t.is_dir() => {}
                    Ok(_) => continue,
                    Err(e) => {
                        index.skipped.count_error(&e);
                        continue;
                    }
                }
                if depth >= limits.max_depth {
                    index.skipped.too_deep += 1;
                    continue;
                }
                if seen >= limits.max_dirs {
                    index.skipped.over_limit += 1;
                    continue;
                }
                seen += 1;
                let entry = place(parent.as_ref(), &dirent.file_name().to_string_lossy());
                // On cgroupfs (kernfs) the inode number readdir reports is the cgroup id.
                index.insert(dirent.ino(), entry.clone());
                queue.push_back((dirent.path(), depth + 1, entry));
            }
        }
        index.count_containers();
        Ok(index)
    }

    fn insert(&mut self, id: u64, entry: Option<CgroupEntry>) {
        match entry {
            Some(entry) => {
                self.entries.insert(id, entry);
            }
            None => {
                self.others.insert(id);
            }
        }
    }

    /// Whether the walk found this cgroup at all, a pod's or not.
    pub fn seen(&self, cgroup_id: u64) -> bool {
        self.entries.contains_key(&cgroup_id) || self.others.contains(&cgroup_id)
    }

    fn count_containers(&mut self) {
        self.containers = self
            .entries
            .values()
            .filter_map(|e| match &e.owner {
                CgroupOwner::Container(id) => Some(id),
                CgroupOwner::Pod { .. } => None,
            })
            .collect::<HashSet<_>>()
            .len();
    }

    /// Every pod's and container's cgroup, by id.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &CgroupEntry)> {
        self.entries.iter().map(|(id, entry)| (*id, entry))
    }

    pub fn get(&self, cgroup_id: u64) -> Option<&CgroupEntry> {
        self.entries.get(&cgroup_id)
    }

    /// Cgroups indexed: pods', containers' and those below them.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct containers found.
    pub fn containers(&self) -> usize {
        self.containers
    }

    /// What the scan left out; empty for [`CgroupIndex::from_entries`].
    pub fn skipped(&self) -> &Skipped {
        &self.skipped
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    const UID: &str = "b3e9a8d2-51c4-4f0a-a7e6-9c2d4f1b8e30";
    const UID_: &str = "b3e9a8d2_51c4_4f0a_a7e6_9c2d4f1b8e30";
    const APP: &str = "4f1c9a2e7b3d58e6a0c1f4d92b7e3a5c8d6f0b1e2a4c7d9f3b5e8a1c6d2f4b7e";
    const PROXY: &str = "b8e2d6f0a4c9137e5b2d8f6a0c3e9b1d7f4a2c8e6b0d3f9a1c5e7b2d4f8a6c0e";

    fn container(hex: &str) -> Option<CgroupOwner> {
        Some(CgroupOwner::Container(ContainerId::from_hex(hex).unwrap()))
    }

    fn pod(uid: &str) -> Option<CgroupOwner> {
        Some(CgroupOwner::Pod { uid: uid.into() })
    }

    #[test]
    fn container_ids_from_pod_status() {
        let ok = [
            (format!("containerd://{APP}"), APP),
            (format!("cri-o://{}", APP.to_uppercase()), APP),
            ("docker://4f1c9a2e7b3d".to_string(), "4f1c9a2e7b3d"),
        ];
        for (status, want) in ok {
            let id = ContainerId::from_status(&status).unwrap();
            assert_eq!(id.as_str(), want, "{status}");
            assert_eq!(id.is_full(), want.len() == 64);
        }
        let bad = [
            (APP.to_string(), "is not RUNTIME://ID"),
            (
                format!("rkt://{APP}"),
                "runtime \"rkt\" is not one of containerd, cri-o, docker",
            ),
            ("containerd://".into(), "is not a container id"),
            ("containerd://4f1c9a2e7b3".into(), "is not a container id"),
            (format!("containerd://{APP}0"), "is not a container id"),
            ("containerd://4f1c9a2e7b3g".into(), "is not a container id"),
            ("containerd://é4f1c9a2e7b3d".into(), "is not a container id"),
        ];
        for (status, want) in bad {
            let e = ContainerId::from_status(&status).unwrap_err();
            assert!(
                e.contains(want) && e.contains("containerID"),
                "{status}: {e}"
            );
        }
    }

    #[test]
    fn cgroup_names_real_nodes_have() {
        let cases = [
            // systemd driver (kubeadm, OpenShift)
            (format!("kubepods-pod{UID_}.slice"), pod(UID)),
            (format!("kubepods-burstable-pod{UID_}.slice"), pod(UID)),
            (format!("kubepods-besteffort-pod{UID_}.slice"), pod(UID)),
            (
                format!("kubelet-kubepods-besteffort-pod{UID_}.slice"),
                pod(UID),
            ),
            (
                "kubepods-burstable-pod6d1a3c2f9e8b7a4d5c6b7a8f9e0d1c2b.slice".into(),
                pod("6d1a3c2f9e8b7a4d5c6b7a8f9e0d1c2b"),
            ),
            (format!("cri-containerd-{APP}.scope"), container(APP)),
            (format!("crio-{APP}.scope"), container(APP)),
            (format!("docker-{APP}.scope"), container(APP)),
            (format!("crio-conmon-{APP}.scope"), None),
            ("kubepods.slice".into(), None),
            ("kubepods-burstable.slice".into(), None),
            ("kubelet-kubepods-besteffort.slice".into(), None),
            (format!("user-pod{UID_}.slice"), None),
            (format!("kubepods-burstable-pod{UID}.slice"), None),
            (format!("cri-containerd-{}.scope", &APP[..12]), None),
            ("containerd.service".into(), None),
            ("session-3.scope".into(), None),
            ("init.scope".into(), None),
            // cgroupfs driver
            (format!("pod{UID}"), pod(UID)),
            (APP.into(), container(APP)),
            (format!("crio-{APP}"), container(APP)),
            (format!("crio-conmon-{APP}"), None),
            ("kubepods".into(), None),
            ("burstable".into(), None),
            (format!("pod{UID_}"), None),
            ("pod".into(), None),
            (APP[..63].into(), None),
            (String::new(), None),
            ("kubepods-pod\u{e9}.slice".into(), None),
        ];
        for (name, want) in cases {
            assert_eq!(parse_cgroup_name(&name), want, "{name}");
        }
    }

    fn entry(owner: Option<CgroupOwner>, pod_uid: Option<&str>) -> Option<CgroupEntry> {
        Some(CgroupEntry {
            owner: owner.unwrap(),
            pod_uid: pod_uid.map(Into::into),
        })
    }

    #[test]
    fn ancestry_gives_each_cgroup_its_pod() {
        let systemd =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        let kind = format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice");
        let cgroupfs = format!("kubepods/burstable/pod{UID}");
        let paths = [
            (systemd.clone(), 10, entry(pod(UID), Some(UID))),
            (
                format!("{systemd}/cri-containerd-{APP}.scope"),
                11,
                entry(container(APP), Some(UID)),
            ),
            (
                format!("{systemd}/crio-conmon-{APP}.scope"),
                12,
                entry(pod(UID), Some(UID)),
            ),
            // crun's child of the scope, where the processes are.
            (
                format!("{systemd}/crio-{PROXY}.scope/container"),
                13,
                entry(container(PROXY), Some(UID)),
            ),
            // A container that names a child after the proxy's id is still itself.
            (
                format!("{systemd}/cri-containerd-{APP}.scope/cri-containerd-{PROXY}.scope"),
                14,
                entry(container(APP), Some(UID)),
            ),
            (
                format!("{kind}/cri-containerd-{PROXY}.scope"),
                20,
                entry(container(PROXY), Some(UID)),
            ),
            (
                format!("{cgroupfs}/{APP}"),
                30,
                entry(container(APP), Some(UID)),
            ),
            (
                format!("/{cgroupfs}/crio-{PROXY}/"),
                31,
                entry(container(PROXY), Some(UID)),
            ),
            // Docker outside Kubernetes: a container, of no pod.
            (
                format!("system.slice/docker-{APP}.scope"),
                40,
                entry(container(APP), None),
            ),
            ("kubepods.slice".into(), 1, None),
            ("kubepods.slice/kubepods-burstable.slice".into(), 2, None),
            ("system.slice/containerd.service".into(), 3, None),
            (String::new(), 4, None),
        ];
        let index = CgroupIndex::from_entries(paths.iter().map(|(p, id, _)| (p.as_str(), *id)));
        for (path, id, want) in &paths {
            assert_eq!(index.get(*id), want.as_ref(), "{path}");
        }
        assert_eq!(index.len(), 9);
        assert_eq!(index.containers(), 2, "the app and the proxy");
        assert!(index.skipped().is_empty());
    }

    /// A node's tree laid out in plain directories: the walk, not the filesystem, is tested.
    #[test]
    fn scans_a_tree_like_a_node() {
        let root = std::env::temp_dir().join(format!("meshguard-cgroups-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let pod_dir = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        ));
        let app = pod_dir.join(format!("cri-containerd-{APP}.scope"));
        let proxy = pod_dir.join(format!("cri-containerd-{PROXY}.scope/container"));
        let deep = root.join("system.slice/a/b/c/d");
        for dir in [&app, &proxy, &deep] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(app.join("cgroup.procs"), "").unwrap();
        // A link back up would loop if followed.
        std::os::unix::fs::symlink(&root, pod_dir.join("loop")).unwrap();

        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let index = CgroupIndex::scan(&root).unwrap();
        assert_eq!(
            index.get(ino(&app)),
            entry(container(APP), Some(UID)).as_ref()
        );
        assert_eq!(
            index.get(ino(&proxy)),
            entry(container(PROXY), Some(UID)).as_ref()
        );
        assert_eq!(
            index.get(ino(&pod_dir)),
            entry(pod(UID), Some(UID)).as_ref()
        );
        assert_eq!(index.get(ino(&root.join("kubepods.slice"))), None);
        assert_eq!((index.len(), index.containers()), (4, 2));
        assert!(index.skipped().is_empty(), "{}", index.skipped());

        // Depth 1: kubepods.slice, system.slice; 2: kubepods-burstable.slice, a; 3: the pod,
        // b. Deeper: the pod's two containers, and c.
        let limits = |max_depth, max_dirs| ScanLimits {
            max_depth,
            max_dirs,
        };
        let limited = CgroupIndex::scan_with(&root, limits(3, 100)).unwrap();
        assert_eq!(
            limited.skipped(),
            &Skipped {
                too_deep: 3,
                ..Skipped::default()
            }
        );
        assert_eq!(limited.len(), 1, "the pod alone");
        let limited = CgroupIndex::scan_with(&root, limits(12, 6)).unwrap();
        assert_eq!(
            limited.skipped(),
            &Skipped {
                over_limit: 3,
                ..Skipped::default()
            }
        );
        assert_eq!(limited.len(), 1, "the pod alone");

        let e = CgroupIndex::scan(&root.join("nowhere")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("cgroup v2 tree"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }
}
