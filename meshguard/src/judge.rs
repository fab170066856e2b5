//! The judging stage, between the flow table and publishing: a flow's evidence, with its
//! socket's owner resolved from its cgroup (the container that created it, which the
//! application cannot choose), against the inventory and the policy, gives a decision; and
//! says whether the flow should wait for evidence still on its way, so that the first record of
//! a flow is the one that stands. The decision and the flow make the published record.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use meshguard_ebpf::flags;
use tracing::{debug, warn};

use crate::{
    enforce::{Action, Rule},
    event::ip_addr,
    fingerprint::{Encryption, PlaintextHint},
    flow::{
        record::{
            Change, Comm, Corrected, DestinationRuleRecord, Endpoint, FlowId, FlowRecord,
            OwnerRecord, PlaintextRecord, PolicyRecord, Process, Protocol, RedirectRecord, State,
            Timestamp,
        },
        table::{FlowTable, EVIDENCE_WAIT_NS},
        Flow, Update,
    },
    intent::contradiction,
    inventory::{
        cgroups::{CgroupIndex, CgroupOwner},
        destination::Workload,
        policy::TlsMode,
        Identity, Inventory, MeshMode,
    },
    verdict::{decide, Decision, Direction, Owner, Policy},
};

/// Evidence a flow's verdict may still change with, and which is on its way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Awaiting {
    /// The rest of a ClientHello, or the record after it.
    Handshake,
    /// The container of the socket's cgroup (a container the cgroup tree or the inventory does
    /// not show yet).
    Owner,
    /// The process name, where the container is unknown and the uid is the proxy's.
    Process,
    /// The address a proxy's accepted connection was dialled to (what its capture hides, and
    /// what declared intent is looked up by), which its first reply shows.
    Dialled,
}

/// The most often the cgroup tree is walked again for a cgroup it did not show.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

pub struct Judge {
    root: PathBuf,
    cgroups: CgroupIndex,
    scanned: Option<Instant>,
    /// The inventory snapshot the cgroup tree was last walked for: new pods mean new
    /// containers.
    scanned_for: Option<SystemTime>,
    /// A walk failed (an unreadable cgroup root): said once, and no owner is known.
    failed: bool,
}

