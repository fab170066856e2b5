//! Loads the embedded kernel programs and attaches them at the cgroup v2 root, pinned under
//! bpffs so that they outlive the agent (or, without pinning, detached when [`Kernel`] drops).

use std::{
    fs::File,
    os::fd::AsFd,
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
use meshguard_ebpf::{names, FlowState, Reported, Stat, LAYOUT_VERSION};
use tracing::{info, warn};

pub mod btf;
mod enforce;
pub mod prereq;
pub mod reset;
pub mod sys;

use prereq::Node;

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

/// The kernel side as the agent holds it: maps it reads, and every link it attached or adopted
/// (held open, so that removing the pins cannot detach the programs while the agent runs).
pub struct Kernel {
    /// The loaded object, holding the links that are not fd links.
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
    /// Every fd link of this generation, held for the agent's lifetime.
    links: Vec<HeldLink>,
    /// Ids of the pinned maps, to pin them again if their pins are removed.
    map_ids: Vec<(&'static str, u32)>,
    /// The cgroup the programs are attached to, to check that they still are.
    cgroup: Option<File>,
    events: Option<RingBuf<MapData>>,
    flows: aya::maps::HashMap<MapData, u64, FlowState>,
    stats: PerCpuArray<MapData, u64>,
    /// The agent's record of what it reported (absent from generations older than the map).
    reported: Option<aya::maps::HashMap<MapData, u64, Reported>>,
    /// Generations this one replaced: detached, their maps still to be drained by the agent.
    retiring: Vec<OldGeneration>,
    /// The enforcement maps (absent from generations older than them).
    enforcement: Option<enforce::EnforceMaps>,
}

/// A link the agent holds: while its fd is open the program stays attached, pinned or not.
struct HeldLink {
    name: &'static str,
    program_id: u32,
    handle: Handle,
}

/// A second fd of our own (by link id), or, where that needs CAP_SYS_ADMIN the agent lacks,
/// aya's link itself.
enum Handle {
    Fd(std::os::fd::OwnedFd),
    Aya(Option<FdLink>),
}

impl HeldLink {
    fn pin(&mut self, path: &Path) -> Result<(), String> {
        match &mut self.handle {
            Handle::Fd(fd) => sys::pin(fd.as_fd(), path).map_err(|e| e.to_string()),
            Handle::Aya(link) => {
                let Some(taken) = link.take() else {
                    return Err("the link was lost to an earlier pinning error".into());
                };
                let pinned = taken.pin(path).map_err(|e| e.to_string())?;
                *link = Some(FdLink::from(pinned));
                Ok(())
            }
        }
    }
}

/// A replaced generation, already detached (unpinned): what its ring buffer still queues and
/// what its flow map still holds are the agent's to report before they are dropped.
pub struct OldGeneration {
    pub dir: PathBuf,
    /// Its event layout is this agent's: its events can be decoded.
    pub same_layout: bool,
    pub events: Option<RingBuf<MapData>>,
    pub flows: Option<aya::maps::HashMap<MapData, u64, FlowState>>,
    pub reported: Option<aya::maps::HashMap<MapData, u64, Reported>>,
}

/// What a health check of the kernel side found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Pins that were gone and are pinned again.
    pub repinned: Vec<&'static str>,
    /// Programs no longer attached to the cgroup.
    pub detached: Vec<&'static str>,
    /// Checks that could not be made, in words.
    pub errors: Vec<String>,
}

/// One walk of a flow map: each entry once, however the walk went.
#[derive(Debug, Default)]
pub struct Walk {
    pub entries: Vec<(u64, FlowState)>,
    /// Keys the walk returned again (it restarts when a key it stands on is deleted).
    pub repeats: u64,
    /// Entries deleted between the walk of keys and their lookup.
    pub vanished: u64,
    /// Errors from the kernel, counted (the walk goes on without them).
    pub errors: u64,
    /// The walk stopped at its bound before the map's end.
    pub cut: bool,
}

/// How a flow program hooks into the cgroup.
#[derive(Clone, Copy)]
enum Hook {
    SockOps,
    Skb(CgroupSkbAttachType),
    SockRelease,
}

/// The flow programs, attached at the cgroup root in this order: each with its hook and the
/// attach type `BPF_PROG_QUERY` lists it under. An adoptable generation has pinned them all
/// (process attribution, attached apart, is optional).
const CGROUP_PROGRAMS: [(&str, Hook, u32); 4] = [
    (names::SOCK_OPS, Hook::SockOps, sys::ATTACH_CGROUP_SOCK_OPS),
    (
        names::SKB_EGRESS,
        Hook::Skb(CgroupSkbAttachType::Egress),
        sys::ATTACH_CGROUP_INET_EGRESS,
    ),
    (
        names::SKB_INGRESS,
        Hook::Skb(CgroupSkbAttachType::Ingress),
        sys::ATTACH_CGROUP_INET_INGRESS,
    ),
    (
        names::SOCK_RELEASE,
        Hook::SockRelease,
        sys::ATTACH_CGROUP_INET_SOCK_RELEASE,
    ),
];

/// The attach type a cgroup program was attached with, by its name.
fn cgroup_attach_type(name: &str) -> Option<u32> {
    CGROUP_PROGRAMS
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|&(.., attach_type)| attach_type)
}

