//! Enforcement, audit first: which containers' plaintext past their sidecar the kernel refuses
//! (or, in `audit`, marks as what it would have refused), and what plaintext the verdict policy
//! expects, which is never refused. Pure: the inventory, the cgroup tree and the policy in, a
//! [`Plan`] out, which `kernel` writes into the `ENFORCE` and `ALLOWED` maps.
//!
//! A pod's mode is its own `meshguard.io/enforce` (annotation or label), else its namespace's
//! label, else the verdict policy's `enforcement` (default `off`). Only an application
//! container of a pod with a sidecar is enforced, never the proxy's: the kernel knows a socket's
//! container by the cgroup that made it, which the application cannot choose. What the kernel
//! then refuses, at the flow's first payload packet (see `meshguard-ebpf`'s `Enforce`), is
//! exactly what the verdicts call `bypass-plaintext` at that socket: plaintext that did not go
//! through the sidecar (neither over the loopback device nor redirected into it), to anywhere
//! the policy does not expect plaintext; and, for a STRICT workload, plaintext its application
//! accepted past the sidecar, but for kubelet's probes and what the policy expects.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use meshguard_ebpf::{Enforce, DIRECTION_EGRESS, DIRECTION_INGRESS, MODE_AUDIT, MODE_ENFORCE};

use crate::{
    api::types::NamespaceEnforcement,
    inventory::{policy::MtlsMode, CgroupIndex, CgroupOwner, Inventory, MeshMode, PodInfo},
    verdict::{Destination, Policy},
    wire::wire_enum,
};

/// The annotation or label that sets a pod's or a namespace's mode.
pub const KEY: &str = "meshguard.io/enforce";

wire_enum! {
    /// What enforcement does for a pod.
    #[derive(Default)]
    pub enum Mode ("enforcement mode") {
        /// Nothing (detection only).
        #[default]
        Off = "off",
        /// Judges as if enforcing: what would be refused is recorded and counted, and passes.
        Audit = "audit",
        /// Refuses.
        Enforce = "enforce",
    }
}

wire_enum! {
    /// What enforcement did to a flow.
    pub enum Action ("enforcement action") {
        Refused = "refused",
        WouldRefuse = "would-refuse",
    }
}

wire_enum! {
    /// Which refusal a flow met.
    pub enum Rule ("enforcement rule") {
        /// A client socket's plaintext past its sidecar.
        EgressBypass = "egress-bypass",
        /// Plaintext a STRICT workload's application accepted past its sidecar.
        StrictInbound = "strict-inbound",
    }
}

wire_enum! {
    /// Where a pod's mode came from.
    pub enum ModeSource ("mode source") {
        Pod = "pod",
        Namespace = "namespace",
        Default = "default",
    }
}

/// A pod's mode, and what set it.
pub fn pod_mode(pod: &PodInfo, inventory: &Inventory, default: Mode) -> (Mode, ModeSource) {
    match pod.enforce {
        Some(mode) => (mode, ModeSource::Pod),
        None => namespace_mode(inventory, &pod.namespace, default),
    }
}

/// A namespace's mode, and what set it: its label, else the default.
fn namespace_mode(inventory: &Inventory, namespace: &str, default: Mode) -> (Mode, ModeSource) {
    match inventory.enforcement.get(namespace) {
        Some(mode) => (*mode, ModeSource::Namespace),
        None => (default, ModeSource::Default),
    }
}

impl Action {
    /// The mode that takes this action.
    pub fn mode(self) -> Mode {
        match self {
            Action::Refused => Mode::Enforce,
            Action::WouldRefuse => Mode::Audit,
        }
    }
}

/// Each namespace's mode, for its pods with a sidecar in the inventory (what `status` shows).
pub fn by_namespace(inventory: &Inventory, default: Mode) -> Vec<NamespaceEnforcement> {
    let mut out: BTreeMap<&str, NamespaceEnforcement> = BTreeMap::new();
    for pod in inventory
        .pods()
        .iter()
        .filter(|p| p.mesh == MeshMode::Sidecar)
    {
        let (mode, source) = namespace_mode(inventory, &pod.namespace, default);
        let ns = out
            .entry(&pod.namespace)
            .or_insert_with(|| NamespaceEnforcement {
                namespace: pod.namespace.clone(),
                mode: mode.to_string(),
                source: source.to_string(),
                ..NamespaceEnforcement::default()
            });
        ns.pods += 1;
        if let Some(own) = pod.enforce.filter(|own| *own != mode) {
            ns.overrides.push(format!("{}={own}", pod.name));
        }
    }
    out.into_values().collect()
}

