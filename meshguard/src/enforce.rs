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
    pub enum Mode ("enforcement mode") {
        /// Nothing (detection only).
        Off = "off",
        /// Judges as if enforcing: what would be refused is recorded and counted, and passes.
        Audit = "audit",
        /// Refuses.
        Enforce = "enforce",
    }
}

impl Default for Mode {
    fn default() -> Self {
        Self::Off
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
    match (pod.enforce, inventory.enforcement.get(&pod.namespace)) {
        (Some(mode), _) => (mode, ModeSource::Pod),
        (None, Some(mode)) => (*mode, ModeSource::Namespace),
        (None, None) => (default, ModeSource::Default),
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
        let (mode, source) = match inventory.enforcement.get(&pod.namespace) {
            Some(mode) => (*mode, ModeSource::Namespace),
            None => (default, ModeSource::Default),
        };
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
