//! What the agent's loop publishes for its HTTP endpoints to read: metrics, the flow store,
//! the live stream of new records, and status.

use std::sync::{atomic::AtomicBool, Arc, Mutex};

use tokio::sync::broadcast;

use crate::{
    api::types::Status, flow::record::FlowRecord, inventory, metrics::Metrics, store::FlowStore,
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

    /// Notes a repair of the kernel side in `meshguard status`, with its time.
    pub fn note_repair(&self, what: &str) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        status.kernel_repairs.push(format!("{now} {what}"));
        let excess = status.kernel_repairs.len().saturating_sub(REPAIRS_KEPT);
        status.kernel_repairs.drain(..excess);
    }

    /// Publishes a judged record: stored for queries, sent to followers, counted.
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

/// Repairs `Status::kernel_repairs` keeps.
pub const REPAIRS_KEPT: usize = 10;

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