/// Plaintext never refused: from (ingress) or to (egress) `net` on `port`, for the container
/// whose cgroup is `scope` (0: every enforced container).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allowed {
    pub scope: u64,
    pub direction: u8,
    pub port: u16,
    pub net: IpNet,
}

/// What the kernel's maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// By cgroup id: every cgroup of every enforced container (a process in a cgroup below its
    /// container's is that container's).
    pub containers: BTreeMap<u64, Enforce>,
    pub allowed: BTreeSet<Allowed>,
}

impl Plan {
    /// Whether anything is enforced or audited.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }
}

pub fn plan(inventory: &Inventory, cgroups: &CgroupIndex, policy: &Policy) -> Plan {
    let mut plan = Plan::default();
    for (id, entry) in cgroups.entries() {
        let CgroupOwner::Container(container) = &entry.owner else {
            continue;
        };
        let Some((pod, container)) = inventory.container(container) else {
            continue;
        };
        if pod.mesh != MeshMode::Sidecar || container.proxy {
            continue;
        }
        let mode = match pod_mode(pod, inventory, policy.enforcement).0 {
            Mode::Off => continue,
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        };
        let strict = inbound_allowed(inventory, policy, pod, id, &mut plan.allowed);
        plan.containers.insert(
            id,
            Enforce {
                mode,
                inbound: u8::from(strict),
                ..Enforce::default()
            },
        );
    }
    if !plan.is_empty() {
        egress_allowed(inventory, policy, &mut plan.allowed);
    }
    plan
}

/// Whether the workload is STRICT (its sidecar refuses plaintext, so its application past the
/// sidecar must too), with the inbound plaintext it still expects: kubelet's probes from the
/// node, ports its own PeerAuthentication does not make STRICT, and the policy's rules that
/// name it as their destination.
fn inbound_allowed(
    inventory: &Inventory,
    policy: &Policy,
    pod: &PodInfo,
    scope: u64,
    allowed: &mut BTreeSet<Allowed>,
) -> bool {
    let root = &policy.mesh_root_namespace;
    let mtls = |port| {
        inventory
            .policy
            .peer_mtls(root, &pod.namespace, &pod.labels, port)
            .mode
    };
    // Port 0 is no port: the workload's mode without any port's.
    if mtls(0) != MtlsMode::Strict {
        return false;
    }
    let mut allow = |port, net| {
        allowed.insert(Allowed {
            scope,
            direction: DIRECTION_INGRESS,
            port,
            net,
        });
    };
    if policy.probes {
        for port in &pod.probe_ports {
            for ip in inventory.node_ips() {
                allow(*port, IpNet::from(ip));
            }
        }
    }
    let port_levels: BTreeSet<u16> = inventory
        .policy
        .peer_authentications
        .iter()
        .flat_map(|p| p.ports.keys().copied())
        .collect();
    for port in port_levels {
        if mtls(port) != MtlsMode::Strict {
            any().for_each(|net| allow(port, net));
        }
    }
    for rule in &policy.expected {
        let names_it = rule.to.iter().any(|to| match to {
            Destination::Any => true,
            Destination::Pods { label, value } => pod.label(label) == Some(value.as_str()),
            Destination::Net(net) => pod.ips.iter().any(|ip| net.contains(ip)),
            Destination::Node | Destination::MeshProxy => false,
        });
        if names_it {
            for port in &rule.ports {
                any().for_each(|net| allow(*port, net));
            }
        }
    }
    true
}

/// Where the policy expects plaintext from anyone: its rules' destinations, resolved against
/// the inventory of now.
fn egress_allowed(inventory: &Inventory, policy: &Policy, allowed: &mut BTreeSet<Allowed>) {
    for rule in &policy.expected {
        let mut nets = Vec::new();
        for to in &rule.to {
            match to {
                Destination::Any => nets.extend(any()),
                Destination::Node => nets.extend(inventory.node_ips().map(IpNet::from)),
                Destination::MeshProxy => nets.extend(
                    inventory
                        .pods()
                        .iter()
                        .filter(|p| p.is_proxy_pod())
                        .flat_map(|p| p.ips.iter().copied().map(IpNet::from)),
                ),
                Destination::Pods { label, value } => nets.extend(
                    inventory
                        .pods()
                        .iter()
                        .filter(|p| p.label(label) == Some(value.as_str()))
                        .flat_map(|p| p.ips.iter().copied().map(IpNet::from)),
                ),
                Destination::Net(net) => nets.push(*net),
            }
        }
        for port in &rule.ports {
            for net in &nets {
                allowed.insert(Allowed {
                    scope: 0,
                    direction: DIRECTION_EGRESS,
                    port: *port,
                    net: *net,
                });
            }
        }
    }
}

