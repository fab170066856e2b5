//! The agent's event path, one struct that owns every stage: the kernel side and its ring
//! buffer, the flow table, the judging stage with the inventory and the policy, the publisher
//! and the loss counters. Events are decoded, applied to the table, judged and published, in
//! that order; the event loop only says when ([`Pipeline::drain`], [`Pipeline::tick`]).

use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use meshguard_ebpf::{FlowState, Reported};
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{info, warn};

use super::losses::Losses;
use crate::{
    api::types::InventoryStatus,
    clock,
    config::{AgentConfig, Evidence, OnExit},
    enforce::{self, Action},
    event::decode,
    flow::{
        record::{Change, FlowRecord, State},
        table::{FlowTable, TableStats},
        Update,
    },
    inventory::Shared,
    judge::Judge,
    kernel::{
        prereq::Node,
        reset::{self, Resetter},
        Kernel, KernelError, OldGeneration, ProcessAttribution, Sizes, Walk,
    },
    state::AgentState,
    verdict::{intern_reason, Policy, Verdict},
};

/// How often (in health ticks of a second) the agent checks that its programs are attached
/// and pinned.
const HEALTH_EVERY_TICKS: u64 = 2;

/// How often (in ticks) the kernel's flow map is counted: a walk of its keys.
const MAP_COUNT_EVERY_TICKS: u64 = 15;

/// How often (in ticks) the series of workloads gone from the inventory are looked for.
const SERIES_SWEEP_EVERY_TICKS: u64 = 60;

/// How long the series of a workload gone from the inventory stay in `/metrics`.
const SERIES_GRACE: Duration = Duration::from_secs(600);

/// The least time between two reconciliation passes: a ring buffer that overflows again and
/// again must not turn the event loop into a loop of map walks, which would overflow it more.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Pipeline {
    attach: Attach,
    kernel: Kernel,
    events: AsyncFd<RingBuf<MapData>>,
    table: FlowTable,
    judge: Judge,
    inventory: Shared,
    pub(super) policy: Policy,
    publisher: Publisher,
    losses: Losses,
    reconcile: Schedule,
    /// Endpoints that could not be served (the agent is degraded while any is missing).
    not_served: Vec<String>,
    ticks: u64,
    enforcement: Enforcement,
}

/// How enforcement stands.
struct Enforcement {
    on_exit: OnExit,
    /// Cgroups in the last plan.
    containers: usize,
    /// Why the last plan could not be written whole.
    error: Option<String>,
}

/// How long the agent's word for enforcement lasts: renewed every tick, it lapses (and the
/// kernel refuses nothing) this long after the agent stopped renewing it.
const VOUCH: Duration = Duration::from_secs(10);

/// How a generation of the kernel side is attached: at start, and again when one is found
/// detached.
struct Attach {
    node: Node,
    sizes: Sizes,
    attribution: ProcessAttribution,
    pin_root: Option<PathBuf>,
}

impl Attach {
    fn start(&self) -> Result<Kernel, KernelError> {
        Kernel::start(
            &self.node,
            self.sizes,
            self.attribution,
            self.pin_root.as_deref(),
        )
    }
}

/// When the kernel's flow map is reconciled with the table: at start, and again after the ring
/// buffer overflowed (again while a closed entry is too recent to judge).
#[derive(Default)]
struct Schedule {
    /// `ringbuf_full` when the last pass ran.
    ringbuf_full_seen: u64,
    /// The last pass left recent entries for later.
    deferred: bool,
    last: Option<Instant>,
}

impl Schedule {
    /// Why a pass is due now, if one is.
    fn due(&self, ringbuf_full: u64) -> Option<&'static str> {
        if self.last.is_some_and(|t| t.elapsed() < RECONCILE_EVERY) {
            return None;
        }
        if ringbuf_full > self.ringbuf_full_seen {
            Some("overflow")
        } else {
            self.deferred.then_some("deferred")
        }
    }
}

/// The last stage: each judged record to the kernel's `REPORTED` map, the store, followers and
/// metrics, and with `--log-flows` to stdout.
struct Publisher {
    state: Arc<AgentState>,
    node: Arc<str>,
    log: Option<std::io::BufWriter<std::io::StdoutLock<'static>>>,
    resetter: Resetter,
    /// Enforcement's decisions as Kubernetes Events (`--inventory kubernetes`).
    #[cfg(feature = "kubernetes")]
    events: Option<super::events::Events>,
}

