//! `meshguard agent`: checks the node, attaches the kernel programs, and turns ring-buffer events
//! into judged flow records (logged with `--log-flows`, counted in `/metrics`) until SIGINT or
//! SIGTERM, then detaches.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use meshguard_ebpf::Stat;
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    time::interval,
};
use tracing::{info, warn};

use crate::{
    api::{
        self,
        types::{InventoryStatus, Status},
    },
    event::decode,
    flow::{
        record::Change,
        table::{FlowTable, TableStats},
        Update,
    },
    http,
    inventory::{self, source::Source, Inventory, Shared},
    judge::Judge,
    kernel::{Kernel, ProcessAttribution, Sizes},
    metrics::{loss_source, Metrics},
    prereq,
    state::{kernel_release, AgentState},
    store::FlowStore,
    verdict::{Policy, Verdict},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub node_name: Arc<str>,
    pub log_flows: bool,
    pub sizes: Sizes,
    pub process_attribution: ProcessAttribution,
    pub inventory: Source,
    pub policy: Option<PathBuf>,
    /// Flows the agent keeps in memory at once.
    pub max_flows: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Flow label sets `/metrics` keeps before folding new ones into `_overflow`.
    pub max_series: usize,
    /// The cgroup v2 root to attach at, when the agent's own view is not the host's (a pod).
    pub cgroup_root: Option<PathBuf>,
    /// The API's unix socket; `None`: none.
    pub api_socket: Option<PathBuf>,
    /// The API on TCP too, with the bearer token read from a file.
    pub api_tcp: Option<(SocketAddr, PathBuf)>,
    /// Records kept for queries: recent flows, and apart from them bypasses and other flagged.
    pub store_flows: usize,
    pub store_flagged: usize,
    pub store_bypass: usize,
    /// Where the kernel side is pinned (bpffs) so that it outlives the agent; `None`: not pinned,
    /// detached on exit.
    pub pin_root: Option<PathBuf>,
    /// What happens to the pinned kernel side when the agent exits.
    pub on_exit: OnExit,
    /// What flow records keep of the payload.
    pub evidence: Evidence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Evidence {
    /// The fingerprint only: TLS version, SNI, ALPN; for plaintext the protocol and, for HTTP,
    /// the method and the path without its query string.
    Fingerprint,
    /// Also the HTTP/1 head of each flow's first sample, every header value and the query string
    /// replaced by `<redacted>`, in records and the API (never in metrics).
    Redacted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Leave the programs attached and counting: a restarted agent adopts them and reports
    /// what happened meanwhile.
    Keep,
    /// Detach and unpin everything (as `meshguard uninstall` does).
    Detach,
}

/// How long the series of a workload gone from the inventory stay in `/metrics`.
const SERIES_GRACE: Duration = Duration::from_secs(600);

/// The `--policy` file, or the defaults.
fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Policy> {
    let Some(path) = path else {
        return Ok(Policy::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy {}", path.display()))?;
    serde_json::from_str::<Policy>(&text).with_context(|| format!("policy {}", path.display()))
}

/// SIGHUP: reads the policy and the inventory file again. A file that is now broken changes
/// nothing: the agent keeps what it had, and says so.
fn reload(options: &Options, policy: &mut Policy, inventory: &Shared) {
    match load_policy(options.policy.as_deref()) {
        Ok(new) => {
            if new != *policy {
                info!("SIGHUP: policy reloaded");
            }
            *policy = new;
        }
        Err(e) => warn!(error = %format!("{e:#}"), "SIGHUP: keeping the current policy"),
    }
    if let Source::File(path) = &options.inventory {
        inventory::source::reload(path, inventory);
    }
    info!("SIGHUP: configuration reloaded");
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let policy = load_policy(options.policy.as_deref())?;
    // Say what the node lacks before touching anything.
    let node = prereq::check(options.cgroup_root.as_deref())?;
    let inventory = start_inventory(&options).await?;
    let state = Arc::new(AgentState::new(
        Metrics::new(options.max_series),
        FlowStore::new(
            options.store_flows,
            options.store_flagged,
            options.store_bypass,
        ),
        Arc::clone(&inventory),
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node: options.node_name.to_string(),
            kernel: kernel_release(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            ..Status::default()
        },
    ));
    raise_fd_limit();
    // Serving gets a runtime of its own: however many clients it holds, and however slowly they
    // read, the event loop on this one never waits for them.
    let serving_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("meshguard-serve")
        .enable_all()
        .build()
        .context("starting the serving runtime")?;
    let serving = serve(&options, &state, serving_runtime.handle()).await?;

    let start_kernel = || {
        Kernel::start(
            &node,
            options.sizes,
            options.process_attribution,
            options.pin_root.as_deref(),
        )
    };
    let mut kernel = start_kernel()?;
    let metrics = &state.metrics;
    metrics.programs_attached.set(kernel.attached.len() as i64);
    let degraded: Vec<String> = kernel.degraded.iter().chain(&serving).cloned().collect();
    metrics.degraded.set(i64::from(!degraded.is_empty()));
    metrics
        .map_capacity
        .with_label_values(&["flows"])
        .set(i64::from(kernel.flow_map_capacity));
    {
        let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
        status.programs_attached = kernel.attached.iter().map(|p| p.to_string()).collect();
        status.degraded = degraded;
        status.flow_map.capacity = kernel.flow_map_capacity;
        status.adopted = kernel.adopted;
    }
    state.attached.store(true, Ordering::Relaxed);

    let mut events = poll_events(&mut kernel)?;
    let mut table = FlowTable::new(options.max_flows, boot_time());
    table.capture_redacted = options.evidence == Evidence::Redacted;
    let mut pipeline = Pipeline {
        table,
        judge: Judge::new(node.cgroup_root.clone()),
        state: Arc::clone(&state),
        inventory: Arc::clone(&inventory),
        policy,
        node: Arc::clone(&options.node_name),
        log_flows: options.log_flows,
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        losses: Losses::default(),
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut health_tick = interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    info!(node = %options.node_name, "watching flows");

    // What a replaced generation still queued and kept, now that this one runs.
    for old in kernel.take_retiring() {
        pipeline.retire(old, &mut kernel, "upgrade")?;
    }
    // Whatever the ring buffer held (events of flows seen while no agent ran), then the flow map
    // itself: flows whose events were lost, closed ones the kernel kept for us.
    let mut reconcile = Reconcile::default();
    reconcile.run("start", events.get_mut(), &mut kernel, &mut pipeline)?;
    let mut reattach = false;

    // The kernel wakes the agent only when a backlog builds up; otherwise it drains on this tick.
    let mut drain = interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if std::mem::take(&mut reattach) {
            // Programs found detached: attach a new generation, then drain the old one, as an
            // upgrade does. Nothing the old one queued is lost; the gap is the check interval.
            let old = kernel.into_old(Some(events.into_inner()));
            kernel = start_kernel()?;
            events = poll_events(&mut kernel)?;
            pipeline.retire(old, &mut kernel, "reattach")?;
            for old in kernel.take_retiring() {
                pipeline.retire(old, &mut kernel, "upgrade")?;
            }
            metrics
                .kernel_repairs
                .with_label_values(&["reattached"])
                .inc();
            metrics.programs_attached.set(kernel.attached.len() as i64);
            metrics.degraded.set(i64::from(
                !kernel.degraded.is_empty() || !serving.is_empty(),
            ));
            state.note_repair(
                "programs found detached; a new generation was attached and the old one drained",
            );
            state.attached.store(true, Ordering::Relaxed);
        }
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready.context("polling the ring buffer")?;
                pipeline.drain(guard.get_inner_mut(), &mut kernel)?;
                guard.clear_ready();
            }
            _ = drain.tick() => {
                pipeline.drain(events.get_mut(), &mut kernel)?;
            }
            _ = health_tick.tick() => {
                ticks += 1;
                let table = pipeline.table.stats();
                pipeline.losses.report(&kernel, table, metrics);
                if let Some(trigger) = reconcile.due(&pipeline.losses) {
                    reconcile.run(trigger, events.get_mut(), &mut kernel, &mut pipeline)?;
                }
                if ticks.is_multiple_of(HEALTH_EVERY_TICKS) {
                    reattach = check_kernel(&mut kernel, &state);
                }
                metrics.flows_tracked.set(table.tracked as i64);
                let pods = Arc::clone(&inventory.read().unwrap_or_else(|e| e.into_inner()));
                let age = pods.loaded_at.and_then(|t| t.elapsed().ok());
                metrics.inventory_age.set(age.map_or(0.0, |d| d.as_secs_f64()));
                let entries = (ticks % 15 == 1).then(|| {
                    let n = kernel.flow_map_entries();
                    metrics.map_entries.with_label_values(&["flows"]).set(n as i64);
                    n
                });
                let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
                status.flows_tracked = table.tracked;
                status.flows_recovered = table.recovered;
                status.inventory = InventoryStatus { source: pods.source.clone(), pods: pods.len(), age_seconds: age.map(|d| d.as_secs()) };
                status.container_cgroups = pipeline.judge.containers_known();
                status.events_lost = pipeline.losses.by_source();
                status.reconcile.duplicates_dropped = pipeline.table.repeats();
                status.connections_refused = metrics.connections_refused_total();
                if let Some(n) = entries {
                    status.flow_map.entries = n;
                }
                if ticks.is_multiple_of(60) {
                    metrics.forget_gone_workloads(&pods, SERIES_GRACE);
                }
            }
            _ = sighup.recv() => reload(&options, &mut pipeline.policy, &inventory),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let tracked = pipeline.table.stats().tracked;
    let pinned = options.pin_root.is_some();
    serving_runtime.shutdown_background();
    match options.on_exit {
        OnExit::Detach => kernel.detach(),
        OnExit::Keep => drop(kernel),
    }
    if let Some(path) = &options.api_socket {
        let _ = std::fs::remove_file(path);
    }
    if pinned && options.on_exit == OnExit::Keep {
        info!(
            tracked,
            "stopped; the kernel programs stay attached (meshguard uninstall removes them)"
        );
    } else {
        info!(tracked, "detached");
    }
    Ok(())
}

/// Reconciliation of the kernel's flow map with the agent's table: at start, and again after
/// the ring buffer overflowed (again while a closed entry is too recent to judge).
#[derive(Default)]
struct Reconcile {
    /// `ringbuf_full` when the last pass ran.
    ringbuf_full_seen: u64,
    /// The last pass left recent entries for later.
    deferred: bool,
    last: Option<std::time::Instant>,
}

/// The least time between two passes: a ring buffer that overflows again and again must not
/// turn the event loop into a loop of map walks, which would overflow it more.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// How often (in health ticks of a second) the agent checks that its programs are attached
/// and pinned.
const HEALTH_EVERY_TICKS: u64 = 2;

impl Reconcile {
    /// Why a pass is due now, if one is.
    fn due(&self, losses: &Losses) -> Option<&'static str> {
        if self.last.is_some_and(|t| t.elapsed() < RECONCILE_EVERY) {
            return None;
        }
        if losses.kernel[Stat::RingbufFull as usize] > self.ringbuf_full_seen {
            Some("overflow")
        } else {
            self.deferred.then_some("deferred")
        }
    }

    /// Drains the ring buffer first: what it still holds must not be taken for lost.
    fn run(
        &mut self,
        trigger: &'static str,
        ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
        kernel: &mut Kernel,
        pipeline: &mut Pipeline,
    ) -> anyhow::Result<()> {
        self.last = Some(std::time::Instant::now());
        pipeline.drain(ring, kernel)?;
        self.ringbuf_full_seen = kernel
            .stats()
            .map(|s| s[Stat::RingbufFull as usize])
            .unwrap_or(self.ringbuf_full_seen);
        let walk = kernel.flow_map();
        if trigger == "start" {
            pipeline.restore(kernel.reported(), &walk.entries, kernel);
        }
        let found = pipeline.reconcile(trigger, walk, crate::kernel::now_ns(), kernel)?;
        self.deferred = found > 0;
        Ok(())
    }
}

/// How often the agent reads the ring buffer when the kernel has not woken it: the longest a
/// flow waits before it is judged, and what `flows -f` adds to its latency.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The agent's event path: ring-buffer events into the flow table, judged against the
/// inventory and the policy, published.
struct Pipeline {
    table: FlowTable,
    judge: Judge,
    state: Arc<AgentState>,
    inventory: Shared,
    policy: Policy,
    node: Arc<str>,
    log_flows: bool,
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    losses: Losses,
}

impl Pipeline {
    /// Reads every event waiting in the ring buffer and publishes what they change; removes
    /// the map entries the kernel no longer needs (the peers of closed UDP sockets).
    fn drain(
        &mut self,
        ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
        kernel: &mut Kernel,
    ) -> anyhow::Result<()> {
        let (mut updates, mut forget) = (Vec::new(), Vec::new());
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(event) => self.table.apply(&event, &mut updates, &mut forget),
                Err(e) => {
                    self.losses.undecodable += 1;
                    self.state
                        .metrics
                        .events_lost
                        .with_label_values(&["undecodable"])
                        .inc();
                    if self.losses.undecodable == 1 {
                        warn!(%e, "undecodable kernel event (counted; further ones are not logged)");
                    }
                }
            }
        }
        kernel.forget(&forget);
        self.publish(updates, kernel)
    }

    /// Takes the judgements an earlier agent left in `REPORTED` for the open flows of `entries`,
    /// and keeps them in this generation's map too.
    fn restore(
        &mut self,
        reported: Vec<(u64, meshguard_ebpf::Reported)>,
        entries: &[(u64, meshguard_ebpf::FlowState)],
        kernel: &mut Kernel,
    ) {
        let states: std::collections::HashMap<u64, &meshguard_ebpf::FlowState> =
            entries.iter().map(|(k, s)| (*k, s)).collect();
        let mut restored = 0;
        for (key, entry) in reported {
            let (Some(state), Some(verdict)) =
                (states.get(&key), Verdict::from_code(entry.verdict))
            else {
                continue;
            };
            let reason = &entry.reason[..usize::from(entry.reason_len).min(entry.reason.len())];
            let Ok(reason) = std::str::from_utf8(reason) else {
                continue;
            };
            self.table
                .restore(key, state, verdict, crate::verdict::intern_reason(reason));
            kernel.remember(key, entry);
            restored += 1;
        }
        if restored > 0 {
            info!(
                restored,
                "open flows already reported by the agent before this one: not reported again"
            );
        }
    }

    /// One reconciliation of a flow map walk with the table: publishes what its events never
    /// told, counts what the walk met. Returns how many closed entries were left for later.
    fn reconcile(
        &mut self,
        trigger: &'static str,
        walk: crate::kernel::Walk,
        now_ns: u64,
        kernel: &mut Kernel,
    ) -> anyhow::Result<usize> {
        let metrics = &self.state.metrics;
        metrics.reconcile_passes.with_label_values(&[trigger]).inc();
        for (kind, n) in [
            ("repeated", walk.repeats),
            ("vanished", walk.vanished),
            ("error", walk.errors),
            ("cut", u64::from(walk.cut)),
        ] {
            metrics
                .reconcile_anomalies
                .with_label_values(&[kind])
                .inc_by(n);
        }
        if walk.errors > 0 || walk.cut {
            warn!(
                errors = walk.errors,
                cut = walk.cut,
                "the flow map walk was incomplete; the next pass looks again"
            );
        }
        let scanned = walk.entries.len();
        {
            let mut status = self.state.status.lock().unwrap_or_else(|e| e.into_inner());
            let r = &mut status.reconcile;
            r.passes += 1;
            r.last_scanned = scanned;
            r.repeated += walk.repeats;
            r.vanished += walk.vanished;
            r.errors += walk.errors;
            r.cut += u64::from(walk.cut);
        }
        let found = self.table.reconcile(walk.entries, now_ns);
        kernel.forget(&found.forget);
        let recovered = found.updates.len();
        self.publish(found.updates, kernel)?;
        self.state.metrics.flows_recovered.inc_by(recovered as u64);
        if recovered > 0 {
            warn!(
                recovered,
                scanned,
                trigger,
                "flows reported from the kernel's flow map: their events were lost"
            );
        } else {
            info!(
                scanned,
                trigger,
                deferred = found.deferred,
                "flow map reconciled"
            );
        }
        Ok(found.deferred + usize::from(walk.errors > 0 || walk.cut))
    }

    /// Drains a replaced generation, already detached: its queued events, then its flow map
    /// (with nothing more to come, no entry is left for later), then its record of what was
    /// reported. Events of another layout cannot be read: they are counted as lost.
    fn retire(
        &mut self,
        mut old: crate::kernel::OldGeneration,
        kernel: &mut Kernel,
        trigger: &'static str,
    ) -> anyhow::Result<()> {
        let mut unreadable = 0u64;
        if let Some(ring) = old.events.as_mut() {
            if old.same_layout {
                self.drain(ring, kernel)?;
            } else {
                while ring.next().is_some() {
                    unreadable += 1;
                }
            }
        }
        if unreadable > 0 {
            warn!(unreadable, pins = %old.dir.display(), "events of a generation with another layout could not be read: counted as lost");
            self.losses.undecodable += unreadable;
            self.state
                .metrics
                .events_lost
                .with_label_values(&["undecodable"])
                .inc_by(unreadable);
        }
        let walk = old.flow_map();
        let scanned = walk.entries.len();
        self.restore(old.reported(), &walk.entries, kernel);
        self.reconcile(trigger, walk, u64::MAX, kernel)?;
        self.state.note_repair(&format!(
            "drained a replaced generation ({trigger}): {scanned} flow map entries, {unreadable} events of another layout"
        ));
        Ok(())
    }

    /// Judges what changed against the inventory of now, with the flows held back for
    /// evidence, and publishes each record: to the store, followers and metrics, and with
    /// `--log-flows` to stdout. Judged after the whole read is applied, so that a flow
    /// classified and closed within one read (most short connections) is published once,
    /// closed; and an open flow is published once its evidence is whole or its wait is over,
    /// so that its first record is the one that stands.
    fn publish(&mut self, updates: Vec<Update>, kernel: &mut Kernel) -> anyhow::Result<()> {
        let waiting = self.table.take_waiting();
        if updates.is_empty() && waiting.is_empty() {
            return Ok(());
        }
        let pods = Arc::clone(&self.inventory.read().unwrap_or_else(|e| e.into_inner()));
        let now = crate::kernel::now_ns();
        for update in waiting.into_iter().map(Update::Evidence).chain(updates) {
            let Some(record) = self.judge.record(
                &mut self.table,
                update,
                &pods,
                &self.policy,
                &self.node,
                now,
            ) else {
                continue;
            };
            if let Some(from) = &record.corrected_from {
                warn!(id = %record.id, from = from.verdict.as_str(), to = record.verdict.as_str(), reason = &*record.reason, "verdict corrected by later evidence");
                self.state
                    .metrics
                    .verdict_corrections
                    .with_label_values(&[from.verdict.as_str(), record.verdict.as_str()])
                    .inc();
            }
            match record.event {
                // Kept in the kernel: an agent after this one will not report it again.
                Change::Classified => kernel.remember(record.cookie(), reported(&record)),
                Change::Closed if !record.first_report => kernel.forget_reported(record.cookie()),
                Change::Closed => {}
            }
            if self.log_flows {
                serde_json::to_writer(&mut self.out, &record)?;
                self.out.write_all(b"\n")?;
            }
            self.state.publish(record);
        }
        self.out.flush()?;
        Ok(())
    }
}