/// Every address of both families.
fn any() -> impl Iterator<Item = IpNet> {
    ["0.0.0.0/0", "::/0"]
        .into_iter()
        .map(|n| n.parse().expect("a network"))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::inventory::parse_pods;

    const POD: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podb3e9a8d2_51c4_4f0a_a7e6_9c2d4f1b8e30.slice";
    const PROXY_ID: &str = "0a5f711ae6c938ab34a06c4532ef0f827134e40478f4e06ba86fb7dd8cd47fa0";
    const APP_ID: &str = "87cfef2c0842f3a693b457b27902551b7d9c86a83752e12456d69994d133b633";
    /// Cgroup ids: the pod's own, its proxy's, its application's, and one below that.
    const SANDBOX: u64 = 10;
    const PROXY: u64 = 11;
    const APP: u64 = 12;
    const APP_CHILD: u64 = 13;

    /// The real Istio pod fixture (reviews-v1 in bookinfo), changed by `edit`, listed with
    /// `beside` (its Namespace, PeerAuthentications); and its cgroups as the kubelet lays them.
    fn node(edit: impl Fn(&mut Value), beside: &[Value]) -> (Inventory, CgroupIndex) {
        let mut pod: Value =
            serde_json::from_str(include_str!("../tests/fixtures/istio-pod.json")).unwrap();
        edit(&mut pod);
        let mut items = vec![pod];
        items.extend(beside.iter().cloned());
        let parsed = parse_pods(&json!({"kind": "List", "items": items}).to_string()).unwrap();
        assert_eq!(parsed.policy.errors, []);
        let inventory = Inventory::with_namespaces("test", parsed.pods, &parsed.namespaces)
            .with_policy(parsed.policy.policy)
            .with_enforcement(parsed.enforcement);
        let proxy = format!("{POD}/cri-containerd-{PROXY_ID}.scope");
        let app = format!("{POD}/cri-containerd-{APP_ID}.scope");
        let child = format!("{app}/worker");
        let cgroups = CgroupIndex::from_entries([
            (POD, SANDBOX),
            (proxy.as_str(), PROXY),
            (app.as_str(), APP),
            (child.as_str(), APP_CHILD),
        ]);
        (inventory, cgroups)
    }

    fn namespace(mode: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "bookinfo", "labels": {KEY: mode}}})
    }

    fn peer_authentication(spec: Value) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "bookinfo",
                            "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": spec})
    }

    fn annotate(value: &'static str) -> impl Fn(&mut Value) {
        move |pod| pod["metadata"]["annotations"][KEY] = json!(value)
    }

    /// One row a case: the pod's own mode, what sits beside it, the policy's default, and
    /// what its application container gets (mode, inbound), if anything.
    #[test]
    fn which_containers_are_enforced_and_how() {
        let strict = peer_authentication(json!({"mtls": {"mode": "STRICT"}}));
        let none = |_: &mut Value| {};
        type Row = (
            &'static str,
            Box<dyn Fn(&mut Value)>,
            Vec<Value>,
            Mode,
            Option<(u8, u8)>,
        );
        let rows: Vec<Row> = vec![
            ("nothing says: off", Box::new(none), vec![], Mode::Off, None),
            (
                "the namespace's label",
                Box::new(none),
                vec![namespace("enforce")],
                Mode::Off,
                Some((MODE_ENFORCE, 0)),
            ),
            (
                "the policy's default",
                Box::new(none),
                vec![],
                Mode::Audit,
                Some((MODE_AUDIT, 0)),
            ),
            (
                "the pod's annotation over its namespace",
                Box::new(annotate("audit")),
                vec![namespace("enforce")],
                Mode::Off,
                Some((MODE_AUDIT, 0)),
            ),
            (
                "the pod's label over the default",
                Box::new(|p: &mut Value| p["metadata"]["labels"][KEY] = json!("off")),
                vec![],
                Mode::Enforce,
                None,
            ),
            (
                "a word not understood: the namespace's holds",
                Box::new(annotate("enforcing")),
                vec![namespace("audit")],
                Mode::Off,
                Some((MODE_AUDIT, 0)),
            ),
            (
                "a STRICT workload: inbound too",
                Box::new(none),
                vec![namespace("enforce"), strict.clone()],
                Mode::Off,
                Some((MODE_ENFORCE, 1)),
            ),
            (
                "no sidecar: never",
                Box::new(|p: &mut Value| {
                    p["metadata"]["annotations"]
                        .as_object_mut()
                        .unwrap()
                        .remove("sidecar.istio.io/status");
                    p["metadata"]["labels"]
                        .as_object_mut()
                        .unwrap()
                        .remove("security.istio.io/tlsMode");
                    p["spec"]["containers"]
                        .as_array_mut()
                        .unwrap()
                        .retain(|c| c["name"] != "istio-proxy");
                }),
                vec![namespace("enforce")],
                Mode::Off,
                None,
            ),
        ];
        for (what, edit, beside, default, want) in rows {
            let (inventory, cgroups) = node(edit, &beside);
            let policy = Policy {
                enforcement: default,
                ..Policy::default()
            };
            let plan = plan(&inventory, &cgroups, &policy);
            let got = |id| plan.containers.get(&id).map(|e| (e.mode, e.inbound));
            assert_eq!(got(APP), want, "{what}");
            assert_eq!(
                got(APP_CHILD),
                want,
                "{what}: a cgroup below the container's"
            );
            assert_eq!(
                (got(PROXY), got(SANDBOX)),
                (None, None),
                "{what}: the proxy never"
            );
            assert_eq!(plan.allowed.is_empty(), want.is_none(), "{what}");
        }
    }

    /// What a STRICT workload's application may still accept, and where any enforced
    /// container may still send plaintext.
    #[test]
    fn what_the_policy_expects_is_allowed() {
        let strict = peer_authentication(json!({
            "selector": {"matchLabels": {"app": "reviews"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9080": {"mode": "PERMISSIVE"}}}));
        let (inventory, cgroups) = node(|_| {}, &[namespace("enforce"), strict]);
        let plan = plan(&inventory, &cgroups, &Policy::default());
        let has = |scope, direction, port, net: &str| {
            plan.allowed.contains(&Allowed {
                scope,
                direction,
                port,
                net: net.parse().unwrap(),
            })
        };
        // kubelet's probe of the proxy's readiness port, from the node only.
        assert!(has(APP, DIRECTION_INGRESS, 15021, "172.18.0.4/32"));
        assert!(!has(APP, DIRECTION_INGRESS, 15021, "0.0.0.0/0"));
        // Its own policy leaves 9080 PERMISSIVE: from anywhere.
        assert!(has(APP, DIRECTION_INGRESS, 9080, "0.0.0.0/0"));
        assert!(has(APP, DIRECTION_INGRESS, 9080, "::/0"));
        assert!(!has(APP, DIRECTION_INGRESS, 8080, "0.0.0.0/0"));
        // The default rules: DNS to the node and the usual service addresses, for everyone.
        assert!(has(0, DIRECTION_EGRESS, 53, "172.18.0.4/32"));
        assert!(has(0, DIRECTION_EGRESS, 53, "10.96.0.10/32"));
        // Metrics to a mesh proxy: this meshed pod's address.
        assert!(has(0, DIRECTION_EGRESS, 15020, "10.244.0.23/32"));
        assert!(!plan
            .allowed
            .iter()
            .any(|a| a.direction == DIRECTION_EGRESS && a.port == 5000));
    }

    #[test]
    fn status_shows_each_namespace_s_mode_and_the_pods_of_their_own() {
        let (inventory, _) = node(annotate("audit"), &[namespace("enforce")]);
        let got = by_namespace(&inventory, Mode::Off);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (
                got[0].namespace.as_str(),
                got[0].mode.as_str(),
                got[0].source.as_str(),
                got[0].pods
            ),
            ("bookinfo", "enforce", "namespace", 1)
        );
        assert_eq!(got[0].overrides, ["reviews-v1-5c4d9f7b68-qk7zd=audit"]);
    }
}