impl Publisher {
    fn publish(&mut self, record: FlowRecord, kernel: &mut Kernel) -> anyhow::Result<()> {
        if let Some(from) = &record.corrected_from {
            warn!(id = %record.id, from = from.verdict.as_str(), to = record.verdict.as_str(), reason = &*record.reason, "verdict corrected by later evidence");
            self.state
                .metrics
                .verdict_corrections
                .with_label_values(&[from.verdict.as_str(), record.verdict.as_str()])
                .inc();
        }
        if record.reports_action() {
            self.enforced(&record);
        }
        match record.event {
            // Kept in the kernel: an agent after this one will not report it again.
            Change::Classified => kernel.remember(record.cookie(), reported(&record)),
            Change::Enforced => {}
            Change::Closed if !record.first_report => kernel.forget_reported(record.cookie()),
            Change::Closed => {}
        }
        if let Some(out) = &mut self.log {
            serde_json::to_writer(&mut *out, &record)?;
            out.write_all(b"\n")?;
        }
        self.state.publish(record);
        Ok(())
    }

    /// Says what enforcement did to a flow, and resets a refused one's connection while it is
    /// open (the kernel already drops what it sends, from its first payload packet).
    fn enforced(&mut self, record: &FlowRecord) {
        let (Some(action), Some(rule)) = (record.action, record.action_rule) else {
            return;
        };
        #[cfg(feature = "kubernetes")]
        if let Some(events) = &mut self.events {
            events.send(record);
        }
        let (namespace, workload) = record.local.workload_labels();
        let what = (record.verdict.as_str(), &*record.reason);
        if action == Action::WouldRefuse {
            info!(id = %record.id, namespace, workload, rule = rule.as_str(), verdict = what.0, reason = what.1, "enforcement (audit): would have refused");
            return;
        }
        let socket = reset::Socket {
            cookie: record.cookie(),
            netns: record.netns_cookie,
            local: SocketAddr::new(record.local.ip, record.local.port),
            remote: SocketAddr::new(record.remote.ip, record.remote.port),
            pid: record.process.pid,
        };
        let reset = match record.state {
            State::Closed => "not needed: closed".to_string(),
            State::Open => match self.resetter.reset(socket) {
                Ok(()) => "done".to_string(),
                Err(e) => format!("failed ({e}): the connection carries nothing and times out"),
            },
        };
        warn!(id = %record.id, namespace, workload, rule = rule.as_str(), verdict = what.0, reason = what.1, reset, "enforcement: refused");
        if !record.verdict.is_bypass() {
            // The kernel saw plaintext past the sidecar, the verdict says otherwise: said
            // loudly, since a refusal the verdicts do not back is an outage.
            warn!(id = %record.id, verdict = what.0, reason = what.1, "enforcement refused a flow that its verdict does not call a bypass");
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(out) = &mut self.log {
            out.flush()?;
        }
        Ok(())
    }
}

impl Pipeline {
    /// Attaches (or adopts) the kernel side, then takes in what happened while no agent ran:
    /// what replaced generations still queued and kept, whatever the ring buffer held (events
    /// of flows seen meanwhile), then the flow map itself (flows whose events were lost, closed
    /// ones the kernel kept for us).
    pub(super) fn start(
        config: &AgentConfig,
        node: Node,
        state: Arc<AgentState>,
        policy: Policy,
        not_served: Vec<String>,
    ) -> anyhow::Result<Self> {
        let attach = Attach {
            node,
            sizes: Sizes {
                flow_map_entries: config.kernel.flow_map_size,
                ringbuf_bytes: config.kernel.ringbuf_bytes,
            },
            attribution: config.kernel.process_attribution,
            pin_root: config.kernel.pin_root().map(PathBuf::from),
        };
        let mut kernel = attach.start()?;
        let events = poll_events(&mut kernel)?;
        let mut table = FlowTable::new(config.flows.max_flows, clock::boot_time());
        table.capture_redacted = config.flows.evidence == Evidence::Redacted;
        let mut pipeline = Pipeline {
            judge: Judge::new(attach.node.cgroup_root.clone()),
            attach,
            kernel,
            events,
            table,
            inventory: Arc::clone(&state.inventory),
            policy,
            publisher: Publisher {
                state,
                node: Arc::from(config.node.node_name.as_str()),
                log: config
                    .node
                    .log_flows
                    .then(|| std::io::BufWriter::new(std::io::stdout().lock())),
                resetter: Resetter::default(),
                #[cfg(feature = "kubernetes")]
                events: None,
            },
            losses: Losses::default(),
            reconcile: Schedule::default(),
            not_served,
            ticks: 0,
            enforcement: Enforcement {
                on_exit: config.kernel.on_exit,
                containers: 0,
                error: None,
            },
        };
        pipeline.enforce();
        pipeline.attached(true);
        for old in pipeline.kernel.take_retiring() {
            pipeline.retire(old, "upgrade")?;
        }
        pipeline.reconcile("start")?;
        Ok(pipeline)
    }

