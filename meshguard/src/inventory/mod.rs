//! Who is behind an address: the pods of this node (and any others the source lists) with
//! their mesh intent, and the node itself. One snapshot at a time, replaced whole when the
//! source changes; trouble with the source never empties it.

pub mod cgroups;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod pod;
pub mod source;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

pub use cgroups::{CgroupEntry, CgroupIndex, CgroupOwner, ContainerId};
pub use pod::{MeshMode, PodError, PodInfo};
use serde_json::Value;

/// What an address is, as far as the inventory knows.
#[derive(Clone, Copy, Debug)]
pub enum Identity<'a> {
    Pod(&'a PodInfo),
    /// The node itself, or a host-network pod (they share its addresses).
    Node,
    Unknown,
}

impl<'a> Identity<'a> {
    pub fn pod(self) -> Option<&'a PodInfo> {
        match self {
            Identity::Pod(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Inventory {
    pods: Vec<PodInfo>,
    by_ip: HashMap<IpAddr, usize>,
    node_ips: HashSet<IpAddr>,
    /// Where it came from (`file:PATH`, `kubernetes`, `none`).
    pub source: String,
    /// When this snapshot was made; `None` before the source delivered one.
    pub loaded_at: Option<std::time::SystemTime>,
}

/// OpenShift gives each namespace a uid range; Istio's proxy there runs as the range's first
/// uid plus one.
const OPENSHIFT_UID_RANGE: &str = "openshift.io/sa.scc.uid-range";

/// The proxy uid a Namespace object implies, if it has an OpenShift uid range.
pub fn namespace_proxy_uid(ns: &Value) -> Option<u32> {
    let range = ns["metadata"]["annotations"][OPENSHIFT_UID_RANGE].as_str()?;
    let start: u32 = range.split('/').next()?.trim().parse().ok()?;
    start.checked_add(1)
}

impl Inventory {
    pub fn new(source: &str, pods: Vec<PodInfo>) -> Self {
        Self::with_namespaces(source, pods, &BTreeMap::new())
    }

    /// With per-namespace proxy uids (OpenShift) for pods that do not name theirs.
    pub fn with_namespaces(
        source: &str,
        mut pods: Vec<PodInfo>,
        proxy_uids: &BTreeMap<String, u32>,
    ) -> Self {
        for pod in &mut pods {
            if let (false, Some(uid)) = (pod.proxy_uid_explicit, proxy_uids.get(&pod.namespace)) {
                pod.proxy_uid = *uid;
            }
        }
        let mut by_ip = HashMap::new();
        let mut node_ips = HashSet::new();
        for (i, pod) in pods.iter().enumerate() {
            node_ips.extend(pod.host_ips.iter().copied());
            if pod.host_network {
                node_ips.extend(pod.ips.iter().copied());
                continue;
            }
            for ip in &pod.ips {
                by_ip.insert(*ip, i);
            }
        }
        Self {
            pods,
            by_ip,
            node_ips,
            source: source.to_string(),
            loaded_at: Some(std::time::SystemTime::now()),
        }
    }

    pub fn empty(source: &str) -> Self {
        Self {
            source: source.to_string(),
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether some pod of this workload is in the inventory.
    pub fn has_workload(&self, namespace: &str, workload: &str) -> bool {
        self.pods
            .iter()
            .any(|p| p.namespace == namespace && p.workload.name == workload)
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn lookup(&self, ip: IpAddr) -> Identity<'_> {
        let ip = unmap(ip);
        if let Some(&i) = self.by_ip.get(&ip) {
            return Identity::Pod(&self.pods[i]);
        }
        if self.node_ips.contains(&ip) {
            return Identity::Node;
        }
        Identity::Unknown
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What a pod list document holds.
#[derive(Debug, Default)]
pub struct Parsed {
    pub pods: Vec<PodInfo>,
    /// Proxy uids of namespaces listed with the pods (OpenShift uid ranges).
    pub namespaces: BTreeMap<String, u32>,
    pub errors: Vec<PodError>,
}

/// Reads a `kubectl get pods -o json` document (a List or PodList, or one Pod; Namespace items
/// may sit beside the pods). A document that is not JSON, or has no items, is an error; a
/// malformed item is reported and skipped.
pub fn parse_pods(text: &str) -> Result<Parsed, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items: Vec<&Value> = match (&doc["kind"], &doc["items"]) {
        (_, Value::Array(items)) => items.iter().collect(),
        (Value::String(k), _) if k == "Pod" => vec![&doc],
        _ => return Err("neither a list of pods (no \"items\") nor a Pod".into()),
    };
    let mut parsed = Parsed::default();
    for (i, item) in items.into_iter().enumerate() {
        if item["kind"] == "Namespace" {
            if let (Some(name), Some(uid)) =
                (item["metadata"]["name"].as_str(), namespace_proxy_uid(item))
            {
                parsed.namespaces.insert(name.to_string(), uid);
            }
            continue;
        }
        match PodInfo::parse(item) {
            Ok(pod) => parsed.pods.push(pod),
            Err(mut e) => {
                if e.object.ends_with("<no name>") {
                    e.object = format!("{} (item {i})", e.object);
                }
                parsed.errors.push(e);
            }
        }
    }
    Ok(parsed)
}

/// The current inventory, shared between the source that replaces it and the readers.
pub type Shared = Arc<std::sync::RwLock<Arc<Inventory>>>;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list() -> String {
        json!({ "kind": "List", "items": [
            { "kind": "Pod", "metadata": { "name": "a", "namespace": "n" },
              "status": { "podIP": "10.0.0.5", "hostIP": "192.0.2.1" } },
            { "kind": "Pod", "metadata": { "name": "kube-proxy-x", "namespace": "kube-system" },
              "spec": { "hostNetwork": true }, "status": { "podIP": "192.0.2.1", "hostIP": "192.0.2.1" } },
            { "kind": "Pod", "metadata": { "namespace": "n" } },
            { "kind": "Pod", "metadata": { "name": "b", "namespace": "n" }, "status": { "podIP": "bogus" } },
        ]})
        .to_string()
    }

    #[test]
    fn lookups() {
        let Parsed { pods, errors, .. } = parse_pods(&list()).unwrap();
        assert_eq!(pods.len(), 2);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "pod n/<no name> (item 2): metadata.name is missing",
                "pod n/b: podIP \"bogus\" is not an address",
            ]
        );
        let inv = Inventory::new("file:x", pods);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(matches!(inv.lookup(ip("10.0.0.5")), Identity::Pod(p) if p.name == "a"));
        assert!(matches!(inv.lookup(ip("::ffff:10.0.0.5")), Identity::Pod(p) if p.name == "a"));
        assert!(
            matches!(inv.lookup(ip("192.0.2.1")), Identity::Node),
            "host network is the node"
        );
        assert!(matches!(inv.lookup(ip("10.9.9.9")), Identity::Unknown));
    }

    #[test]
    fn documents_that_are_not_pod_lists() {
        let cases = [
            ("", "not JSON"),
            ("{\"kind\": \"List\"", "not JSON"),
            ("{\"kind\": \"Service\"}", "neither a list of pods"),
            ("[1, 2]", "neither a list of pods"),
        ];
        for (text, want) in cases {
            assert!(parse_pods(text).unwrap_err().contains(want), "{text:?}");
        }
        let single =
            json!({ "kind": "Pod", "metadata": { "name": "p", "namespace": "n" } }).to_string();
        assert_eq!(parse_pods(&single).unwrap().pods.len(), 1);
    }
}
