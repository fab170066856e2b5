//! Loads the embedded kernel programs and attaches them at the cgroup v2 root. Dropping
//! [`Kernel`] detaches everything.

use std::fs::File;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError,
        SockOps, TracePoint,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use meshguard_ebpf::{names, Stat};
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
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Kernel {
    ebpf: Ebpf,
    /// Programs attached, by name.
    pub attached: Vec<&'static str>,
    /// What could not be attached and what it costs, in words for a person on call.
    pub degraded: Vec<String>,
}

impl Kernel {
    pub fn attach(
        node: &Node,
        sizes: Sizes,
        attribution: ProcessAttribution,
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
        let ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .override_global(names::SK_COOKIE_OFFSET, &u64::from(cookie_offset), true)
            .map_max_entries(names::FLOWS, sizes.flow_map_entries)
            .map_max_entries(names::EVENTS, sizes.ringbuf_bytes)
            .load(OBJECT)?;
        let cgroup = File::open(&node.cgroup_root).map_err(|source| KernelError::Cgroup {
            path: node.cgroup_root.display().to_string(),
            source,
        })?;
        let mut kernel = Self {
            ebpf,
            attached: Vec::new(),
            degraded: Vec::new(),
        };

        // Single: aya turns AllowMultiple into link flags that some kernels reject; links to a
        // cgroup are always multi-attach anyway, so other tools' programs are unaffected.
        let mode = CgroupAttachMode::Single;
        let name = names::SOCK_OPS;
        let prog: &mut SockOps = kernel.program(name)?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.attach(&cgroup, mode)
            .map_err(|source| KernelError::Program { name, source })?;
        kernel.attached.push(name);

        for (name, direction) in [
            (names::SKB_EGRESS, CgroupSkbAttachType::Egress),
            (names::SKB_INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let prog: &mut CgroupSkb = kernel.program(name)?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            prog.attach(&cgroup, direction, mode)
                .map_err(|source| KernelError::Program { name, source })?;
            kernel.attached.push(name);
        }

        let name = names::SOCK_RELEASE;
        let prog: &mut CgroupSock = kernel.program(name)?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.attach(&cgroup, mode)
            .map_err(|source| KernelError::Program { name, source })?;
        kernel.attached.push(name);

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
                            .and_then(|()| prog.attach().map(drop))
                            .map_err(|source| KernelError::Program { name, source })
                    }) {
                        Ok(()) => {
                            self.attached.push(name);
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
                match self.program::<TracePoint>(name).and_then(|prog| {
                    prog.load()
                        .and_then(|()| {
                            prog.attach(names::SEND_TRACEPOINT_CATEGORY, names::SEND_TRACEPOINT)
                                .map(drop)
                        })
                        .map_err(|source| KernelError::Program { name, source })
                }) {
                    Ok(()) => {
                        self.attached.push(name);
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
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?;
        prog.try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let name = names::EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(KernelError::MissingMap(name))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map { name, source })
    }

    /// Entries in the kernel's flow map (a walk of its keys: call it now and then, not often).
    pub fn flow_map_entries(&self) -> Result<usize, KernelError> {
        let name = names::FLOWS;
        let map = self.ebpf.map(name).ok_or(KernelError::MissingMap(name))?;
        let flows: aya::maps::HashMap<_, u64, meshguard_ebpf::FlowState> =
            aya::maps::HashMap::try_from(map)
                .map_err(|source| KernelError::Map { name, source })?;
        Ok(flows.keys().count())
    }

    /// The loss and health counters, summed over CPUs, in `Stat` order.
    pub fn stats(&self) -> Result<[u64; Stat::COUNT as usize], KernelError> {
        let name = names::STATS;
        let map = self.ebpf.map(name).ok_or(KernelError::MissingMap(name))?;
        let array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| KernelError::Map { name, source })?;
        let mut out = [0u64; Stat::COUNT as usize];
        for stat in Stat::ALL {
            let values = array
                .get(&(stat as u32), 0)
                .map_err(|source| KernelError::Map { name, source })?;
            out[stat as usize] = values.iter().sum();
        }
        Ok(out)
    }
}