/// The record an open flow's first publication leaves in the kernel's `REPORTED` map.
fn reported(record: &crate::flow::record::FlowRecord) -> meshguard_ebpf::Reported {
    let mut entry = meshguard_ebpf::Reported {
        verdict: record.verdict.code(),
        ..Default::default()
    };
    let reason = record.reason.as_bytes();
    let n = reason.len().min(entry.reason.len());
    entry.reason[..n].copy_from_slice(&reason[..n]);
    entry.reason_len = n as u8;
    entry
}

/// Checks the kernel side; says whether its programs must be attached again.
fn check_kernel(kernel: &mut Kernel, state: &AgentState) -> bool {
    let health = kernel.check();
    let metrics = &state.metrics;
    for e in &health.errors {
        warn!(error = %e, "checking the kernel side");
    }
    if !health.repinned.is_empty() {
        warn!(pins = ?health.repinned, "pins were removed behind the agent's back: pinned again");
        metrics
            .kernel_repairs
            .with_label_values(&["repinned"])
            .inc_by(health.repinned.len() as u64);
        state.note_repair(&format!(
            "pins removed behind the agent's back, pinned again: {}",
            health.repinned.join(", ")
        ));
    }
    if health.detached.is_empty() {
        return false;
    }
    warn!(programs = ?health.detached, "programs detached behind the agent's back: attaching them again");
    state.attached.store(false, Ordering::Relaxed);
    metrics.degraded.set(1);
    metrics
        .programs_attached
        .set((kernel.attached.len() - health.detached.len().min(kernel.attached.len())) as i64);
    true
}

