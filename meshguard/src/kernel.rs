//! Loads the embedded kernel programs and attaches them at the cgroup v2 root. Dropping
//! [`Kernel`] detaches everything.

use std::fs::File;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError,
        SockOps,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use meshguard_ebpf::{names, Stat};
use tracing::{info, warn};

use crate::prereq::Node;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshguard"));

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
    pub fn attach(node: &Node, sizes: Sizes) -> Result<Self, KernelError> {
        let btf = if node.btf {
            Btf::from_sys_fs()
                .map_err(|e| warn!(%e, "cannot read kernel BTF"))
                .ok()
        } else {
            None
        };
        let ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
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
        let name = names::SEND_BTF;
        match (&btf, kernel.program::<BtfTracePoint>(name)) {
            (Some(btf), Ok(prog)) => {
                match prog
                    .load(names::SEND_TRACEPOINT, btf)
                    .and_then(|()| prog.attach().map(drop))
                {
                    Ok(()) => kernel.attached.push(name),
                    Err(e) => kernel.degraded.push(format!(
                        "no process attribution: BTF tracepoint {} refused: {e}",
                        names::SEND_TRACEPOINT
                    )),
                }
            }
            (None, _) => kernel
                .degraded
                .push("no process attribution: the kernel has no BTF".to_string()),
            (_, Err(e)) => return Err(e),
        }
        info!(programs = ?kernel.attached, cgroup = %node.cgroup_root.display(), "attached");
        for why in &kernel.degraded {
            warn!("degraded: {why}");
        }
        Ok(kernel)
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
