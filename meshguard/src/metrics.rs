//! The agent's Prometheus metrics: flows and bytes by verdict and workload pair, and the
//! agent's own health. Cardinality is bounded by design: labels carry namespaces and workloads,
//! never pod names, addresses, ports or anything read from payload; label sets beyond a cap
//! fold into one `_overflow` series; series of workloads gone from the inventory are dropped
//! after a grace period.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    flow::record::{Change, FlowRecord},
    intent::contradicted,
    inventory::Inventory,
};

const FLOW_LABELS: [&str; 7] = [
    "verdict",
    "reason",
    "direction",
    "src_namespace",
    "src_workload",
    "dst_namespace",
    "dst_workload",
];
const OVERFLOW: &str = "_overflow";

/// Label values of one flow series, in `FLOW_LABELS` order.
type Series = [String; 7];

/// One flow series and its counters, kept so that counting a record allocates nothing.
struct Tracked {
    series: Series,
    /// When a record last counted here.
    seen: Instant,
    flows: IntCounter,
    bytes: IntCounter,
}

/// The series in use, by a hash of their labels (a bucket holds the rare collisions).
#[derive(Default)]
struct Book {
    buckets: HashMap<u64, Vec<Tracked>>,
    len: usize,
}

fn hash(labels: &[&str; 7]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    labels.hash(&mut h);
    h.finish()
}

/// A record's label values, borrowed: source and destination by the flow's direction.
fn labels_of(record: &FlowRecord) -> [&str; 7] {
    let (src, dst) = record.source_and_destination();
    let (src, dst) = (src.workload_labels(), dst.workload_labels());
    [
        record.verdict.as_str(),
        &record.reason,
        record.direction.as_str(),
        src.0,
        src.1,
        dst.0,
        dst.1,
    ]
}

pub struct Metrics {
    registry: Registry,
    flows: IntCounterVec,
    bytes: IntCounterVec,
    pub events_lost: IntCounterVec,
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    pub flows_tracked: IntGauge,
    pub flows_recovered: IntCounter,
    /// Records whose verdict differs from their flow's first record, by both verdicts.
    pub verdict_corrections: IntCounterVec,
    /// Flow records the agent's stores evicted to make room, by store.
    store_evicted: IntCounterVec,
    pub programs_attached: IntGauge,
    pub degraded: IntGauge,
    pub inventory_age: Gauge,
    /// Reconciliation passes over the kernel's flow map, by why they ran.
    pub reconcile_passes: IntCounterVec,
    /// What reconciliation walks met that a plain walk would have miscounted, by kind.
    pub reconcile_anomalies: IntCounterVec,
    /// Repairs of the kernel side the agent made, by what (pins recreated, programs attached
    /// again).
    pub kernel_repairs: IntCounterVec,
    /// Connections the endpoints closed at once, by listener and why.
    pub connections_refused: IntCounterVec,
    /// Flows that contradict what the mesh declares for their server. Bounded: the server's
    /// namespace and workload as the inventory names them, its declared mode, the reason.
    policy_violations: IntCounterVec,
    /// Flows enforcement refused (or, in audit, would have): bounded like the violations.
    enforcement_actions: IntCounterVec,
    series: Mutex<Book>,
    max_series: usize,
}

impl Metrics {
    /// Counts `n` more lost to `source`.
    pub fn count_loss(&self, source: crate::loss::LossSource, n: u64) {
        self.events_lost
            .with_label_values(&[source.as_str()])
            .inc_by(n);
    }