/// The ring buffer of `kernel`, polled by the event loop.
fn poll_events(
    kernel: &mut Kernel,
) -> anyhow::Result<AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    let events = kernel.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until the AsyncFd
    // that owns the ring buffer is dropped.
    unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")
}

/// Raises the open-file limit to its hard limit: every client connection is a descriptor, and
/// running out would also keep the agent from opening cgroups and maps.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A listener bound now (so that a port in use fails the start), served on `runtime`.
fn bind_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("serving {what} on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts the endpoints on the serving runtime: metrics and health on TCP, the API on its unix
/// socket and, if asked, on TCP with a token. Failing to bind is fatal: a DaemonSet pod should
/// restart, loudly. A token file that does not exist (its Secret not created yet) only leaves
/// the TCP API off: the node is still watched. Returns what is not served, in words.
async fn serve(
    options: &Options,
    state: &Arc<AgentState>,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Vec<String>> {
    let mut not_served = Vec::new();
    if let Some(addr) = options.metrics_addr {
        let listener = bind_tcp(addr, "metrics")?;
        info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        let state = Arc::clone(state);
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => http::serve(listener, state).await,
                Err(e) => warn!(%e, "metrics server stopped"),
            }
        });
    }
    if let Some(path) = options.api_socket.clone() {
        // Bind now, so that a second agent on the node is refused before it attaches.
        let state = Arc::clone(state);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            if let Err(e) = api::serve_unix(&path, state, ready_tx).await {
                warn!(path = %path.display(), error = %format!("{e:#}"), "API socket stopped");
            }
        });
        ready_rx.await.context("starting the API socket")??;
    }
    if let Some((addr, token_file)) = &options.api_tcp {
        let token = match std::fs::read_to_string(token_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!(
                    "no API on {addr}: the token file {} does not exist (for a DaemonSet: create the Secret meshguard-api-token, then restart the pods)",
                    token_file.display()
                );
                warn!("{why}");
                not_served.push(why);
                return Ok(not_served);
            }
            read => read
                .with_context(|| format!("reading the API token from {}", token_file.display()))?
                .trim()
                .to_string(),
        };
        anyhow::ensure!(
            token.len() >= 16,
            "the API token in {} is shorter than 16 characters",
            token_file.display()
        );
        let listener = bind_tcp(*addr, "the API")?;
        info!(addr = %listener.local_addr()?, "serving the API on TCP (bearer token required)");
        let state = Arc::clone(state);
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => api::serve_tcp(listener, token, state).await,
                Err(e) => warn!(%e, "API listener stopped"),
            }
        });
    }
    Ok(not_served)
}