/// A second fd for an fd link, the agent's own: the link lives while either is open.
fn held(name: &'static str, link: FdLink) -> Result<HeldLink, String> {
    let Ok(info) = link.info() else {
        // Held all the same; its attachment cannot be checked (program id 0 is skipped).
        return Ok(HeldLink {
            name,
            program_id: 0,
            handle: Handle::Aya(Some(link)),
        });
    };
    let handle = match sys::link_fd_by_id(info.id()) {
        Ok(fd) => Handle::Fd(fd),
        Err(_) => Handle::Aya(Some(link)),
    };
    Ok(HeldLink {
        name,
        program_id: info.program_id(),
        handle,
    })
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::LruHashMap(m)
        | Map::RingBuf(m)
        | Map::PerCpuArray(m)
        | Map::HashMap(m)
        | Map::LpmTrie(m)
        | Map::Array(m) => Some(m),
        _ => None,
    }
}

/// Walks a flow map's keys, then looks each up: every entry once.
pub fn walk(map: &aya::maps::HashMap<MapData, u64, FlowState>, bound: usize) -> Walk {
    let (keys, repeats, errors, cut) = distinct_keys(map.keys(), bound);
    let mut out = Walk {
        repeats,
        errors,
        cut,
        ..Walk::default()
    };
    for key in keys {
        match map.get(&key, 0) {
            Ok(state) => out.entries.push((key, state)),
            Err(aya::maps::MapError::KeyNotFound) => out.vanished += 1,
            Err(_) => out.errors += 1,
        }
    }
    out
}