    /// Publishes enforcement's decisions as Kubernetes Events from now on.
    #[cfg(feature = "kubernetes")]
    pub(super) fn publish_events(&mut self, events: super::events::Events) {
        self.publisher.events = Some(events);
    }

    fn state(&self) -> &AgentState {
        &self.publisher.state
    }

    /// Says that a generation is attached, in metrics and status (`first`: the agent's first).
    fn attached(&mut self, first: bool) {
        let kernel = &self.kernel;
        let state = &self.publisher.state;
        let metrics = &state.metrics;
        metrics.programs_attached.set(kernel.attached.len() as i64);
        let degraded: Vec<String> = kernel
            .degraded
            .iter()
            .chain(&self.not_served)
            .cloned()
            .collect();
        metrics.degraded.set(i64::from(!degraded.is_empty()));
        if first {
            metrics
                .map_capacity
                .with_label_values(&["flows"])
                .set(i64::from(kernel.flow_map_capacity));
            let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
            status.programs_attached = kernel.attached.iter().map(|p| p.to_string()).collect();
            status.degraded = degraded;
            status.flow_map.capacity = kernel.flow_map_capacity;
            status.adopted = kernel.adopted;
        }
        state.attached.store(true, Ordering::Relaxed);
    }

    /// Waits until the kernel wakes the agent (a backlog built up), then drains.
    pub(super) async fn drain_when_readable(&mut self) -> anyhow::Result<()> {
        let mut guard = self
            .events
            .readable_mut()
            .await
            .context("polling the ring buffer")?;
        guard.clear_ready();
        self.drain()
    }

    /// Reads every event waiting in the ring buffer and publishes what they change; removes
    /// the map entries the kernel no longer needs (the peers of closed UDP sockets).
    pub(super) fn drain(&mut self) -> anyhow::Result<()> {
        let metrics = &self.publisher.state.metrics;
        let (updates, forget) = read(
            self.events.get_mut(),
            &mut self.table,
            &mut self.losses,
            metrics,
        );
        self.kernel.forget(&forget);
        self.publish(updates)
    }

    /// The health tick, once a second: losses, reconciliation when due, the kernel side's
    /// health (a generation found detached is replaced), and the gauges and status.
    pub(super) fn tick(mut self) -> anyhow::Result<Self> {
        self.ticks += 1;
        let table = self.table.stats();
        let state = Arc::clone(&self.publisher.state);
        self.losses
            .report(self.kernel.stats(), table, &state.metrics);
        if let Some(trigger) = self.reconcile.due(self.losses.ringbuf_full()) {
            self.reconcile(trigger)?;
        }
        let detached = self.ticks.is_multiple_of(HEALTH_EVERY_TICKS) && self.check_kernel();
        self.enforce();
        self.report_status(table);
        if detached {
            self = self.reattach()?;
        }
        Ok(self)
    }

    /// The gauges and the status of a tick.
    fn report_status(&self, table: TableStats) {
        let (state, metrics) = (self.state(), &self.state().metrics);
        metrics.flows_tracked.set(table.tracked as i64);
        let pods = Arc::clone(&self.inventory.read().unwrap_or_else(|e| e.into_inner()));
        let age = pods.loaded_at.and_then(|t| t.elapsed().ok());
        metrics
            .inventory_age
            .set(age.map_or(0.0, |d| d.as_secs_f64()));
        let entries = (self.ticks % MAP_COUNT_EVERY_TICKS == 1).then(|| {
            let n = self.kernel.flow_map_entries();
            metrics
                .map_entries
                .with_label_values(&["flows"])
                .set(n as i64);
            n
        });
        let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
        status.flows_tracked = table.tracked;
        status.flows_recovered = table.recovered;
        status.inventory = InventoryStatus {
            source: pods.source.clone(),
            pods: pods.len(),
            age_seconds: age.map(|d| d.as_secs()),
        };
        status.container_cgroups = self.judge.containers_known();
        status.events_lost = self.losses.by_source();
        status.reconcile.duplicates_dropped = self.table.repeats();
        status.connections_refused = metrics.connections_refused_total();
        if let Some(n) = entries {
            status.flow_map.entries = n;
        }
        drop(status);
        if self.ticks.is_multiple_of(SERIES_SWEEP_EVERY_TICKS) {
            metrics.forget_gone_workloads(&pods, SERIES_GRACE);
        }
    }