impl Judge {
    /// Owners come from the cgroup v2 tree at `root` (the host's, for an agent in a pod).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            cgroups: CgroupIndex::default(),
            scanned: None,
            scanned_for: None,
            failed: false,
        }
    }

    /// Container cgroups known: 0 means no owner can be resolved (status says so).
    pub fn containers_known(&self) -> usize {
        self.cgroups.containers()
    }

    fn rescan(&mut self) {
        self.scanned = Some(Instant::now());
        match CgroupIndex::scan(&self.root) {
            Ok(index) => {
                debug!(
                    cgroups = index.len(),
                    containers = index.containers(),
                    "cgroup tree walked"
                );
                self.cgroups = index;
                self.failed = false;
            }
            Err(e) => {
                if !self.failed {
                    warn!(root = %self.root.display(), %e, "cannot walk the cgroup tree: socket owners are unknown, so the proxy is recognised by uid and process name only");
                }
                self.failed = true;
            }
        }
    }

    /// Walks the cgroup tree again, at most once a second, when the inventory changed (new
    /// pods, new containers) or the last walk did not find a cgroup a socket belongs to.
    fn refresh(&mut self, cgroup: u64, inventory: &Inventory) {
        let stale_inventory = self.scanned_for != inventory.loaded_at;
        let unseen = !self.cgroups.seen(cgroup);
        let due = self.scanned.is_none_or(|t| t.elapsed() >= RESCAN_EVERY);
        if (stale_inventory || unseen) && due {
            self.scanned_for = inventory.loaded_at;
            self.rescan();
        }
    }

    /// The cgroup tree as last walked: again first when the inventory changed (new pods, new
    /// containers), at most once a second.
    pub fn cgroup_index(&mut self, inventory: &Inventory) -> &CgroupIndex {
        let due = self.scanned.is_none_or(|t| t.elapsed() >= RESCAN_EVERY);
        if self.scanned_for != inventory.loaded_at && due {
            self.scanned_for = inventory.loaded_at;
            self.rescan();
        }
        &self.cgroups
    }

    /// The owner of a socket's cgroup, as the inventory names it.
    pub fn owner<'a>(&mut self, cgroup: Option<u64>, inventory: &'a Inventory) -> Owner<'a> {
        let Some(cgroup) = cgroup else {
            return Owner::Unknown;
        };
        self.refresh(cgroup, inventory);
        let Some(entry) = self.cgroups.get(cgroup) else {
            // Not below any pod's cgroup: the node's own process, unless the walk found no
            // pods at all (then nothing is known).
            return if self.cgroups.containers() > 0 {
                Owner::Host
            } else {
                Owner::Unknown
            };
        };
        let pod = || {
            entry
                .pod_uid
                .as_deref()
                .and_then(|uid| inventory.pod_by_uid(uid))
        };
        match &entry.owner {
            CgroupOwner::Container(id) => match inventory.container(id) {
                Some((pod, container)) => Owner::Container { pod, container },
                // A container the pod's status does not list (its sandbox), or not yet.
                None => pod().map_or(Owner::Unknown, Owner::Pod),
            },
            CgroupOwner::Pod { .. } => pod().map_or(Owner::Unknown, Owner::Pod),
        }
    }

    /// The decision on a flow now, with what it rests on, and what it waits for, if anything:
    /// only open flows wait, and each for `EVIDENCE_WAIT_NS` after its first sample at most.
    pub fn judge<'a>(
        &mut self,
        flow: &Flow,
        inventory: &'a Inventory,
        policy: &Policy,
        now_ns: u64,
    ) -> Judged<'a> {
        let owner = self.owner(flow.cgroup(), inventory);
        let mut ev = flow.evidence(owner);
        let (local, remote) = (
            inventory.lookup(ev.local.ip()),
            inventory.lookup(ev.remote.ip()),
        );
        let declared = declared(flow, local, remote, inventory, policy);
        ev.plaintext_declared_by = declared
            .as_ref()
            .and_then(|d| d.destination_rule.as_ref())
            .filter(|r| r.tls == TlsMode::Disable)
            .map(DestinationRuleRecord::reference);
        let decision = decide(&ev, local, remote, policy);
        let expired = flow.sampled_ns != 0 && now_ns >= flow.sampled_ns + EVIDENCE_WAIT_NS;
        let head_only = flow.payload.as_ref().is_some_and(|p| p.head_only);
        let meshed = local.pod().filter(|p| p.is_proxy_pod());
        let awaiting = if flow.closed || expired || ev.encryption == Encryption::Unknown {
            None
        } else if ev.encryption == Encryption::Tls && !ev.hello_complete && !head_only {
            Some(Awaiting::Handshake)
        } else if ev.direction == Direction::Ingress
            && matches!(owner, Owner::Container { container, .. } if container.proxy)
            && flow.dialled().is_none()
            && flow.kernel.counters.packets_sent == 0
        {
            Some(Awaiting::Dialled)
        } else if let (Some(pod), Owner::Unknown) = (meshed, owner) {
            if flow.cgroup().is_some() && self.cgroups.containers() > 0 {
                Some(Awaiting::Owner)
            } else if ev.uid == Some(pod.proxy_uid) && ev.comm.is_none() {
                Some(Awaiting::Process)
            } else {
                None
            }
        } else {
            None
        };
        Judged {
            decision,
            owner,
            ends: (local, remote),
            awaiting,
            declared,
        }
    }

    /// The record an update makes, if any: an open flow's first record once its evidence is
    /// whole (or its wait is over; until then it is held back in the table), a closed flow's
    /// last record always. Judged against the inventory of now.
    pub fn record(
        &mut self,
        table: &mut FlowTable,
        update: Update,
        inventory: &Inventory,
        policy: &Policy,
        node: &Arc<str>,
        now_ns: u64,
    ) -> Option<FlowRecord> {
        match update {
            Update::Evidence(key) => {
                let flow = table.get(key)?;
                let acts = flow.kernel.flags & (flags::REFUSED | flags::WOULD_REFUSE) != 0;
                if flow.published.is_some() {
                    // Once published, a flow is reported again before its close only when
                    // enforcement acted on it since (at the record after a handshake).
                    if !acts || flow.acted {
                        return None;
                    }
                    let judged = self.judge(flow, inventory, policy, now_ns);
                    let record = record_of(flow, node, Change::Enforced, judged);
                    table.acted(key);
                    return Some(record);
                }
                let judged = self.judge(flow, inventory, policy, now_ns);
                if judged.awaiting.is_some() {
                    table.wait(key);
                    return None;
                }
                let published = (judged.decision.verdict, judged.decision.reason);
                let record = record_of(flow, node, Change::Classified, judged);
                table.published(key, published);
                if acts {
                    table.acted(key);
                }
                Some(record)
            }
            Update::Closed(flow) => {
                let mut judged = self.judge(&flow, inventory, policy, now_ns);
                keep_restored(&flow, &mut judged.decision);
                Some(record_of(&flow, node, Change::Closed, judged))
            }
        }
    }
}

