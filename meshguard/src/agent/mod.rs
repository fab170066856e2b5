//! `meshguard agent`: checks the node, attaches the kernel programs, and turns ring-buffer events
//! into judged flow records (logged with `--log-flows`, counted in `/metrics`) until SIGINT or
//! SIGTERM, then detaches or leaves the kernel side pinned for the next agent.
//!
//! [`run`] wires the parts together: the [`pipeline`] owns the kernel side and every stage of
//! the event path, [`serving`] runs the endpoints on a runtime of their own, and the event loop
//! below only says when each runs.

#[cfg(feature = "kubernetes")]
mod events;
mod losses;
mod pipeline;
mod serving;

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    time::{interval, MissedTickBehavior},
};
use tracing::{info, warn};

use crate::{
    api::types::Status,
    config::{AgentConfig, OnExit},
    inventory::{self, source::Source, Inventory, Shared},
    kernel::prereq,
    metrics::Metrics,
    state::{kernel_release, AgentState},
    store::FlowStore,
    verdict::Policy,
};
use pipeline::Pipeline;

/// How often the agent reads the ring buffer when the kernel has not woken it: the longest a
/// flow waits before it is judged, and what `flows -f` adds to its latency.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The health tick: losses, reconciliation, the kernel side's health, gauges and status.
const TICK_EVERY: Duration = Duration::from_secs(1);

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let policy = load_policy(config.flows.policy.as_deref())?;
    // Say what the node lacks before touching anything.
    let node = prereq::check(config.node.cgroup_root.as_deref())?;
    let inventory = start_inventory(&config).await?;
    let store = &config.store;
    let state = Arc::new(AgentState::new(
        Metrics::new(config.serve.max_series),
        FlowStore::new(store.store_flows, store.store_flagged, store.store_bypass),
        Arc::clone(&inventory),
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node: config.node.node_name.clone(),
            kernel: kernel_release(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            enforcement_on_exit: match config.kernel.on_exit {
                OnExit::KeepEnforcing => "keep refusing (fail-closed)",
                OnExit::Keep | OnExit::Detach => "refuse nothing (fail-open)",
            }
            .to_string(),
            ..Status::default()
        },
    ));
    let serving = serving::start(&config.serve, &state).await?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut pipeline = Pipeline::start(
        &config,
        node,
        Arc::clone(&state),
        policy,
        serving.not_served.clone(),
    )?;
    // Enforcement's decisions as Events on their pods, where the API server is at hand.
    #[cfg(feature = "kubernetes")]
    if config.flows.inventory == Source::Kubernetes {
        match kube::Client::try_default().await {
            Ok(client) => {
                pipeline.publish_events(events::Events::start(client, &config.node.node_name))
            }
            Err(e) => warn!(error = %e, "no API server for enforcement events"),
        }
    }
    info!(node = %config.node.node_name, "watching flows");

    let mut tick = interval(TICK_EVERY);
    // The kernel wakes the agent only when a backlog builds up; otherwise it drains on this tick.
    let mut drain = interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            drained = pipeline.drain_when_readable() => drained?,
            _ = drain.tick() => pipeline.drain()?,
            _ = tick.tick() => pipeline = pipeline.tick()?,
            _ = sighup.recv() => reload(&config, &mut pipeline.policy, &inventory),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    serving.stop();
    let on_exit = config.kernel.on_exit;
    let tracked = pipeline.stop(on_exit);
    if config.kernel.pin_root().is_some() && on_exit != OnExit::Detach {
        info!(
            tracked,
            "stopped; the kernel programs stay attached (meshguard uninstall removes them)"
        );
    } else {
        info!(tracked, "detached");
    }
    Ok(())
}

/// The `--policy` file, or the defaults.
fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    let Some(path) = path else {
        return Ok(Policy::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy {}", path.display()))?;
    serde_json::from_str::<Policy>(&text).with_context(|| format!("policy {}", path.display()))
}

/// SIGHUP: reads the policy and the inventory file again. A file that is now broken changes
/// nothing: the agent keeps what it had, and says so.
fn reload(config: &AgentConfig, policy: &mut Policy, inventory: &Shared) {
    match load_policy(config.flows.policy.as_deref()) {
        Ok(new) => {
            if new != *policy {
                info!("SIGHUP: policy reloaded");
            }
            *policy = new;
        }
        Err(e) => warn!(error = %format!("{e:#}"), "SIGHUP: keeping the current policy"),
    }
    if let Source::File(path) = &config.flows.inventory {
        inventory::source::reload(path, inventory);
    }
    info!("SIGHUP: configuration reloaded");
}

/// Starts the `--inventory` source; the inventory is empty until it delivers.
async fn start_inventory(config: &AgentConfig) -> anyhow::Result<Shared> {
    let source = &config.flows.inventory;
    let empty = Inventory::empty(&source.to_string());
    let inventory: Shared = Arc::new(RwLock::new(Arc::new(empty)));
    match source {
        Source::File(path) => {
            inventory::source::reload(path, &inventory);
            tokio::spawn(inventory::source::watch_file(
                path.clone(),
                Arc::clone(&inventory),
            ));
        }
        #[cfg(feature = "kubernetes")]
        Source::Kubernetes => {
            inventory::kubernetes::start(&config.node.node_name, Arc::clone(&inventory)).await?
        }
        #[cfg(not(feature = "kubernetes"))]
        Source::Kubernetes => {
            anyhow::bail!("--inventory kubernetes: this build has no Kubernetes support")
        }
        Source::None => {}
    }
    info!(%source, "inventory");
    Ok(inventory)
}
