//! Loads the embedded kernel programs and attaches them at the cgroup v2 root, pinned under
//! bpffs so that they outlive the agent (or, without pinning, detached when [`Kernel`] drops).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError,
        SockOps, TracePoint,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use meshguard_ebpf::{names, FlowState, Stat, LAYOUT_VERSION};
use tracing::{info, warn};

use crate::prereq::Node;

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshguard"));

/// Which program names the process behind each flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProcessAttribution {
    /// The BTF tracepoint, else the classic one.
    Auto,
    Btf,
    /// The classic tracepoint only (needs tracefs and kernel BTF for one offset).
    Tracepoint,
    Off,
}

#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Flows the kernel tracks at once (LRU beyond that).
    pub flow_map_entries: u32,
    /// Ring buffer size: a power of two, at least a page.
    pub ringbuf_bytes: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {why}")]
    Pin { path: String, why: String },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The kernel side as the agent holds it: maps it reads, and, unless pinned, the programs
/// (dropping it then detaches them).
pub struct Kernel {
    /// The loaded object, holding the links that are not pinned.
    ebpf: Option<Ebpf>,
    /// This generation's pins; `None`: the kernel side lives only as long as the agent.
    pins: Option<PathBuf>,
    /// Programs attached, by name.
    pub attached: Vec<&'static str>,
    /// What could not be attached and what it costs, in words for a person on call.
    pub degraded: Vec<String>,
    /// Taken over from pins an earlier agent left, not attached anew.
    pub adopted: bool,
    /// Entries the flow map holds at most (the pinned map's, when adopted).
    pub flow_map_capacity: u32,
    /// Links attached by this agent and not pinned yet; dropping one detaches it.
    links: Vec<(&'static str, FdLink)>,
    events: Option<RingBuf<MapData>>,
    flows: aya::maps::HashMap<MapData, u64, FlowState>,
    stats: PerCpuArray<MapData, u64>,
}

/// Links an adoptable generation must have pinned: the flow programs (process attribution is
/// optional).
const REQUIRED_LINKS: [&str; 4] = [
    names::SOCK_OPS,
    names::SKB_EGRESS,
    names::SKB_INGRESS,
    names::SOCK_RELEASE,
];
const SENDER_LINKS: [&str; 2] = [names::SEND_BTF, names::SEND_CLASSIC];

impl Kernel {
    /// Brings the kernel side up. With `pin_root`, it is kept under a generation directory there
    /// (named by layout version and a hash of the object and its settings): a generation already
    /// pinned by an earlier agent is adopted as it is, with no second attachment; any other
    /// generation is replaced, the new one attached before the old one is detached.
    pub fn start(
        node: &Node,
        sizes: Sizes,
        attribution: ProcessAttribution,
        pin_root: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let Some(root) = pin_root else {
            return Self::attach(node, sizes, attribution, None);
        };
        let generation = generation(sizes, attribution, &node.cgroup_root);
        let dir = root.join(&generation);
        if dir.is_dir() {
            match Self::adopt(&dir) {
                Ok(kernel) => {
                    info!(pins = %dir.display(), programs = ?kernel.attached, "adopted the pinned kernel side");
                    retire(root, &generation);
                    return Ok(kernel);
                }
                Err(e) => {
                    warn!(pins = %dir.display(), %e, "cannot adopt the pinned kernel side; attaching anew");
                    remove_pins(&dir);
                }
            }
        }
        // Built in a scratch directory and renamed into place, so that a crash midway leaves no
        // half generation to adopt. (bpffs refuses names with dots.)
        let scratch = root.join(format!("new-{generation}-{}", std::process::id()));
        remove_pins(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| pin_error(&scratch, &e))?;
        let result =
            Self::attach(node, sizes, attribution, Some(&scratch)).and_then(|mut kernel| {
                kernel.pin_links(&scratch)?;
                let dir = root.join(&generation);
                std::fs::rename(&scratch, &dir).map_err(|e| pin_error(&dir, &e))?;
                info!(pins = %dir.display(), "kernel side pinned: it outlives this agent");
                kernel.pins = Some(dir);
                Ok(kernel)
            });
        match &result {
            // Only now: until the new generation runs, the old one keeps counting.
            Ok(_) => retire(root, &generation),
            Err(_) => remove_pins(&scratch),
        }
        result
    }