    /// Checks the kernel side; says whether its programs must be attached again.
    fn check_kernel(&mut self) -> bool {
        let health = self.kernel.check();
        let state = &self.publisher.state;
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
        let attached = self.kernel.attached.len();
        metrics
            .programs_attached
            .set((attached - health.detached.len().min(attached)) as i64);
        true
    }

    /// Programs found detached: attaches a new generation, then drains the old one, as an
    /// upgrade does. Nothing the old one queued is lost; the gap is the check interval.
    fn reattach(mut self) -> anyhow::Result<Self> {
        let old = self.kernel.into_old(Some(self.events.into_inner()));
        self.kernel = self.attach.start()?;
        self.events = poll_events(&mut self.kernel)?;
        self.retire(old, "reattach")?;
        for old in self.kernel.take_retiring() {
            self.retire(old, "upgrade")?;
        }
        self.state()
            .metrics
            .kernel_repairs
            .with_label_values(&["reattached"])
            .inc();
        self.attached(false);
        self.state().note_repair(
            "programs found detached; a new generation was attached and the old one drained",
        );
        Ok(self)
    }

    /// One reconciliation pass. Drains the ring buffer first: what it still holds must not be
    /// taken for lost.
    fn reconcile(&mut self, trigger: &'static str) -> anyhow::Result<()> {
        self.reconcile.last = Some(Instant::now());
        self.drain()?;
        self.reconcile.ringbuf_full_seen = self
            .kernel
            .stats()
            .map(|s| s[meshguard_ebpf::Stat::RingbufFull as usize])
            .unwrap_or(self.reconcile.ringbuf_full_seen);
        let walk = self.kernel.flow_map();
        if trigger == "start" {
            let reported = self.kernel.reported();
            self.restore(reported, &walk.entries);
        }
        let deferred = self.reconcile_walk(trigger, walk, clock::now_ns())?;
        self.reconcile.deferred = deferred > 0;
        Ok(())
    }

