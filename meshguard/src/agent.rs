//! `meshguard agent`: checks the node, attaches the kernel programs, and turns ring-buffer events
//! into flow records until SIGINT or SIGTERM, then detaches.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use meshguard_ebpf::Stat;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::interval,
};
use tracing::{info, warn};

use crate::{
    event::decode,
    flow::FlowTable,
    inventory::{self, source::Source, Inventory, Shared},
    kernel::{Kernel, ProcessAttribution, Sizes},
    prereq,
    verdict::Policy,
};

#[derive(Clone, Debug)]
pub struct Options {
    pub node_name: String,
    pub log_flows: bool,
    pub sizes: Sizes,
    pub process_attribution: ProcessAttribution,
    pub inventory: Source,
    pub policy: Option<PathBuf>,
    /// Flows the agent keeps in memory at once.
    pub max_flows: usize,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let policy = match &options.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading policy {}", path.display()))?;
            serde_json::from_str::<Policy>(&text)
                .with_context(|| format!("policy {}", path.display()))?
        }
        None => Policy::default(),
    };
    let inventory: Shared = Arc::new(RwLock::new(Arc::new(Inventory::empty(
        &options.inventory.to_string(),
    ))));
    match &options.inventory {
        Source::File(path) => {
            inventory::source::reload(path, &inventory);
            tokio::spawn(inventory::source::watch_file(
                path.clone(),
                Arc::clone(&inventory),
            ));
        }
        #[cfg(feature = "kubernetes")]
        Source::Kubernetes => {
            inventory::kubernetes::start(&options.node_name, Arc::clone(&inventory)).await?
        }
        #[cfg(not(feature = "kubernetes"))]
        Source::Kubernetes => {
            anyhow::bail!("--inventory kubernetes: this build has no Kubernetes support")
        }
        Source::None => {}
    }
    info!(source = %inventory.read().unwrap_or_else(|e| e.into_inner()).source, "inventory");
    let node = prereq::check()?;
    let mut kernel = Kernel::attach(&node, options.sizes, options.process_attribution)?;
    let events = kernel.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until the AsyncFd
    // that owns the ring buffer is dropped.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")?;
    let mut table = FlowTable::new(options.max_flows, boot_time());
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut health = interval(Duration::from_secs(1));
    let mut losses = Losses::default();
    info!(node = %options.node_name, "watching flows");

    loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready.context("polling the ring buffer")?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let event = match decode(&item) {
                        Ok(event) => event,
                        Err(e) => {
                            losses.undecodable += 1;
                            if losses.undecodable == 1 {
                                warn!(%e, "undecodable kernel event (counted; further ones are not logged)");
                            }
                            continue;
                        }
                    };
                    let Some((flow, change)) = table.apply(&event) else { continue };
                    if options.log_flows {
                        let pods = Arc::clone(&inventory.read().unwrap_or_else(|e| e.into_inner()));
                        let record = flow.record(&options.node_name, change, &pods, &policy);
                        serde_json::to_writer(&mut stdout, &record)?;
                        stdout.write_all(b"\n")?;
                    }
                }
                guard.clear_ready();
                stdout.flush()?;
            }
            _ = health.tick() => losses.report(&kernel, table.stats().evicted),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    drop(kernel);
    info!(tracked = table.stats().tracked, "detached");
    Ok(())
}

/// Losses seen so far; each rise is logged once per check, never silently absorbed.
#[derive(Default)]
struct Losses {
    kernel: [u64; Stat::COUNT as usize],
    evicted: u64,
    undecodable: u64,
}

impl Losses {
    fn report(&mut self, kernel: &Kernel, evicted: u64) {
        match kernel.stats() {
            Ok(now) => {
                for stat in Stat::ALL {
                    let (before, after) = (self.kernel[stat as usize], now[stat as usize]);
                    if after > before && stat != Stat::FlowMidstream {
                        warn!(counter = ?stat, total = after, new = after - before, "kernel-side loss");
                    }
                }
                self.kernel = now;
            }
            Err(e) => warn!(%e, "cannot read kernel counters"),
        }
        if evicted > self.evicted {
            warn!(
                total = evicted,
                "flows evicted from the agent's table before they closed"
            );
            self.evicted = evicted;
        }
    }
}

/// Wall-clock time at boot, to place kernel timestamps (CLOCK_MONOTONIC) in real time.
fn boot_time() -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let since_boot = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now() - since_boot
}

/// `NODE_NAME` (the DaemonSet sets it from the downward API), else the host name.
pub fn default_node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