    /// Loads and attaches; with `pins`, pins the maps there.
    fn attach(
        node: &Node,
        sizes: Sizes,
        attribution: ProcessAttribution,
        pins: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let btf = if node.btf {
            Btf::from_sys_fs()
                .map_err(|e| warn!(%e, "cannot read kernel BTF"))
                .ok()
        } else {
            None
        };
        // For the classic tracepoint fallback: where the cookie is in `struct sock`.
        let cookie_offset = node
            .btf
            .then(|| std::fs::read(BTF_PATH).ok())
            .flatten()
            .and_then(|raw| crate::btf::socket_cookie_offset(&raw).ok().flatten())
            .unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .override_global(names::SK_COOKIE_OFFSET, &u64::from(cookie_offset), true)
            .map_max_entries(names::FLOWS, sizes.flow_map_entries)
            .map_max_entries(names::EVENTS, sizes.ringbuf_bytes)
            .load(OBJECT)?;
        let cgroup = File::open(&node.cgroup_root).map_err(|source| KernelError::Cgroup {
            path: node.cgroup_root.display().to_string(),
            source,
        })?;
        let (flows, events, stats) = (
            take_map(&mut ebpf, names::FLOWS)?,
            take_map(&mut ebpf, names::EVENTS)?,
            take_map(&mut ebpf, names::STATS)?,
        );
        if let Some(dir) = pins {
            for (name, map) in [
                (names::FLOWS, &flows),
                (names::EVENTS, &events),
                (names::STATS, &stats),
            ] {
                let path = dir.join(name);
                map.pin(&path).map_err(|e| pin_error(&path, &e))?;
            }
        }
        let mut kernel = Self {
            ebpf: Some(ebpf),
            pins: None,
            attached: Vec::new(),
            degraded: Vec::new(),
            adopted: false,
            flow_map_capacity: sizes.flow_map_entries,
            links: Vec::new(),
            flows: typed(names::FLOWS, flows)?,
            events: Some(typed(names::EVENTS, events)?),
            stats: typed(names::STATS, stats)?,
        };

        // Single: aya turns AllowMultiple into link flags that some kernels reject; links to a
        // cgroup are always multi-attach anyway, so other tools' programs are unaffected.
        let mode = CgroupAttachMode::Single;
        let name = names::SOCK_OPS;
        let prog: &mut SockOps = kernel.program(name)?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        let id = prog
            .attach(&cgroup, mode)
            .map_err(|source| KernelError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| KernelError::Program { name, source })?;
        kernel.hold(name, FdLink::try_from(link).map_err(|_| name));

        for (name, direction) in [
            (names::SKB_EGRESS, CgroupSkbAttachType::Egress),
            (names::SKB_INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let prog: &mut CgroupSkb = kernel.program(name)?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            let id = prog
                .attach(&cgroup, direction, mode)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            kernel.hold(name, FdLink::try_from(link).map_err(|_| name));
        }

        let name = names::SOCK_RELEASE;
        let prog: &mut CgroupSock = kernel.program(name)?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        let id = prog
            .attach(&cgroup, mode)
            .map_err(|source| KernelError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| KernelError::Program { name, source })?;
        kernel.hold(name, FdLink::try_from(link).map_err(|_| name));

        // Process attribution is optional: without it flows still carry uid and verdict evidence.
        if let Err(why) = kernel.attach_sender(btf.as_ref(), node, attribution, cookie_offset) {
            kernel
                .degraded
                .push(format!("no process attribution: {why}"));
        }
        info!(programs = ?kernel.attached, cgroup = %node.cgroup_root.display(), "attached");
        for why in &kernel.degraded {
            warn!("degraded: {why}");
        }
        Ok(kernel)
    }

    /// Pins the links taken at attachment into `dir`.
    fn pin_links(&mut self, dir: &Path) -> Result<(), KernelError> {
        for (name, link) in std::mem::take(&mut self.links) {
            let path = dir.join(name);
            // Dropping the pinned link closes our fd; the pin keeps it attached.
            link.pin(&path).map_err(|e| pin_error(&path, &e))?;
        }
        Ok(())
    }

    /// Takes over a pinned generation: its maps, and the links it lists.
    fn adopt(dir: &Path) -> Result<Self, KernelError> {
        let open = |name: &'static str| {
            MapData::from_pin(dir.join(name)).map_err(|source| KernelError::Map { name, source })
        };
        let flows = open(names::FLOWS)?;
        let capacity = flows
            .info()
            .map_err(|source| KernelError::Map {
                name: names::FLOWS,
                source,
            })?
            .max_entries();
        let (events, stats) = (open(names::EVENTS)?, open(names::STATS)?);
        let mut attached = Vec::new();
        for name in REQUIRED_LINKS.into_iter().chain(SENDER_LINKS) {
            match PinnedLink::from_pin(dir.join(name)) {
                Ok(_) => attached.push(name),
                Err(e) if REQUIRED_LINKS.contains(&name) => {
                    return Err(KernelError::Pin {
                        path: dir.join(name).display().to_string(),
                        why: e.to_string(),
                    })
                }
                Err(_) => {}
            }
        }
        let mut degraded = Vec::new();
        if !attached.iter().any(|name| SENDER_LINKS.contains(name)) {
            degraded.push(
                "no process attribution: none could be attached when these programs were loaded"
                    .to_string(),
            );
        }
        Ok(Self {
            ebpf: None,
            pins: Some(dir.to_path_buf()),
            attached,
            degraded,
            adopted: true,
            flow_map_capacity: capacity,
            links: Vec::new(),
            flows: typed(names::FLOWS, Map::LruHashMap(flows))?,
            events: Some(typed(names::EVENTS, Map::RingBuf(events))?),
            stats: typed(names::STATS, Map::PerCpuArray(stats))?,
        })
    }

