//! What the agent's loop publishes for its HTTP endpoints to read: metrics, the flow store,
//! the live stream of new records, and status.

use std::{
    collections::BTreeMap,
    sync::{atomic::AtomicBool, Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::{
    flow::FlowRecord,
    inventory,
    metrics::Metrics,
    store::{Evicted, FlowStore},
};

/// New records waiting for slow stream clients; beyond this a client skips ahead (and is told).
pub const STREAM_BACKLOG: usize = 4096;

pub struct AgentState {
    pub metrics: Metrics,
    /// The kernel programs are attached (`/readyz`).
    pub attached: AtomicBool,
    pub store: Mutex<FlowStore>,
    pub live: broadcast::Sender<Arc<FlowRecord>>,
    pub status: Mutex<Status>,
    pub inventory: inventory::Shared,
}

impl AgentState {
    pub fn new(
        metrics: Metrics,
        store: FlowStore,
        inventory: inventory::Shared,
        status: Status,
    ) -> Self {
        Self {
            metrics,
            attached: AtomicBool::new(false),
            store: Mutex::new(store),
            live: broadcast::channel(STREAM_BACKLOG).0,
            status: Mutex::new(status),
            inventory,
        }
    }

    /// Publishes a judged record: stored for queries, sent to followers, counted.
    /// Notes a repair of the kernel side in `meshguard status`, with its time.
    pub fn note_repair(&self, what: &str) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        status.kernel_repairs.push(format!("{now} {what}"));
        let excess = status.kernel_repairs.len().saturating_sub(REPAIRS_KEPT);
        status.kernel_repairs.drain(..excess);
    }

    pub fn publish(&self, record: FlowRecord) {
        self.metrics.observe(&record);
        let record = Arc::new(record);
        let evicted = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::clone(&record));
        self.metrics.store_evicted(&evicted);
        // No follower is fine; a lagging one skips ahead on its own.
        let _ = self.live.send(record);
    }
}

/// `GET /v1/status` and `meshguard status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub version: String,
    pub node: String,
    /// Kernel release.
    pub kernel: String,
    pub started_at: String,
    pub programs_attached: Vec<String>,
    /// What does not work and what it costs, in words.
    pub degraded: Vec<String>,
    pub inventory: InventoryStatus,
    /// Container cgroups found on the node: how sockets are traced to the container that owns
    /// them (0: by uid and process name only).
    pub container_cgroups: usize,
    pub flow_map: MapStatus,
    /// Losses since start, by where.
    pub events_lost: BTreeMap<String, u64>,
    pub flows_tracked: usize,
    /// Flows reported from the kernel's flow map because their events were lost.
    pub flows_recovered: u64,
    /// The kernel side was taken over from an earlier agent (pinned), not attached anew.
    pub adopted: bool,
    /// Records held by each store: the recent, the flagged (not bypasses), the bypasses.
    pub flows_stored: usize,
    pub flagged_stored: usize,
    pub bypass_stored: usize,
    /// Records each store evicted to make room since start: a growing count means its flag
    /// (--store-flows, --store-flagged, --store-bypass) is too small for the node's traffic.
    pub store_evicted: Evicted,
    /// Walks of the kernel's flow map since start, and what they met.
    pub reconcile: ReconcileStatus,
    /// Repairs of the kernel side, newest last (at most `REPAIRS_KEPT`): pins removed behind
    /// the agent's back, programs found detached, generations drained on an upgrade.
    pub kernel_repairs: Vec<String>,
    /// Connections the endpoints closed at once because a limit was reached, since start.
    pub connections_refused: u64,
}

/// Repairs `Status::kernel_repairs` keeps.
pub const REPAIRS_KEPT: usize = 10;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconcileStatus {
    pub passes: u64,
    /// Entries the last pass walked.
    pub last_scanned: usize,
    /// Keys walks returned twice (dropped), entries gone before their lookup, kernel errors,
    /// walks stopped at their bound: since start.
    pub repeated: u64,
    pub vanished: u64,
    pub errors: u64,
    pub cut: u64,
    /// Events and map entries of flows already published closed (dropped, not published again).
    pub duplicates_dropped: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct InventoryStatus {
    pub source: String,
    pub pods: usize,
    /// Seconds since it last changed; `None` before the source delivered anything.
    pub age_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MapStatus {
    pub entries: usize,
    pub capacity: u32,
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    #[test]
    fn evictions_are_counted_by_store_in_the_metrics() {
        let state = AgentState::new(
            Metrics::new(100),
            FlowStore::new(1, 1, 1),
            Arc::new(std::sync::RwLock::new(Arc::new(Inventory::empty("test")))),
            Status::default(),
        );
        for cookie in 1..=3 {
            for record in crate::metrics::tests::records(cookie, 5000) {
                assert_eq!(record.verdict, crate::verdict::Verdict::BypassPlaintext);
                state.publish(record);
            }
        }
        let text = state.metrics.encode();
        for (store, n) in [("recent", 2), ("flagged", 0), ("bypass", 2)] {
            let line = format!("meshguard_store_evicted_total{{store=\"{store}\"}} {n}\n");
            assert!(text.contains(&line), "{line}{text}");
        }
        let evicted = state.store.lock().unwrap().evicted();
        assert_eq!((evicted.recent, evicted.flagged, evicted.bypass), (2, 0, 2));
    }
}