    /// Takes the judgements an earlier agent left in `REPORTED` for the open flows of `entries`,
    /// and keeps them in this generation's map too.
    fn restore(&mut self, reported: Vec<(u64, Reported)>, entries: &[(u64, FlowState)]) {
        let states: HashMap<u64, &FlowState> = entries.iter().map(|(k, s)| (*k, s)).collect();
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
                .restore(key, state, verdict, intern_reason(reason));
            self.kernel.remember(key, entry);
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
    fn reconcile_walk(
        &mut self,
        trigger: &'static str,
        walk: Walk,
        now_ns: u64,
    ) -> anyhow::Result<usize> {
        let state = Arc::clone(&self.publisher.state);
        let metrics = &state.metrics;
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
            let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
            let r = &mut status.reconcile;
            r.passes += 1;
            r.last_scanned = scanned;
            r.repeated += walk.repeats;
            r.vanished += walk.vanished;
            r.errors += walk.errors;
            r.cut += u64::from(walk.cut);
        }
        let found = self.table.reconcile(walk.entries, now_ns);
        self.kernel.forget(&found.forget);
        let recovered = found.updates.len();
        self.publish(found.updates)?;
        metrics.flows_recovered.inc_by(recovered as u64);
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
    fn retire(&mut self, mut old: OldGeneration, trigger: &'static str) -> anyhow::Result<()> {
        let mut unreadable = 0u64;
        if let Some(ring) = old.events.as_mut() {
            if old.same_layout {
                let metrics = &self.publisher.state.metrics;
                let (updates, forget) = read(ring, &mut self.table, &mut self.losses, metrics);
                self.kernel.forget(&forget);
                self.publish(updates)?;
            } else {
                while ring.next().is_some() {
                    unreadable += 1;
                }
            }
        }
        if unreadable > 0 {
            warn!(unreadable, pins = %old.dir.display(), "events of a generation with another layout could not be read: counted as lost");
            self.losses
                .undecodable(unreadable, &self.publisher.state.metrics);
        }
        let walk = old.flow_map();
        let scanned = walk.entries.len();
        self.restore(old.reported(), &walk.entries);
        self.reconcile_walk(trigger, walk, u64::MAX)?;
        self.state().note_repair(&format!(
            "drained a replaced generation ({trigger}): {scanned} flow map entries, {unreadable} events of another layout"
        ));
        Ok(())
    }

    /// Judges what changed against the inventory of now, with the flows held back for
    /// evidence, and publishes each record. Judged after the whole read is applied, so that a
    /// flow classified and closed within one read (most short connections) is published once,
    /// closed; and an open flow is published once its evidence is whole or its wait is over,
    /// so that its first record is the one that stands.
    fn publish(&mut self, updates: Vec<Update>) -> anyhow::Result<()> {
        let waiting = self.table.take_waiting();
        if updates.is_empty() && waiting.is_empty() {
            return Ok(());
        }
        let pods = Arc::clone(&self.inventory.read().unwrap_or_else(|e| e.into_inner()));
        let now = clock::now_ns();
        for update in waiting.into_iter().map(Update::Evidence).chain(updates) {
            let Some(record) = self.judge.record(
                &mut self.table,
                update,
                &pods,
                &self.policy,
                &self.publisher.node,
                now,
            ) else {
                continue;
            };
            self.publisher.publish(record, &mut self.kernel)?;
        }
        self.publisher.flush()
    }

    /// Stops; detaches the kernel side, or leaves it pinned for the next agent, enforcing
    /// only if told to. Returns how many flows were open.
    pub(super) fn stop(mut self, on_exit: OnExit) -> usize {
        let tracked = self.table.stats().tracked;
        match on_exit {
            OnExit::Detach => self.kernel.detach(),
            OnExit::Keep => self.kernel.vouch(0),
            OnExit::KeepEnforcing => self.kernel.vouch(u64::MAX),
        }
        tracked
    }

    /// Writes what enforcement refuses now (the inventory's modes, the cgroup tree, the
    /// policy), and renews the agent's word for it.
    fn enforce(&mut self) {
        let pods = Arc::clone(&self.inventory.read().unwrap_or_else(|e| e.into_inner()));
        let plan = enforce::plan(&pods, self.judge.cgroup_index(&pods), &self.policy);
        let result = self.kernel.enforce(&plan);
        if let Err(e) = &result {
            if self.enforcement.error.as_ref() != Some(e) {
                warn!(error = %e, "enforcement maps not written as planned; retrying");
            }
        }
        if plan.containers.len() != self.enforcement.containers {
            info!(
                containers = plan.containers.len(),
                "enforcement: cgroups audited or enforced"
            );
        }
        self.enforcement.containers = plan.containers.len();
        self.enforcement.error = result.err();
        let until = match self.enforcement.on_exit {
            OnExit::KeepEnforcing => u64::MAX,
            OnExit::Keep | OnExit::Detach => clock::now_ns() + VOUCH.as_nanos() as u64,
        };
        self.kernel.vouch(until);
        let mut status = self
            .state()
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.enforcement = enforce::by_namespace(&pods, self.policy.enforcement);
        status.enforced_cgroups = plan.containers.len();
        status.enforcement_error = self.enforcement.error.clone();
    }
}

/// The decoding stage: every event in `ring` applied to the table; what changed, and the map
/// entries the kernel no longer needs.
fn read(
    ring: &mut RingBuf<MapData>,
    table: &mut FlowTable,
    losses: &mut Losses,
    metrics: &crate::metrics::Metrics,
) -> (Vec<Update>, Vec<u64>) {
    let (mut updates, mut forget) = (Vec::new(), Vec::new());
    while let Some(item) = ring.next() {
        match decode(&item) {
            Ok(event) => table.apply(&event, &mut updates, &mut forget),
            Err(e) => {
                if losses.undecodable(1, metrics) {
                    warn!(%e, "undecodable kernel event (counted; further ones are not logged)");
                }
            }
        }
    }
    (updates, forget)
}

/// The record an open flow's first publication leaves in the kernel's `REPORTED` map.
fn reported(record: &FlowRecord) -> Reported {
    let mut entry = Reported {
        verdict: record.verdict.code(),
        ..Default::default()
    };
    let reason = record.reason.as_bytes();
    let n = reason.len().min(entry.reason.len());
    entry.reason[..n].copy_from_slice(&reason[..n]);
    entry.reason_len = n as u8;
    entry
}

/// The ring buffer of `kernel`, polled by the event loop.
fn poll_events(kernel: &mut Kernel) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
    let events = kernel.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until the AsyncFd
    // that owns the ring buffer is dropped.
    unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")
}