/// Starts the `--inventory` source; the inventory is empty until it delivers.
async fn start_inventory(options: &Options) -> anyhow::Result<Shared> {
    let empty = Inventory::empty(&options.inventory.to_string());
    let inventory: Shared = Arc::new(RwLock::new(Arc::new(empty)));
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
    info!(source = %options.inventory, "inventory");
    Ok(inventory)
}

/// Losses seen so far; each rise is logged and exported, never silently absorbed.
#[derive(Default)]
struct Losses {
    kernel: [u64; Stat::COUNT as usize],
    evicted: u64,
    lost_unseen: u64,
    undecodable: u64,
}

impl Losses {
    fn by_source(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out: std::collections::BTreeMap<String, u64> = Stat::ALL
            .into_iter()
            .filter_map(|stat| {
                loss_source(stat).map(|s| (s.to_string(), self.kernel[stat as usize]))
            })
            .collect();
        out.insert("undecodable".into(), self.undecodable);
        out.insert("agent_table_evicted".into(), self.evicted);
        out.insert("flow_evicted_unseen".into(), self.lost_unseen);
        out
    }

    fn report(&mut self, kernel: &Kernel, table: TableStats, metrics: &Metrics) {
        match kernel.stats() {
            Ok(now) => {
                for stat in Stat::ALL {
                    let (before, after) = (self.kernel[stat as usize], now[stat as usize]);
                    let Some(source) = loss_source(stat) else {
                        continue;
                    };
                    if after > before {
                        warn!(counter = ?stat, total = after, new = after - before, "kernel-side loss");
                        metrics
                            .events_lost
                            .with_label_values(&[source])
                            .inc_by(after - before);
                    }
                }
                self.kernel = now;
            }
            Err(e) => warn!(%e, "cannot read kernel counters"),
        }
        if table.lost_unseen > self.lost_unseen {
            warn!(
                total = table.lost_unseen,
                "flows evicted from the kernel's map before the agent saw them: only their addresses are known"
            );
            metrics
                .events_lost
                .with_label_values(&["flow_evicted_unseen"])
                .inc_by(table.lost_unseen - self.lost_unseen);
            self.lost_unseen = table.lost_unseen;
        }
        let evicted = table.evicted;
        if evicted > self.evicted {
            warn!(
                total = evicted,
                "flows evicted from the agent's table before they closed"
            );
            metrics
                .events_lost
                .with_label_values(&["agent_table_evicted"])
                .inc_by(evicted - self.evicted);
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