/// The distinct keys of a walk, in walk order, at most `bound` of them visited: a map's key
/// walk starts over when the key it stands on is deleted (entries then repeat), and ends at the
/// first error. Returns the keys, repeats, errors, and whether the bound cut the walk.
pub fn distinct_keys<E>(
    keys: impl Iterator<Item = Result<u64, E>>,
    bound: usize,
) -> (Vec<u64>, u64, u64, bool) {
    let mut seen = std::collections::HashSet::new();
    let (mut out, mut repeats, mut errors) = (Vec::new(), 0, 0);
    for (visited, key) in keys.enumerate() {
        if visited >= bound {
            return (out, repeats, errors, true);
        }
        match key {
            Ok(key) if seen.insert(key) => out.push(key),
            Ok(_) => repeats += 1,
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (out, repeats, errors, false)
}

fn read_reported(map: Option<&aya::maps::HashMap<MapData, u64, Reported>>) -> Vec<(u64, Reported)> {
    let Some(map) = map else {
        return Vec::new();
    };
    let (keys, ..) = distinct_keys(map.keys(), 1 << 22);
    keys.into_iter()
        .filter_map(|key| Some((key, map.get(&key, 0).ok()?)))
        .collect()
}

impl OldGeneration {
    /// Opens what a replaced generation's pins hold, then removes the pins: its programs
    /// detach (nothing else holds their links) while its maps stay open here.
    fn open(dir: &Path) -> Self {
        let open = |name: &str| MapData::from_pin(dir.join(name)).ok();
        let same_layout = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("v{LAYOUT_VERSION}-")));
        let old = Self {
            dir: dir.to_path_buf(),
            same_layout,
            events: open(names::EVENTS).and_then(|m| RingBuf::try_from(Map::RingBuf(m)).ok()),
            flows: open(names::FLOWS)
                .filter(|_| same_layout)
                .and_then(|m| aya::maps::HashMap::try_from(Map::LruHashMap(m)).ok()),
            reported: open(names::REPORTED)
                .filter(|_| same_layout)
                .and_then(|m| aya::maps::HashMap::try_from(Map::LruHashMap(m)).ok()),
        };
        remove_pins(dir);
        old
    }

    /// Its flow map, each entry once.
    pub fn flow_map(&self) -> Walk {
        self.flows
            .as_ref()
            .map(|m| walk(m, 1 << 22))
            .unwrap_or_default()
    }

    pub fn reported(&self) -> Vec<(u64, Reported)> {
        read_reported(self.reported.as_ref())
    }
}

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
            match Self::adopt(&dir, node) {
                Ok(mut kernel) => {
                    info!(pins = %dir.display(), programs = ?kernel.attached, "adopted the pinned kernel side");
                    kernel.retiring = retire(root, &generation);
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
        match result {
            // Only now: until the new generation runs, the old one keeps counting.
            Ok(mut kernel) => {
                kernel.retiring = retire(root, &generation);
                Ok(kernel)
            }
            Err(e) => {
                remove_pins(&scratch);
                Err(e)
            }
        }
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
            .then(|| std::fs::read(btf::VMLINUX).ok())
            .flatten()
            .and_then(|raw| btf::socket_cookie_offset(&raw).ok().flatten())
            .unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .override_global(names::SK_COOKIE_OFFSET, &u64::from(cookie_offset), true)
            .map_max_entries(names::FLOWS, sizes.flow_map_entries)
            .map_max_entries(names::EVENTS, sizes.ringbuf_bytes)
            .map_max_entries(names::REPORTED, sizes.flow_map_entries)
            .load(OBJECT)?;
        let cgroup = File::open(&node.cgroup_root).map_err(|source| KernelError::Cgroup {
            path: node.cgroup_root.display().to_string(),
            source,
        })?;
        let (flows, events, stats, reported) = (
            take_map(&mut ebpf, names::FLOWS)?,
            take_map(&mut ebpf, names::EVENTS)?,
            take_map(&mut ebpf, names::STATS)?,
            take_map(&mut ebpf, names::REPORTED)?,
        );
        let (enforce, allowed, until) = (
            take_map(&mut ebpf, names::ENFORCE)?,
            take_map(&mut ebpf, names::ALLOWED)?,
            take_map(&mut ebpf, names::ENFORCE_UNTIL)?,
        );
        let mut map_ids = Vec::new();
        for (name, map) in [
            (names::FLOWS, &flows),
            (names::EVENTS, &events),
            (names::STATS, &stats),
            (names::REPORTED, &reported),
            (names::ENFORCE, &enforce),
            (names::ALLOWED, &allowed),
            (names::ENFORCE_UNTIL, &until),
        ] {
            let data = map_data(map);
            if let Some(id) = data.and_then(|d| d.info().ok()).map(|i| i.id()) {
                map_ids.push((name, id));
            }
            if let (Some(dir), Some(data)) = (pins, data) {
                let path = dir.join(name);
                data.pin(&path).map_err(|e| pin_error(&path, &e))?;
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
            map_ids,
            cgroup: cgroup.try_clone().ok(),
            flows: typed(names::FLOWS, flows)?,
            events: Some(typed(names::EVENTS, events)?),
            stats: typed(names::STATS, stats)?,
            reported: Some(typed(names::REPORTED, reported)?),
            retiring: Vec::new(),
            enforcement: Some(enforce::EnforceMaps::new(enforce, allowed, until, true)?),
        };

        for &(name, hook, _) in &CGROUP_PROGRAMS {
            let link = kernel.attach_cgroup(name, hook, &cgroup)?;
            kernel.hold(name, link);
        }

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

    /// Pins the links this agent holds into `dir`: they stay attached when it exits.
    fn pin_links(&mut self, dir: &Path) -> Result<(), KernelError> {
        for link in &mut self.links {
            let path = dir.join(link.name);
            link.pin(&path).map_err(|e| pin_error(&path, &e))?;
        }
        Ok(())
    }

    /// Takes over a pinned generation: its maps, and the links it lists.
    fn adopt(dir: &Path, node: &Node) -> Result<Self, KernelError> {
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
        let reported = open(names::REPORTED).ok();
        let enforcement = match (
            open(names::ENFORCE),
            open(names::ALLOWED),
            open(names::ENFORCE_UNTIL),
        ) {
            (Ok(enforce), Ok(allowed), Ok(until)) => Some((enforce, allowed, until)),
            _ => None,
        };
        let map_ids = [
            (names::FLOWS, Some(&flows)),
            (names::EVENTS, Some(&events)),
            (names::STATS, Some(&stats)),
            (names::REPORTED, reported.as_ref()),
            (names::ENFORCE, enforcement.as_ref().map(|m| &m.0)),
            (names::ALLOWED, enforcement.as_ref().map(|m| &m.1)),
            (names::ENFORCE_UNTIL, enforcement.as_ref().map(|m| &m.2)),
        ]
        .into_iter()
        .filter_map(|(name, map)| Some((name, map?.info().ok()?.id())))
        .collect();
        let mut attached = Vec::new();
        let mut links = Vec::new();
        let mut degraded = Vec::new();
        let required = CGROUP_PROGRAMS.map(|(name, ..)| name);
        for name in required.into_iter().chain(SENDER_LINKS) {
            match PinnedLink::from_pin(dir.join(name)) {
                Ok(pinned) => {
                    attached.push(name);
                    match held(name, FdLink::from(pinned)) {
                        Ok(link) => links.push(link),
                        Err(why) => degraded.push(why),
                    }
                }
                Err(e) if required.contains(&name) => {
                    return Err(KernelError::Pin {
                        path: dir.join(name).display().to_string(),
                        why: e.to_string(),
                    })
                }
                Err(_) => {}
            }
        }
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
            links,
            map_ids,
            cgroup: File::open(&node.cgroup_root).ok(),
            flows: typed(names::FLOWS, Map::LruHashMap(flows))?,
            events: Some(typed(names::EVENTS, Map::RingBuf(events))?),
            stats: typed(names::STATS, Map::PerCpuArray(stats))?,
            reported: reported
                .map(|m| typed(names::REPORTED, Map::LruHashMap(m)))
                .transpose()?,
            retiring: Vec::new(),
            enforcement: enforcement
                .map(|(enforce, allowed, until)| {
                    enforce::EnforceMaps::new(
                        Map::HashMap(enforce),
                        Map::LpmTrie(allowed),
                        Map::Array(until),
                        false,
                    )
                })
                .transpose()?,
        })
    }

    /// Records an attached program. A link that is not an fd link cannot be pinned: it stays in
    /// the object, and is detached when the agent exits.
    /// Loads one flow program and attaches it at `cgroup`; its link as an fd link, or the
    /// program's name where the kernel's link cannot be one (it cannot be pinned then).
    fn attach_cgroup(
        &mut self,
        name: &'static str,
        hook: Hook,
        cgroup: &File,
    ) -> Result<Result<FdLink, &'static str>, KernelError> {
        let fail = |source| KernelError::Program { name, source };
        // Single: aya turns AllowMultiple into link flags that some kernels reject; links to a
        // cgroup are always multi-attach anyway, so other tools' programs are unaffected.
        let mode = CgroupAttachMode::Single;
        // Each program type has its own link type; the steps are the same.
        macro_rules! attach {
            ($program:ty $(, $arg:expr)*) => {{
                let prog: &mut $program = self.program(name)?;
                prog.load().map_err(fail)?;
                let id = prog.attach(cgroup, $($arg,)* mode).map_err(fail)?;
                FdLink::try_from(prog.take_link(id).map_err(fail)?).map_err(|_| name)
            }};
        }
        Ok(match hook {
            Hook::SockOps => attach!(SockOps),
            Hook::Skb(direction) => attach!(CgroupSkb, direction),
            Hook::SockRelease => attach!(CgroupSock),
        })
    }

    fn hold(&mut self, name: &'static str, link: Result<FdLink, &'static str>) {
        self.attached.push(name);
        match link.map(|link| held(name, link)) {
            Ok(Ok(link)) => self.links.push(link),
            Ok(Err(why)) => self.degraded.push(why),
            Err(name) => self.degraded.push(format!(
                "{name} cannot be pinned on this kernel: it detaches when the agent exits"
            )),
        }
    }

    /// Checks that the pins and the attachments are still there: pins removed behind the
    /// agent's back are pinned again (the agent holds every link and map, so nothing detached
    /// meanwhile), and programs no longer attached to the cgroup are named.
    pub fn check(&mut self) -> Health {
        let mut health = Health::default();
        if let Some(dir) = &self.pins {
            if let Err(e) = std::fs::create_dir_all(dir) {
                health
                    .errors
                    .push(format!("recreating {}: {e}", dir.display()));
            }
            for (name, id) in &self.map_ids {
                let path = dir.join(name);
                if path.exists() {
                    continue;
                }
                match MapData::from_id(*id)
                    .map_err(|e| e.to_string())
                    .and_then(|map| map.pin(&path).map_err(|e| e.to_string()))
                {
                    Ok(()) => health.repinned.push(*name),
                    Err(e) => health
                        .errors
                        .push(format!("pinning {}: {e}", path.display())),
                }
            }
            for link in &mut self.links {
                let path = dir.join(link.name);
                if path.exists() {
                    continue;
                }
                match link.pin(&path) {
                    Ok(()) => health.repinned.push(link.name),
                    Err(e) => health
                        .errors
                        .push(format!("pinning {}: {e}", path.display())),
                }
            }
        }
        if let Some(cgroup) = &self.cgroup {
            for link in &self.links {
                let Some(attach_type) =
                    cgroup_attach_type(link.name).filter(|_| link.program_id != 0)
                else {
                    continue;
                };
                match sys::cgroup_programs(cgroup.as_fd(), attach_type) {
                    Ok(ids) if !ids.contains(&link.program_id) => health.detached.push(link.name),
                    Ok(_) => {}
                    Err(e) => health.errors.push(format!("querying {}: {e}", link.name)),
                }
            }
        }
        health
    }

    /// Generations this one replaced, detached and waiting to be drained (once).
    pub fn take_retiring(&mut self) -> Vec<OldGeneration> {
        std::mem::take(&mut self.retiring)
    }

    /// Gives this generation up to be drained like a replaced one: unpinned now, detached once
    /// the returned value (the last holder of its links) is dropped. `events`: its ring buffer,
    /// taken earlier.
    pub fn into_old(self, events: Option<RingBuf<MapData>>) -> OldGeneration {
        if let Some(dir) = &self.pins {
            remove_pins(dir);
        }
        OldGeneration {
            dir: self.pins.clone().unwrap_or_default(),
            same_layout: true,
            events: events.or(self.events),
            flows: Some(self.flows),
            reported: self.reported,
        }
    }

    /// Notes that the agent published a verdict for this open flow.
    pub fn remember(&mut self, key: u64, entry: Reported) {
        if let Some(map) = &mut self.reported {
            // Full (an LRU never is) or gone: a later restart re-judges the flow, no worse.
            let _ = map.insert(key, entry, 0);
        }
    }

    /// Drops a closed flow from the agent's record.
    pub fn forget_reported(&mut self, key: u64) {
        if let Some(map) = &mut self.reported {
            let _ = map.remove(&key);
        }
    }

    /// What the agent (this one or the one before it) reported of open flows.
    pub fn reported(&self) -> Vec<(u64, Reported)> {
        read_reported(self.reported.as_ref())
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
        distinct_keys(self.flows.keys(), self.walk_bound()).0.len()
    }

    /// Every entry of the flow map, once (a walk: for reconciliation, not for every tick).
    pub fn flow_map(&self) -> Walk {
        walk(&self.flows, self.walk_bound())
    }

    /// A walk visits at most this many keys: the map's size, with room for its restarts.
    fn walk_bound(&self) -> usize {
        2 * self.flow_map_capacity as usize + 64
    }

    /// Removes entries of flows the agent has reported closed, from the flow map and from its
    /// own record.
    pub fn forget(&mut self, cookies: &[u64]) {
        for cookie in cookies {
            // Gone already (evicted) is fine.
            let _ = self.flows.remove(cookie);
            if let Some(map) = &mut self.reported {
                let _ = map.remove(cookie);
            }
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

/// Detaches every generation under `root` but `keep` (and scratch left by a crash), keeping
/// their maps open for the agent to drain: nothing they queued is lost to an upgrade.
fn retire(root: &Path, keep: &str) -> Vec<OldGeneration> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut old = Vec::new();
    for entry in entries.flatten() {
        if entry.file_name() != keep {
            info!(pins = %entry.path().display(), "detaching an older generation of programs");
            old.push(OldGeneration::open(&entry.path()));
        }
    }
    old
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_walk_yields_each_key_once_within_its_bound() {
        type Step = Result<u64, ()>;
        /// What the kernel's walk returned, the bound, then keys, repeats, errors, cut.
        type Case<'a> = (&'a [Step], usize, &'a [u64], u64, u64, bool);
        let cases: [Case; 5] = [
            (&[Ok(1), Ok(2), Ok(3)], 10, &[1, 2, 3], 0, 0, false),
            // A key deleted under the walk: it starts over from the first bucket.
            (
                &[Ok(1), Ok(2), Ok(1), Ok(2), Ok(3)],
                10,
                &[1, 2, 3],
                2,
                0,
                false,
            ),
            // An error ends the walk, counted.
            (&[Ok(1), Err(()), Ok(2)], 10, &[1], 0, 1, false),
            // A walk that keeps starting over stops at its bound.
            (&[Ok(1), Ok(1), Ok(1), Ok(1), Ok(2)], 3, &[1], 2, 0, true),
            (&[], 10, &[], 0, 0, false),
        ];
        for (walk, bound, keys, repeats, errors, cut) in cases {
            let got = distinct_keys(walk.iter().cloned(), bound);
            assert_eq!(got, (keys.to_vec(), repeats, errors, cut), "{walk:?}");
        }
    }
}