    /// Records an attached program. A link that is not an fd link cannot be pinned: it stays in
    /// the object, and is detached when the agent exits.
    fn hold(&mut self, name: &'static str, link: Result<FdLink, &'static str>) {
        self.attached.push(name);
        match link {
            Ok(link) => self.links.push((name, link)),
            Err(name) => self.degraded.push(format!(
                "{name} cannot be pinned on this kernel: it detaches when the agent exits"
            )),
        }
    }

    /// Detaches now: unpins this generation (the links go with the last reference to them).
    pub fn detach(self) {
        if let Some(dir) = &self.pins {
            remove_pins(dir);
        }
    }

    /// Attaches one of the sender programs, as `attribution` asks; says why when none could be.
    fn attach_sender(
        &mut self,
        btf: Option<&Btf>,
        node: &Node,
        attribution: ProcessAttribution,
        cookie_offset: u32,
    ) -> Result<(), String> {
        use ProcessAttribution::*;
        let mut why = Vec::new();
        if matches!(attribution, Auto | Btf) {
            match btf {
                None => why.push("the kernel has no BTF".to_string()),
                Some(btf) => {
                    let name = names::SEND_BTF;
                    match self.program::<BtfTracePoint>(name).and_then(|prog| {
                        prog.load(names::SEND_TRACEPOINT, btf)
                            .and_then(|()| prog.attach())
                            .and_then(|id| prog.take_link(id))
                            .map_err(|source| KernelError::Program { name, source })
                    }) {
                        Ok(link) => {
                            self.hold(name, Ok(FdLink::from(link)));
                            return Ok(());
                        }
                        Err(e) => why.push(format!("BTF tracepoint refused: {e}")),
                    }
                }
            }
        }
        if matches!(attribution, Auto | Tracepoint) {
            if node.tracefs.is_none() {
                why.push("tracefs is not mounted".to_string());
            } else if cookie_offset == 0 {
                why.push("the socket cookie's offset is unknown (no kernel BTF)".to_string());
            } else {
                let name = names::SEND_CLASSIC;
                // Perf-event links are fd links (pinnable) only on kernels with BPF perf links;
                // elsewhere the link stays with the object and detaches with the agent.
                let pinnable = aya::features().bpf_perf_link();
                match self.program::<TracePoint>(name).and_then(|prog| {
                    prog.load()
                        .and_then(|()| {
                            prog.attach(names::SEND_TRACEPOINT_CATEGORY, names::SEND_TRACEPOINT)
                        })
                        .and_then(|id| pinnable.then(|| prog.take_link(id)).transpose())
                        .map_err(|source| KernelError::Program { name, source })
                }) {
                    Ok(link) => {
                        let link = link.and_then(|link| FdLink::try_from(link).ok());
                        self.hold(name, link.ok_or(name));
                        return Ok(());
                    }
                    Err(e) => why.push(format!("classic tracepoint refused: {e}")),
                }
            }
        }
        if attribution == Off {
            why.push("turned off (--process-attribution off)".to_string());
        }
        Err(why.join("; "))
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, KernelError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let prog = self
            .ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.program_mut(name))
            .ok_or(KernelError::MissingProgram(name))?;
        prog.try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        self.events
            .take()
            .ok_or(KernelError::MissingMap(names::EVENTS))
    }