/// The record of a flow, as judged.
pub fn record_of(flow: &Flow, node: &Arc<str>, change: Change, judged: Judged) -> FlowRecord {
    let Judged {
        decision,
        owner,
        ends: (local, remote),
        declared,
        ..
    } = judged;
    let k = &flow.kernel;
    let (local_addr, remote_addr) = (flow.local(), flow.remote());
    let corrected_from = flow
        .published
        .filter(|&(v, r)| (v, r) != (decision.verdict, decision.reason))
        .map(|(verdict, reason)| Corrected {
            verdict,
            reason: reason.into(),
        });
    let mut record = FlowRecord {
        id: FlowId(flow.cookie),
        node: Arc::clone(node),
        event: change,
        first_seen: Timestamp(flow.first_seen),
        last_seen: Timestamp(flow.last_seen),
        state: if flow.closed {
            State::Closed
        } else {
            State::Open
        },
        direction: flow.direction(),
        protocol: if flow.udp() {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
        local: Endpoint {
            dialled: flow.dialled(),
            ..Endpoint::new(local_addr, local.into())
        },
        remote: Endpoint::new(remote_addr, remote.into()),
        process: Process {
            pid: (k.flags & flags::PROCESS != 0).then_some(k.pid),
            comm: flow.comm().map(Comm::new),
            uid: (k.flags & flags::UID != 0).then_some(k.uid),
        },
        owner: OwnerRecord {
            kind: owner.kind(),
            container: owner.container().map(str::to_string),
        },
        loopback: flow.loopback(),
        encryption: flow.encryption,
        tls: flow.tls().cloned(),
        plaintext: flow
            .payload
            .as_ref()
            .and_then(|p| p.plaintext.as_ref())
            .map(|hint| {
                let (method, path) = match hint {
                    PlaintextHint::HttpRequest { method, path } => {
                        (Some((*method).into()), path.clone())
                    }
                    _ => (None, None),
                };
                PlaintextRecord {
                    protocol: hint.protocol(),
                    method,
                    path,
                }
            }),
        redacted_sample: flow.payload.as_ref().and_then(|p| p.redacted.clone()),
        path: decision.path,
        redirect: (k.flags & flags::REDIRECTED != 0).then(|| RedirectRecord {
            ip: ip_addr(k.tuple.family, k.redirect.addr),
            port: k.redirect.port,
            ifindex: k.redirect.ifindex,
        }),
        policy: declared,
        bytes_sent: k.counters.bytes_sent,
        bytes_received: k.counters.bytes_received,
        packets_sent: k.counters.packets_sent,
        packets_received: k.counters.packets_received,
        verdict: decision.verdict,
        reason: decision.reason.into(),
        detail: decision.detail,
        corrected_from,
        midstream: k.flags & flags::MIDSTREAM != 0,
        recovered: flow.recovered,
        first_report: flow.published.is_none(),
        evicted: k.flags & flags::EVICTED != 0,
        netns_cookie: k.netns,
        contradiction: None,
        action: if k.flags & flags::REFUSED != 0 {
            Some(Action::Refused)
        } else if k.flags & flags::WOULD_REFUSE != 0 {
            Some(Action::WouldRefuse)
        } else {
            None
        },
        action_rule: (k.flags & (flags::REFUSED | flags::WOULD_REFUSE) != 0).then(|| {
            match flow.direction() {
                Direction::Egress => Rule::EgressBypass,
                Direction::Ingress => Rule::StrictInbound,
            }
        }),
    };
    record.contradiction = contradiction(&record);
    record
}

/// A flow whose verdict an earlier agent published, and of which this agent saw no payload
/// sample (only the first bytes the kernel's map keeps, no SNI or ALPN), keeps that verdict: a
/// restart never judges a flow on less evidence than it was judged on.
fn keep_restored(flow: &Flow, decision: &mut Decision) {
    let Some((verdict, reason)) = flow.published.filter(|_| flow.restored) else {
        return;
    };
    let seen_here = flow.payload.as_ref().is_some_and(|p| !p.head_only);
    if seen_here || (decision.verdict, decision.reason) == (verdict, reason) {
        return;
    }
    *decision = Decision {
        verdict,
        reason,
        path: decision.path,
        detail: format!(
            "{} {reason} as the agent before this one judged it on the whole handshake; this agent saw only the first bytes the kernel keeps, which would have said {} ({})",
            verdict.as_str(),
            decision.verdict.as_str(),
            decision.reason
        ),
    };
}

/// A flow judged: the decision, the owner and the two ends it rests on, and the evidence it
/// still waits for.
pub struct Judged<'a> {
    pub decision: Decision,
    pub owner: Owner<'a>,
    pub ends: (Identity<'a>, Identity<'a>),
    pub awaiting: Option<Awaiting>,
    /// What the mesh declares for the connection's server.
    pub declared: Option<PolicyRecord>,
}