    pub fn new(max_series: usize) -> Self {
        let registry = Registry::new();
        let flows = IntCounterVec::new(
            Opts::new(
                "meshguard_flows_total",
                "Flows judged, by verdict and workload pair.",
            ),
            &FLOW_LABELS,
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "meshguard_flow_bytes_total",
                "Payload bytes of closed flows, both ways, by verdict and workload pair.",
            ),
            &FLOW_LABELS,
        )
        .expect("valid metric");
        let events_lost = IntCounterVec::new(
            Opts::new(
                "meshguard_events_lost_total",
                "Flow events or flows lost, by where.",
            ),
            &["source"],
        )
        .expect("valid metric");
        let map_entries = IntGaugeVec::new(
            Opts::new("meshguard_map_entries", "Entries in an eBPF map."),
            &["map"],
        )
        .expect("valid metric");
        let map_capacity = IntGaugeVec::new(
            Opts::new("meshguard_map_capacity", "Capacity of an eBPF map."),
            &["map"],
        )
        .expect("valid metric");
        let flows_tracked = IntGauge::new("meshguard_flows_tracked", "Flows in the agent's table.")
            .expect("valid metric");
        let flows_recovered = IntCounter::new(
            "meshguard_flows_recovered_total",
            "Flow records published from the kernel's flow map because their events were lost.",
        )
        .expect("valid metric");
        let verdict_corrections = IntCounterVec::new(
            Opts::new(
                "meshguard_verdict_corrections_total",
                "Flows whose closing record changed the verdict of their first record (evidence that came later), by both verdicts.",
            ),
            &["from", "to"],
        )
        .expect("valid metric");
        let store_evicted = IntCounterVec::new(
            Opts::new(
                "meshguard_store_evicted_total",
                "Flow records evicted from the agent's query store to make room, by store (recent, flagged, bypass).",
            ),
            &["store"],
        )
        .expect("valid metric");
        for (store, _) in crate::api::types::Evicted::default().by_store() {
            store_evicted.with_label_values(&[store]);
        }
        let programs_attached =
            IntGauge::new("meshguard_programs_attached", "Kernel programs attached.")
                .expect("valid metric");
        let degraded = IntGauge::new(
            "meshguard_degraded",
            "1 when the agent is degraded: an optional kernel program could not attach, an endpoint is not served, or its programs were found detached (see meshguard status).",
        )
        .expect("valid metric");
        let inventory_age = Gauge::new(
            "meshguard_inventory_age_seconds",
            "Seconds since the pod inventory last changed.",
        )
        .expect("valid metric");
        let reconcile_passes = IntCounterVec::new(
            Opts::new(
                "meshguard_reconcile_passes_total",
                "Walks of the kernel's flow map, by why (start, overflow, deferred, upgrade, reattach).",
            ),
            &["trigger"],
        )
        .expect("valid metric");
        let reconcile_anomalies = IntCounterVec::new(
            Opts::new(
                "meshguard_reconcile_anomalies_total",
                "What flow-map walks met: keys returned again (repeated), entries gone before their lookup (vanished), kernel errors (error), walks stopped at their bound (cut).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for kind in ["repeated", "vanished", "error", "cut"] {
            reconcile_anomalies.with_label_values(&[kind]);
        }
        let kernel_repairs = IntCounterVec::new(
            Opts::new(
                "meshguard_kernel_repairs_total",
                "Repairs of the kernel side: pins removed behind the agent's back and pinned again (repinned), programs found detached and attached again (reattached).",
            ),
            &["action"],
        )
        .expect("valid metric");
        for action in ["repinned", "reattached"] {
            kernel_repairs.with_label_values(&[action]);
        }
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "meshguard_connections_refused_total",
                "Connections to the agent's endpoints closed at once, by listener (metrics, api, api-socket) and why (limit, peer_limit, accept_error).",
            ),
            &["listener", "reason"],
        )
        .expect("valid metric");
        let policy_violations = IntCounterVec::new(
            Opts::new(
                "meshguard_policy_violations_total",
                "Flows that contradict what the mesh declares for their server (PeerAuthentication), counted at the server's socket: by its namespace and workload (dst_*, as in meshguard_flows_total), declared mode, and reason (strict-plaintext, mtls-disabled).",
            ),
            &["dst_namespace", "dst_workload", "policy_mode", "reason"],
        )
        .expect("valid metric");
        let enforcement_actions = IntCounterVec::new(
            Opts::new(
                "meshguard_enforcement_actions_total",
                "Flows enforcement refused (mode enforce) or would have refused (mode audit): plaintext past the sidecar, by the enforced workload (the client's for egress-bypass, the server's for strict-inbound; enforced_* so that a ServiceMonitor's namespace label stays the agent's) and the verdict's reason.",
            ),
            &["mode", "enforced_namespace", "enforced_workload", "reason"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("meshguard_build_info", "meshguard's version."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for source in crate::loss::LossSource::ALL {
            events_lost.with_label_values(&[source.as_str()]);
        }
        for c in [
            Box::new(flows.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
            Box::new(events_lost.clone()),
            Box::new(map_entries.clone()),
            Box::new(map_capacity.clone()),
            Box::new(flows_tracked.clone()),
            Box::new(flows_recovered.clone()),
            Box::new(verdict_corrections.clone()),
            Box::new(store_evicted.clone()),
            Box::new(programs_attached.clone()),
            Box::new(degraded.clone()),
            Box::new(inventory_age.clone()),
            Box::new(reconcile_passes.clone()),
            Box::new(reconcile_anomalies.clone()),
            Box::new(kernel_repairs.clone()),
            Box::new(connections_refused.clone()),
            Box::new(policy_violations.clone()),
            Box::new(enforcement_actions.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            flows,
            bytes,
            events_lost,
            map_entries,
            map_capacity,
            flows_tracked,
            flows_recovered,
            verdict_corrections,
            store_evicted,
            programs_attached,
            degraded,
            inventory_age,
            reconcile_passes,
            reconcile_anomalies,
            kernel_repairs,
            connections_refused,
            policy_violations,
            enforcement_actions,
            series: Mutex::new(Book::default()),
            max_series: max_series.max(1),
        }
    }

    /// Connections refused by every endpoint since start.
    pub fn connections_refused_total(&self) -> u64 {
        use prometheus::core::Collector as _;
        self.connections_refused
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Counts a flow once, when its first verdict is known (or at close for one that never
    /// carried payload), and its bytes when it closes.
    pub fn observe(&self, record: &FlowRecord) {
        let count_flow = record.first_report;
        let closed = record.event == Change::Closed;
        if let (true, Some(action)) = (record.reports_action(), record.action) {
            // The enforced end is this socket's own.
            let (namespace, workload) = record.local.workload_labels();
            self.enforcement_actions
                .with_label_values(&[action.mode().as_str(), namespace, workload, &record.reason])
                .inc();
        }
        if !count_flow && !closed {
            return;
        }
        if let (true, Some(reason), Some((_, mode))) =
            (count_flow, record.contradiction, contradicted(record))
        {
            // Counted at the server's socket: its own end is the server.
            let (namespace, workload) = record.local.workload_labels();
            self.policy_violations
                .with_label_values(&[namespace, workload, mode, reason.as_str()])
                .inc();
        }
        let mut book = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let tracked = self.tracked(&mut book, labels_of(record));
        tracked.seen = Instant::now();
        if count_flow {
            tracked.flows.inc();
        }
        if closed {
            tracked
                .bytes
                .inc_by(record.bytes_sent + record.bytes_received);
        }
    }

    /// Counts what one store insert evicted.
    pub fn store_evicted(&self, evicted: &crate::api::types::Evicted) {
        for (store, n) in evicted.by_store() {
            if n > 0 {
                self.store_evicted.with_label_values(&[store]).inc_by(n);
            }
        }
    }

    /// The series for these labels: found without allocating (the per-record path), made on
    /// first sight, or the overflow series once the cap is reached.
    fn tracked<'b>(&self, book: &'b mut Book, labels: [&str; 7]) -> &'b mut Tracked {
        let mut labels = labels;
        let mut key = hash(&labels);
        let known = |book: &Book, key: u64, labels: &[&str; 7]| {
            book.buckets.get(&key).and_then(|b| {
                b.iter()
                    .position(|t| t.series.iter().zip(labels).all(|(a, b)| a == b))
            })
        };
        let mut found = known(book, key, &labels);
        if found.is_none() && book.len >= self.max_series {
            for v in &mut labels[3..] {
                *v = OVERFLOW;
            }
            key = hash(&labels);
            found = known(book, key, &labels);
        }
        let bucket = book.buckets.entry(key).or_default();
        let i = match found {
            Some(i) => i,
            None => {
                bucket.push(Tracked {
                    series: labels.map(str::to_string),
                    seen: Instant::now(),
                    flows: self.flows.with_label_values(&labels),
                    bytes: self.bytes.with_label_values(&labels),
                });
                book.len += 1;
                bucket.len() - 1
            }
        };
        &mut bucket[i]
    }

    /// Drops the series of workloads no longer in the inventory and not seen for `grace`.
    pub fn forget_gone_workloads(&self, inventory: &Inventory, grace: Duration) -> usize {
        let mut book = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let gone =
            |ns: &str, w: &str| !ns.is_empty() && ns != OVERFLOW && !inventory.has_workload(ns, w);
        let mut dropped = 0;
        for bucket in book.buckets.values_mut() {
            bucket.retain(|t| {
                let s = &t.series;
                let stale = t.seen.elapsed() > grace && (gone(&s[3], &s[4]) || gone(&s[5], &s[6]));
                if stale {
                    let labels: Vec<&str> = s.iter().map(String::as_str).collect();
                    let _ = self.flows.remove_label_values(&labels);
                    let _ = self.bytes.remove_label_values(&labels);
                    dropped += 1;
                }
                !stale
            });
        }
        book.buckets.retain(|_, b| !b.is_empty());
        book.len -= dropped;
        dropped
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        event::tests::{flow_event, sample_event},
        inventory::Inventory,
        judge::judge_events,
        verdict::Policy,
    };
    use meshguard_ebpf::{flags, EventKind, FlowState, FlowTuple, DIRECTION_EGRESS};

    fn inventory() -> Inventory {
        let pods = serde_json::json!({"kind": "List", "items": [
            {"kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop", "labels": {"security.istio.io/tlsMode": "istio"},
             "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5000"},
             "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8f7c9b4", "controller": true}]},
             "status": {"podIP": "10.0.0.1"}},
            {"kind": "Pod", "metadata": {"name": "catalog-1", "namespace": "legacy",
             "ownerReferences": [{"kind": "ReplicaSet", "name": "catalog-7f9c6d5b8", "controller": true}]},
             "status": {"podIP": "10.0.0.2"}}]});
        let parsed = crate::inventory::parse_pods(&pods.to_string()).unwrap();
        Inventory::new("test", parsed.pods)
    }

    /// A flow's records as judged: port 5000 is a plaintext bypass (an excluded port).
    pub(crate) fn records(cookie: u64, remote_port: u16) -> Vec<FlowRecord> {
        let state = FlowState {
            tuple: FlowTuple {
                local_addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
                local_port: 40000,
                remote_port,
                family: 2,
                protocol: 6,
                direction: DIRECTION_EGRESS,
            },
            flags: flags::UID,
            uid: 1000,
            counters: meshguard_ebpf::FlowCounters {
                bytes_sent: 100,
                bytes_received: 50,
                ..Default::default()
            },
            ..FlowState::default()
        };
        let (inv, policy) = (inventory(), Policy::default());
        judge_events(
            &[
                sample_event(cookie, state, DIRECTION_EGRESS, b"GET / HTTP/1.1\r\n"),
                flow_event(EventKind::Close, cookie, state),
            ],
            &inv,
            &policy,
        )
    }

    #[test]
    fn a_bypass_counts_once_with_its_workloads() {
        let m = Metrics::new(100);
        for r in records(1, 5000) {
            m.observe(&r);
        }
        let text = m.encode();
        let series = r#"{direction="egress",dst_namespace="legacy",dst_workload="catalog",reason="excluded-port",src_namespace="shop",src_workload="web",verdict="bypass-plaintext"}"#;
        assert!(
            text.contains(&format!("meshguard_flows_total{series} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("meshguard_flow_bytes_total{series} 150")),
            "{text}"
        );
        assert!(!text.contains("10.0.0."), "no addresses in labels");
        assert!(text.contains("meshguard_build_info{version="));
        assert!(
            text.contains(r#"meshguard_events_lost_total{source="ringbuf_full"} 0"#),
            "losses exported from the start"
        );
    }

    #[test]
    fn a_contradiction_counts_once_with_the_server_s_workload() {
        let m = Metrics::new(100);
        let records = records(1, 5000);
        assert_eq!(records.len(), 2);
        for mut r in records {
            // As if this record were the server's socket, with STRICT declared.
            r.contradiction = Some(crate::intent::Contradiction::StrictPlaintext);
            r.policy = Some(crate::flow::record::PolicyRecord {
                object: None,
                mode: crate::inventory::policy::MtlsMode::Strict,
                port: 5000,
                destination_rule: None,
            });
            m.observe(&r);
        }
        let text = m.encode();
        // Its first record and its close: one flow.
        assert!(
            text.contains(r#"meshguard_policy_violations_total{dst_namespace="shop",dst_workload="web",policy_mode="STRICT",reason="strict-plaintext"} 1"#),
            "{text}"
        );
        assert!(!Metrics::new(100)
            .encode()
            .contains("meshguard_policy_violations_total{"));
    }

    #[test]
    fn label_sets_beyond_the_cap_fold_into_overflow() {
        let m = Metrics::new(1);
        for r in records(1, 5000).into_iter().chain(records(2, 80)) {
            m.observe(&r);
        }
        let text = m.encode();
        assert!(text.contains(r#"src_workload="_overflow""#), "{text}");
        assert_eq!(text.matches("meshguard_flows_total{").count(), 2);
    }

    #[test]
    fn series_of_gone_workloads_are_dropped_after_the_grace_period() {
        let m = Metrics::new(100);
        for r in records(1, 5000) {
            m.observe(&r);
        }
        assert_eq!(
            m.forget_gone_workloads(&inventory(), Duration::ZERO),
            0,
            "both workloads still exist"
        );
        assert_eq!(
            m.forget_gone_workloads(&Inventory::empty("none"), Duration::from_secs(3600)),
            0,
            "within the grace period"
        );
        assert_eq!(
            m.forget_gone_workloads(&Inventory::empty("none"), Duration::ZERO),
            1
        );
        assert!(!m.encode().contains("meshguard_flows_total{"));
    }
}