    /// Entries in the kernel's flow map (a walk of its keys: call it now and then, not often).
    pub fn flow_map_entries(&self) -> usize {
        self.flows.keys().count()
    }

    /// Every entry of the flow map (a walk: for reconciliation, not for every tick).
    pub fn flow_map(&self) -> Vec<(u64, FlowState)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// Removes entries the agent has reported (closed flows kept for reconciliation).
    pub fn forget(&mut self, cookies: &[u64]) {
        for cookie in cookies {
            // Gone already (evicted) is fine.
            let _ = self.flows.remove(cookie);
        }
    }

    /// The loss and health counters, summed over CPUs, in `Stat` order.
    pub fn stats(&self) -> Result<[u64; Stat::COUNT as usize], KernelError> {
        let name = names::STATS;
        let mut out = [0u64; Stat::COUNT as usize];
        for stat in Stat::ALL {
            let values = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(|source| KernelError::Map { name, source })?;
            out[stat as usize] = values.iter().sum();
        }
        Ok(out)
    }
}

/// Now, on the clock of kernel timestamps (`bpf_ktime_get_ns`: CLOCK_MONOTONIC).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The generation directory's name: what must match for an agent to adopt pinned programs as
/// they are. Another layout, object or setting means a replacement.
fn generation(sizes: Sizes, attribution: ProcessAttribution, cgroup_root: &Path) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(OBJECT);
    feed(&sizes.flow_map_entries.to_le_bytes());
    feed(&sizes.ringbuf_bytes.to_le_bytes());
    feed(&[attribution as u8]);
    feed(cgroup_root.as_os_str().as_encoded_bytes());
    format!("v{LAYOUT_VERSION}-{hash:016x}")
}

/// Detaches every generation under `root` but `keep` (and scratch left by a crash).
fn retire(root: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() != keep {
            info!(pins = %entry.path().display(), "detaching an older generation of programs");
            remove_pins(&entry.path());
        }
    }
}

/// Unpins a generation: its links detach and its maps go once nothing else holds them.
fn remove_pins(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(pins = %dir.display(), %e, "cannot remove pins");
        }
    }
}

/// `meshguard uninstall`: detaches and unpins every generation under `root`. Returns what was
/// removed. Programs an agent still runs with stay attached until it exits.
pub fn uninstall(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    match std::fs::read_dir(root) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                std::fs::remove_dir_all(&path)?;
                removed.push(path);
            }
            std::fs::remove_dir(root)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

fn pin_error(path: &Path, e: &dyn std::fmt::Display) -> KernelError {
    KernelError::Pin {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::MissingMap(name))
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    name: &'static str,
    map: Map,
) -> Result<T, KernelError> {
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}