/// What the mesh declares for a connection whose server is a pod with a sidecar, on the port
/// its client dialled: the mTLS its sidecar accepts (PeerAuthentication) and, where the client
/// has a sidecar too, the TLS a DestinationRule tells that sidecar to use. The server is the
/// socket's peer for a client's socket; for a server's, the address its client dialled when a
/// capture redirected the connection (a sidecar's outbound capture serves another pod), else
/// the socket itself.
fn declared<'a>(
    flow: &Flow,
    local: Identity<'a>,
    remote: Identity<'a>,
    inventory: &'a Inventory,
    policy: &Policy,
) -> Option<PolicyRecord> {
    let (client, server, port) = match (flow.direction(), flow.dialled()) {
        (Direction::Egress, _) => (local, remote, flow.remote().port()),
        (Direction::Ingress, Some(d)) if d.ip() != flow.local().ip() => {
            (remote, inventory.lookup(d.ip()), d.port())
        }
        (Direction::Ingress, Some(d)) => (remote, local, d.port()),
        (Direction::Ingress, None) => (remote, local, flow.local().port()),
    };
    let sidecar = |end: Identity<'a>| end.pod().filter(|p| p.mesh == MeshMode::Sidecar);
    let pod = sidecar(server)?;
    let root = &policy.mesh_root_namespace;
    let mtls = inventory
        .policy
        .peer_mtls(root, &pod.namespace, &pod.labels, port);
    let destination_rule = sidecar(client).and_then(|client| {
        inventory
            .policy
            .client_tls(root, &Workload::of(client), &Workload::of(pod), port)
            .map(DestinationRuleRecord::from)
    });
    Some(PolicyRecord {
        object: mtls.governed_by,
        mode: mtls.mode,
        port,
        destination_rule,
    })
}

/// The records a sequence of raw kernel events makes, judged with no wait: for tests.
#[cfg(test)]
pub(crate) fn judge_events(
    events: &[Vec<u8>],
    inventory: &Inventory,
    policy: &Policy,
) -> Vec<FlowRecord> {
    let mut table = FlowTable::new(64, SystemTime::UNIX_EPOCH);
    let mut judge = Judge::new(PathBuf::from("/nonexistent"));
    let node: Arc<str> = "n".into();
    let mut records = Vec::new();
    for bytes in events {
        let (mut updates, mut forget) = (Vec::new(), Vec::new());
        table.apply(
            &crate::event::decode(bytes).expect("a valid event"),
            &mut updates,
            &mut forget,
        );
        for update in updates {
            records.extend(judge.record(
                &mut table,
                update,
                inventory,
                policy,
                &node,
                u64::MAX / 2,
            ));
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use meshguard_ebpf::{
        flags, EventKind, FlowState, FlowTuple, DIRECTION_EGRESS, DIRECTION_INGRESS,
    };

    use super::*;
    use crate::{
        event::{
            decode,
            tests::{flow_event, sample_at},
        },
        fingerprint::tests::client_hello,
        inventory::{parse_pods, ParsedPolicy},
        verdict::Verdict,
    };

    const POD: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podb3e9a8d2_51c4_4f0a_a7e6_9c2d4f1b8e30.slice";
    const PROXY_ID: &str = "0a5f711ae6c938ab34a06c4532ef0f827134e40478f4e06ba86fb7dd8cd47fa0";
    const APP_ID: &str = "87cfef2c0842f3a693b457b27902551b7d9c86a83752e12456d69994d133b633";

    /// The real Istio pod fixture (10.244.0.23), and its cgroups as the kubelet lays them out:
    /// the pod's slice 10, istio-proxy 11, the application 12.
    fn node() -> (Inventory, Judge) {
        let text = include_str!("../tests/fixtures/istio-pod.json");
        let inventory = Inventory::new("test", parse_pods(text).unwrap().pods);
        let proxy = format!("{POD}/cri-containerd-{PROXY_ID}.scope");
        let app = format!("{POD}/cri-containerd-{APP_ID}.scope");
        let mut judge = Judge::new(PathBuf::from("/nonexistent"));
        judge.cgroups =
            CgroupIndex::from_entries([(POD, 10), (proxy.as_str(), 11), (app.as_str(), 12)]);
        judge.scanned = Some(Instant::now());
        judge.scanned_for = inventory.loaded_at;
        (inventory, judge)
    }

    /// The fixture pod's sidecar accepting a connection its inbound capture redirected from
    /// 9080, under mesh policy listed beside it.
    #[test]
    fn a_record_names_the_policy_that_governs_its_server() {
        let (_, mut judge) = node();
        let pa = |name: &str, spec: serde_json::Value| {
            serde_json::json!({"kind": "PeerAuthentication",
                "metadata": {"name": name, "namespace": "bookinfo", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": spec})
        };
        let mut accepted = proxy_socket();
        accepted.tuple.direction = DIRECTION_INGRESS;
        accepted.tuple.local_port = 15006;
        accepted.tuple.remote_port = 40000;
        accepted.flags |= flags::DIALLED;
        accepted.redirect.addr = accepted.tuple.local_addr;
        accepted.redirect.port = 9080;
        let mut declared = |items: &[serde_json::Value], state: FlowState| {
            let mut parsed = ParsedPolicy::default();
            for (i, item) in items.iter().enumerate() {
                parsed.add(item, i);
            }
            let pods = parse_pods(include_str!("../tests/fixtures/istio-pod.json"))
                .unwrap()
                .pods;
            let inventory = Inventory::new("test", pods).with_policy(parsed.policy);
            let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
            let (mut out, mut forget) = (Vec::new(), Vec::new());
            table.apply(
                &decode(&flow_event(EventKind::Close, 1, state)).unwrap(),
                &mut out,
                &mut forget,
            );
            let record = judge
                .record(
                    &mut table,
                    out.pop().unwrap(),
                    &inventory,
                    &Policy::default(),
                    &"n".into(),
                    0,
                )
                .unwrap();
            record
                .policy
                .map(|p| (p.object.map(|o| o.name), p.mode.as_str(), p.port))
        };
        let ns_strict = pa("default", serde_json::json!({"mtls": {"mode": "STRICT"}}));
        let reviews_9080 = pa(
            "reviews",
            serde_json::json!({"selector": {"matchLabels": {"app": "reviews"}},
            "portLevelMtls": {"9080": {"mode": "PERMISSIVE"}}}),
        );
        // The objects listed beside the pod, and (governing object, mode, port).
        type Declared = Option<(Option<String>, &'static str, u16)>;
        let both = [ns_strict.clone(), reviews_9080];
        let cases: [(&[serde_json::Value], Declared); 3] = [
            (&[], Some((None, "PERMISSIVE", 9080))),
            (
                std::slice::from_ref(&ns_strict),
                Some((Some("default".into()), "STRICT", 9080)),
            ),
            (&both, Some((Some("reviews".into()), "PERMISSIVE", 9080))),
        ];
        for (items, want) in cases {
            assert_eq!(declared(items, accepted), want, "{items:?}");
        }
        // A client's socket to a peer the inventory does not know: nothing declared for it.
        assert_eq!(declared(&[], proxy_socket()), None);
    }

    #[test]
    fn a_socket_s_cgroup_names_its_container() {
        let (inventory, mut judge) = node();
        let name = |owner: Owner| (owner.kind().as_str(), owner.container().map(str::to_string));
        assert_eq!(
            name(judge.owner(Some(11), &inventory)),
            ("proxy", Some("istio-proxy".into()))
        );
        assert_eq!(
            name(judge.owner(Some(12), &inventory)),
            ("app", Some("reviews".into()))
        );
        assert_eq!(name(judge.owner(Some(10), &inventory)), ("sandbox", None));
        assert_eq!(
            name(judge.owner(Some(99), &inventory)),
            ("host", None),
            "outside every pod"
        );
        assert_eq!(name(judge.owner(None, &inventory)), ("unknown", None));
        let mut blind = Judge::new(PathBuf::from("/nonexistent"));
        assert_eq!(
            name(blind.owner(Some(11), &inventory)),
            ("unknown", None),
            "no cgroup tree, no owner"
        );
    }

    /// The proxy's socket in the fixture pod, to a peer outside the inventory.
    fn proxy_socket() -> FlowState {
        FlowState {
            tuple: FlowTuple {
                local_addr: [u32::from_ne_bytes([10, 244, 0, 23]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([10, 244, 1, 9]), 0, 0, 0],
                local_port: 40000,
                remote_port: 9080,
                family: 2,
                protocol: 6,
                direction: DIRECTION_EGRESS,
            },
            socket: 1,
            flags: flags::LIFECYCLE | flags::UID | flags::CGROUP,
            uid: 1337,
            cgroup: 11,
            ..FlowState::default()
        }
    }

    #[test]
    fn a_flow_s_first_record_waits_for_its_whole_client_hello() {
        let (inventory, mut judge) = node();
        let policy = Policy::default();
        let node_name: Arc<str> = "n".into();
        let mut hello = client_hello(
            Some("outbound_.9080_._.ratings.bookinfo.svc.cluster.local"),
            &["istio-peer-exchange", "istio"],
            &[0x0304],
        );
        hello.extend([20, 3, 3, 0, 1]);
        let cut = hello.len() - 40;
        let mut table = FlowTable::new(8, SystemTime::UNIX_EPOCH);
        let mut feed = |table: &mut FlowTable, offset: usize, bytes: &[u8], now: u64| {
            let (mut updates, mut forget) = (Vec::new(), Vec::new());
            table.apply(
                &decode(&sample_at(
                    1,
                    proxy_socket(),
                    DIRECTION_EGRESS,
                    offset as u32,
                    bytes,
                ))
                .unwrap(),
                &mut updates,
                &mut forget,
            );
            let waiting = table.take_waiting();
            waiting
                .into_iter()
                .map(Update::Evidence)
                .chain(updates)
                .filter_map(|u| judge.record(table, u, &inventory, &policy, &node_name, now))
                .collect::<Vec<_>>()
        };
        // Cut before its ALPN: no record yet, however it would read.
        assert!(feed(&mut table, 0, &hello[..cut], 10).is_empty());
        // The rest: one record, mtls, with the whole ALPN list.
        let records = feed(&mut table, cut, &hello[cut..], 20);
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(
            (r.event, r.verdict, &*r.reason),
            (Change::Classified, Verdict::Mtls, "istio-mtls")
        );
        assert_eq!(
            r.tls.as_ref().unwrap().alpn,
            ["istio-peer-exchange", "istio"]
        );
        assert_eq!(r.owner.kind, "proxy");

        // A ClientHello that never completes is reported once its wait is over, as cut: never
        // a bypass on a partial parse.
        let mut table = FlowTable::new(8, SystemTime::UNIX_EPOCH);
        assert!(feed(&mut table, 0, &hello[..cut], 10).is_empty());
        let (mut updates, mut forget) = (Vec::new(), Vec::new());
        table.apply(
            &decode(&flow_event(EventKind::Process, 1, proxy_socket())).unwrap(),
            &mut updates,
            &mut forget,
        );
        let later = table
            .take_waiting()
            .into_iter()
            .filter_map(|key| {
                judge.record(
                    &mut table,
                    Update::Evidence(key),
                    &inventory,
                    &policy,
                    &node_name,
                    9 + EVIDENCE_WAIT_NS,
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(later.len(), 1);
        assert!(!later[0].verdict.is_bypass(), "{:?}", later[0]);
    }

    /// Enforcement acting on a flow after its first record (a handshake, then plaintext) makes
    /// one more record, `enforced`, and only one.
    #[test]
    fn enforcement_after_the_first_record_is_reported_once() {
        let (inventory, mut judge) = node();
        let policy = Policy::default();
        let mut table = FlowTable::new(8, SystemTime::UNIX_EPOCH);
        let mut feed = |table: &mut FlowTable, state: FlowState, offset: u32, bytes: &[u8]| {
            let (mut updates, mut forget) = (Vec::new(), Vec::new());
            table.apply(
                &decode(&sample_at(1, state, DIRECTION_EGRESS, offset, bytes)).unwrap(),
                &mut updates,
                &mut forget,
            );
            updates
                .into_iter()
                .filter_map(|u| judge.record(table, u, &inventory, &policy, &"n".into(), 10))
                .map(|r| (r.event, r.action))
                .collect::<Vec<_>>()
        };
        let mut socket = proxy_socket();
        socket.cgroup = 12; // the application's container
        let request = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(
            feed(&mut table, socket, 0, request),
            [(Change::Classified, None)]
        );
        socket.flags |= flags::REFUSED;
        assert_eq!(
            feed(&mut table, socket, 20, request),
            [(Change::Enforced, Some(Action::Refused))]
        );
        assert_eq!(feed(&mut table, socket, 40, request), []);
    }

    /// A sidecar's accepted connection is first reported once its reply shows the address its
    /// client dialled: judged before, it would be looked up by the capture port (15006), where
    /// no declared intent is.
    #[test]
    fn a_sidecar_s_accepted_flow_waits_for_the_address_its_client_dialled() {
        let (inventory, mut judge) = node();
        let policy = Policy::default();
        let mut accepted = proxy_socket();
        accepted.tuple.direction = DIRECTION_INGRESS;
        accepted.tuple.local_port = 15006;
        accepted.tuple.remote_port = 40000;
        let mut table = FlowTable::new(8, SystemTime::UNIX_EPOCH);
        let mut feed = |table: &mut FlowTable, state: FlowState, direction| {
            let (mut updates, mut forget) = (Vec::new(), Vec::new());
            table.apply(
                &decode(&sample_at(
                    1,
                    state,
                    direction,
                    0,
                    b"GET / HTTP/1.1\r\n\r\n",
                ))
                .unwrap(),
                &mut updates,
                &mut forget,
            );
            table
                .take_waiting()
                .into_iter()
                .map(Update::Evidence)
                .chain(updates)
                .filter_map(|u| judge.record(table, u, &inventory, &policy, &"n".into(), 10))
                .collect::<Vec<_>>()
        };
        assert!(feed(&mut table, accepted, DIRECTION_INGRESS).is_empty());
        // Its reply leaves, after NAT, from the address the client dialled.
        accepted.flags |= flags::DIALLED;
        accepted.redirect.addr = accepted.tuple.local_addr;
        accepted.redirect.port = 9080;
        accepted.counters.packets_sent = 1;
        let records = feed(&mut table, accepted, DIRECTION_EGRESS);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].policy.as_ref().map(|p| p.port), Some(9080));
    }
}

/// A flow from kernel events to its records: the flow table's updates, judged.
#[cfg(test)]
mod pipeline {
    use meshguard_ebpf::{flags, EventKind, FlowState, DIRECTION_EGRESS, DIRECTION_INGRESS};

    use super::*;
    use crate::{
        event::tests::{flow_event, sample_event},
        fingerprint::tests::{client_hello, server_hello},
        flow::table::tests::{apply, entry, state, NEXT_RECORD},
        verdict::Verdict,
    };

    fn none() -> (Inventory, Policy) {
        (Inventory::empty("none"), Policy::default())
    }

    #[test]
    fn lifecycle_gives_evidence_then_a_close() {
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        let s = state(DIRECTION_EGRESS, 0, 0);
        let mut ch = client_hello(Some("svc.test"), &["h2"], &[0x0304]);
        ch.extend(NEXT_RECORD);
        let steps: [(Vec<u8>, &str); 5] = [
            (flow_event(EventKind::Open, 1, s), ""),
            (
                sample_event(1, state(DIRECTION_EGRESS, 300, 0), DIRECTION_EGRESS, &ch),
                "E",
            ),
            (
                flow_event(
                    EventKind::Process,
                    1,
                    state(DIRECTION_EGRESS, 300, flags::PROCESS),
                ),
                "",
            ),
            (
                sample_event(1, s, DIRECTION_INGRESS, &server_hello(Some(0x0304))),
                "",
            ),
            (
                flow_event(EventKind::Close, 1, state(DIRECTION_EGRESS, 900, 0)),
                "C",
            ),
        ];
        for (i, (bytes, want)) in steps.iter().enumerate() {
            if i == 4 {
                assert!(
                    table.get(1).unwrap().hello_complete(),
                    "the ClientHello and the record after it"
                );
            }
            assert_eq!(apply(&mut table, bytes), *want, "step {i}");
        }
        assert_eq!(table.stats().tracked, 0, "closed flows leave the table");
        let (inv, policy) = none();
        let records = judge_events(&steps.map(|(b, _)| b), &inv, &policy);
        let closed = records.last().unwrap();
        assert_eq!(closed.event, Change::Closed);
        assert_eq!(closed.encryption, Encryption::Tls);
        let tls = closed.tls.as_ref().unwrap();
        assert_eq!(tls.sni.as_deref(), Some("svc.test"));
        assert_eq!(tls.alpn, ["h2"]);
        assert_eq!(closed.bytes_sent, 900);
        assert_eq!(closed.state, "closed");
        assert!(
            closed.process.pid.is_some(),
            "the process learnt earlier is kept"
        );
    }

    #[test]
    fn classification_per_first_sample() {
        let mut hello = client_hello(None, &[], &[0x0303]);
        hello.extend(NEXT_RECORD);
        let mut fake = client_hello(None, &["istio"], &[0x0304]);
        fake.extend(b"GET /secret HTTP/1.1\r\n");
        let cases: [(&[u8], Encryption, Option<&str>); 5] = [
            (
                b"GET / HTTP/1.1\r\n\r\n",
                Encryption::Plaintext,
                Some("http/1"),
            ),
            (&hello, Encryption::Tls, None),
            (b"\x00\x01binary", Encryption::Plaintext, Some("unknown")),
            (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", Encryption::Ssh, None),
            (&fake, Encryption::Plaintext, None),
        ];
        let (inv, policy) = none();
        for (bytes, encryption, protocol) in cases {
            let records = judge_events(
                &[sample_event(
                    3,
                    state(DIRECTION_EGRESS, 0, 0),
                    DIRECTION_EGRESS,
                    bytes,
                )],
                &inv,
                &policy,
            );
            let record = &records[0];
            assert_eq!(record.event, Change::Classified);
            assert_eq!(record.encryption, encryption, "{bytes:?}");
            assert_eq!(
                record.plaintext.as_ref().map(|p| p.protocol.as_str()),
                protocol,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_flow_closed_without_payload_is_unknown() {
        let (inv, policy) = none();
        let records = judge_events(
            &[flow_event(
                EventKind::Close,
                9,
                state(DIRECTION_INGRESS, 0, 0),
            )],
            &inv,
            &policy,
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event, Change::Closed);
        assert_eq!(records[0].encryption, Encryption::Unknown);
    }

    #[test]
    fn reconciliation_reports_what_the_ring_buffer_lost() {
        const NOW: u64 = 100 * 1_000_000_000;
        let get = b"GET /orders?id=7 HTTP/1.1\r\nHost";
        let tls = &[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        // (what, entry, the agent saw its events already, update, forgotten)
        let cases: [(&str, FlowState, bool, &str, bool); 7] = [
            (
                "closed, all events lost",
                entry(10, 20, get),
                false,
                "C",
                true,
            ),
            (
                "closed, only its close lost",
                entry(10, 20, get),
                true,
                "C",
                true,
            ),
            (
                "open, all events lost",
                entry(10, 0, tls),
                false,
                "E",
                false,
            ),
            ("open, no payload yet", entry(10, 0, b""), false, "", false),
            (
                "open and already followed",
                entry(10, 0, get),
                true,
                "",
                false,
            ),
            (
                "opened too recently to judge",
                entry(99, 0, get),
                false,
                "",
                false,
            ),
            (
                "closed too recently to judge",
                entry(10, 99, get),
                false,
                "",
                false,
            ),
        ];
        let (inv, policy) = none();
        for (what, kernel, seen, want, forgotten) in cases {
            let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
            if seen {
                apply(&mut table, &sample_event(7, kernel, DIRECTION_EGRESS, get));
            }
            let found = table.reconcile([(7, kernel)], NOW);
            let updates: String = found
                .updates
                .iter()
                .map(|u| match u {
                    Update::Evidence(_) => 'E',
                    Update::Closed(_) => 'C',
                })
                .collect();
            assert_eq!(updates, want, "{what}");
            assert_eq!(found.forget == [7], forgotten, "{what}");
            let deferred = usize::from(what == "closed too recently to judge");
            assert_eq!(found.deferred, deferred, "{what}");
            let flow = match found.updates.first() {
                Some(Update::Closed(flow)) => flow.as_ref().clone(),
                Some(Update::Evidence(key)) => table.get(*key).unwrap().clone(),
                None => continue,
            };
            assert!(flow.recovered, "{what}");
            let ev = flow.evidence(Owner::Unknown);
            assert_eq!(
                ev.hello_complete, seen,
                "{what}: whole from a sample, never from a head"
            );
            let judged =
                Judge::new("/nonexistent".into()).judge(&flow, &inv, &policy, u64::MAX / 2);
            let record = record_of(&flow, &"n".into(), Change::Closed, judged);
            assert!(record.recovered, "{what}");
            let encryption = if kernel.head[0][0] == 22 {
                Encryption::Tls
            } else {
                Encryption::Plaintext
            };
            assert_eq!(
                record.encryption, encryption,
                "{what}: from the head the map kept"
            );
            assert_eq!(
                record.first_report,
                !seen || flow.published.is_none(),
                "{what}"
            );
        }
    }

    #[test]
    fn a_restored_flow_is_not_reported_again_and_keeps_its_verdict() {
        const NOW: u64 = 100 * 1_000_000_000;
        let mut table = FlowTable::new(16, SystemTime::UNIX_EPOCH);
        // Open, its head a ClientHello's first bytes: alone, not enough for mesh mTLS.
        let tls = [22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        let open = entry(1, 0, &tls);
        table.restore(7, &open, Verdict::Mtls, "istio-mtls");
        let found = table.reconcile([(7, open)], NOW);
        assert!(
            found.updates.is_empty(),
            "already reported: {:?}",
            found.updates
        );
        let flow = table.get(7).unwrap();
        assert_eq!(flow.published, Some((Verdict::Mtls, "istio-mtls")));
        assert!(flow.restored);
        // It closes while no agent sees its events: the close keeps the whole-evidence verdict.
        let closed = entry(1, 2, &tls);
        let found = table.reconcile([(7, closed)], NOW);
        let [Update::Closed(flow)] = &found.updates[..] else {
            panic!("{:?}", found.updates)
        };
        let (inv, policy) = none();
        let mut judge = Judge::new(PathBuf::from("/nonexistent"));
        let record = judge
            .record(
                &mut table,
                Update::Closed(flow.clone()),
                &inv,
                &policy,
                &"n".into(),
                NOW,
            )
            .unwrap();
        assert_eq!(
            (record.verdict, &*record.reason),
            (Verdict::Mtls, "istio-mtls")
        );
        assert!(record.corrected_from.is_none());
        assert!(!record.first_report, "metrics counted it before");
    }

    #[test]
    fn a_close_after_restart_is_classified_from_the_map_head() {
        // The sample went to an agent since restarted; the close carries the head.
        let (inv, policy) = none();
        let kernel = entry(1, 0, b"POST /pay HTTP/1.1\r\n");
        let records = judge_events(&[flow_event(EventKind::Close, 3, kernel)], &inv, &policy);
        let record = &records[0];
        assert_eq!(record.encryption, Encryption::Plaintext);
        assert_eq!(
            record.plaintext.as_ref().unwrap().method.as_deref(),
            Some("POST")
        );
        assert!(record.first_report);
    }

    #[test]
    fn an_evicted_flow_the_agent_never_saw_is_counted() {
        let mut table = FlowTable::new(4, SystemTime::UNIX_EPOCH);
        let evicted = state(DIRECTION_EGRESS, 0, flags::EVICTED);
        apply(
            &mut table,
            &flow_event(EventKind::Open, 1, state(DIRECTION_EGRESS, 0, 0)),
        );
        apply(&mut table, &flow_event(EventKind::Close, 1, evicted));
        assert_eq!(table.stats().lost_unseen, 0, "seen before its eviction");
        apply(&mut table, &flow_event(EventKind::Close, 2, evicted));
        assert_eq!(table.stats().lost_unseen, 1);
        let (inv, policy) = none();
        let records = judge_events(&[flow_event(EventKind::Close, 2, evicted)], &inv, &policy);
        assert!(records[0].evicted);
        assert_eq!(records[0].state, "closed");
    }
}
