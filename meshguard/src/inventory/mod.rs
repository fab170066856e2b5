//! Who is behind an address or a container: the pods of this node (and any others the source
//! lists) with their mesh intent and containers, and the node itself. One snapshot at a time,
//! replaced whole when the source changes; trouble with the source never empties it.

pub mod cgroups;
pub mod destination;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod pod;
pub mod policy;
pub mod source;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    ops::Bound,
    sync::Arc,
};

pub use cgroups::{CgroupEntry, CgroupIndex, CgroupOwner, ContainerId};
pub use pod::{ContainerInfo, MeshMode, ParsedPod, PodError, PodInfo, PROXY_CONTAINERS};
pub use policy::{MeshPolicy, ParsedPolicy};
use serde_json::Value;

use crate::enforce::{self, Mode};

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
    /// Container id to (pod, container) positions; `None` where two claim one id, which
    /// then names neither.
    by_container: BTreeMap<String, Option<(usize, usize)>>,
    by_uid: BTreeMap<String, Option<usize>>,
    /// What the mesh declares: PeerAuthentication and DestinationRule objects.
    pub policy: MeshPolicy,
    /// Namespaces' enforcement modes, from their `meshguard.io/enforce` label.
    pub enforcement: BTreeMap<String, Mode>,
    /// Where it came from (`file:PATH`, `kubernetes`, `none`).
    pub source: String,
    /// When this snapshot was made; `None` before the source delivered one.
    pub loaded_at: Option<std::time::SystemTime>,
}

/// OpenShift gives each namespace a uid range; Istio's proxy there runs as the range's first
/// uid plus one.
const OPENSHIFT_UID_RANGE: &str = "openshift.io/sa.scc.uid-range";

/// The enforcement mode a Namespace object's `meshguard.io/enforce` label sets, if any; an
/// unknown word is an error (the namespace then has none: the policy's default holds).
pub fn namespace_mode(ns: &Value) -> Result<Option<Mode>, String> {
    match &ns["metadata"]["labels"][enforce::KEY] {
        Value::Null => Ok(None),
        Value::String(word) => word
            .parse()
            .map(Some)
            .map_err(|e| format!("label {}: {e}", enforce::KEY)),
        other => Err(format!("label {}: {other} is not a mode", enforce::KEY)),
    }
}

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
        let mut by_container = BTreeMap::new();
        let mut by_uid = BTreeMap::new();
        for (i, pod) in pods.iter().enumerate() {
            if !pod.uid.is_empty() {
                insert_unique(&mut by_uid, pod.uid.clone(), i);
            }
            for (j, c) in pod.containers.iter().enumerate() {
                if let Some(id) = &c.id {
                    insert_unique(&mut by_container, id.to_string(), (i, j));
                }
            }
        }
        Self {
            pods,
            by_ip,
            node_ips,
            by_container,
            by_uid,
            policy: MeshPolicy::default(),
            enforcement: BTreeMap::new(),
            source: source.to_string(),
            loaded_at: Some(std::time::SystemTime::now()),
        }
    }

    /// With the mesh's policy objects.
    pub fn with_policy(mut self, policy: MeshPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// With namespaces' enforcement modes.
    pub fn with_enforcement(mut self, namespaces: BTreeMap<String, Mode>) -> Self {
        self.enforcement = namespaces;
        self
    }

    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    /// The node's addresses (and host-network pods', which are the same).
    pub fn node_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_ips.iter().copied()
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

    /// The pod and container a runtime's container id names. Either side may be a short
    /// form (a prefix) of the other, as some runtimes print ids; a short form that fits more
    /// than one container names none.
    pub fn container(&self, id: &ContainerId) -> Option<(&PodInfo, &ContainerInfo)> {
        let id = id.as_str();
        let at = match self.by_container.get(id) {
            Some(at) => *at,
            None => {
                let longer = self
                    .by_container
                    .range::<str, _>((Bound::Excluded(id), Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(id));
                // Ids are hex, so any byte offset is a boundary.
                let shorter =
                    (1..id.len()).filter_map(|n| self.by_container.get_key_value(&id[..n]));
                let mut found = longer.chain(shorter).map(|(_, at)| *at);
                match (found.next(), found.next()) {
                    (Some(at), None) => at,
                    _ => None,
                }
            }
        }?;
        let pod = &self.pods[at.0];
        Some((pod, &pod.containers[at.1]))
    }

    /// The pod with this `metadata.uid` (as its cgroup is named).
    pub fn pod_by_uid(&self, uid: &str) -> Option<&PodInfo> {
        self.by_uid
            .get(uid)
            .copied()
            .flatten()
            .map(|i| &self.pods[i])
    }
}

/// Inserts; a key already held for another value is held for none.
fn insert_unique<K: Ord, V: PartialEq + Copy>(map: &mut BTreeMap<K, Option<V>>, key: K, value: V) {
    map.entry(key)
        .and_modify(|held| {
            if *held != Some(value) {
                *held = None;
            }
        })
        .or_insert(Some(value));
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
    /// Enforcement modes of namespaces listed with the pods.
    pub enforcement: BTreeMap<String, Mode>,
    pub errors: Vec<PodError>,
    /// What parsed pods had wrong that verdicts can do without.
    pub warnings: Vec<PodError>,
    /// PeerAuthentication and DestinationRule items listed with the pods.
    pub policy: ParsedPolicy,
}

/// Reads a `kubectl get pods -o json` document (a List or PodList, or one Pod; Namespace,
/// PeerAuthentication and DestinationRule items may sit beside the pods). A document that is not JSON, or has no items, is an error; a
/// malformed item is reported and skipped; a forgivable flaw in one is reported with it kept.
pub fn parse_pods(text: &str) -> Result<Parsed, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items: Vec<&Value> = match (&doc["kind"], &doc["items"]) {
        (_, Value::Array(items)) => items.iter().collect(),
        (Value::String(k), _) if k == "Pod" => vec![&doc],
        _ => return Err("neither a list of pods (no \"items\") nor a Pod".into()),
    };
    let mut parsed = Parsed::default();
    for (i, item) in items.into_iter().enumerate() {
        if parsed.policy.add(item, i) {
            continue;
        }
        if item["kind"] == "Namespace" {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            if let Some(uid) = namespace_proxy_uid(item) {
                parsed.namespaces.insert(name.to_string(), uid);
            }
            match namespace_mode(item) {
                Ok(Some(mode)) => {
                    parsed.enforcement.insert(name.to_string(), mode);
                }
                Ok(None) => {}
                Err(what) => parsed.warnings.push(PodError {
                    object: format!("namespace {name}"),
                    what,
                }),
            }
            continue;
        }
        match PodInfo::parse(item) {
            Ok(ParsedPod { pod, warnings }) => {
                parsed.pods.push(pod);
                parsed.warnings.extend(warnings);
            }
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
    use std::collections::BTreeSet;

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

    fn with_containers(name: &str, uid: &str, containers: &[(&str, &str)]) -> Value {
        let (spec, status): (Vec<Value>, Vec<Value>) = containers
            .iter()
            .map(|(name, id)| {
                (
                    json!({ "name": name }),
                    json!({ "name": name, "containerID": format!("containerd://{id}") }),
                )
            })
            .unzip();
        json!({ "kind": "Pod", "metadata": { "name": name, "namespace": "n", "uid": uid },
                "spec": { "containers": spec }, "status": { "containerStatuses": status } })
    }

    #[test]
    fn containers_and_uids() {
        let full = |prefix: &str| format!("{prefix:0<64}");
        let (web, proxy, db, short) = (full("aa11"), full("aa22"), full("bb33"), "cc44dd55ee66");
        let doc = json!({ "items": [
            with_containers("web", "uid-web", &[("web", &web), ("istio-proxy", &proxy)]),
            with_containers("db", "uid-db", &[("db", &db)]),
            // A runtime that reported a short id.
            with_containers("old", "", &[("old", short)]),
            // Two pods claiming one id (a stale file): it names neither.
            with_containers("twin-a", "uid-twin", &[("x", &full("ee"))]),
            with_containers("twin-b", "uid-twin", &[("x", &full("ee"))]),
        ]});
        let parsed = parse_pods(&doc.to_string()).unwrap();
        assert_eq!((parsed.errors.len(), parsed.warnings.len()), (0, 0));
        let inv = Inventory::new("file:x", parsed.pods);
        let id = |s: &str| ContainerId::from_hex(s).unwrap();
        let found = |s: &str| {
            inv.container(&id(s))
                .map(|(p, c)| (p.name.as_str(), c.name.as_str(), c.proxy))
        };
        let cases = [
            (web.as_str(), Some(("web", "web", false))),
            (&proxy, Some(("web", "istio-proxy", true))),
            (&proxy.to_uppercase(), Some(("web", "istio-proxy", true))),
            (&db, Some(("db", "db", false))),
            // Short forms either way, when they fit one container.
            (&db[..12], Some(("db", "db", false))),
            (&full(short), Some(("old", "old", false))),
            (short, Some(("old", "old", false))),
            ("aa1100000000", Some(("web", "web", false))),
            ("aa0000000000", None),
            ("000000000000", None),
            (&full("ee"), None),
            (&full("ff"), None),
        ];
        for (query, want) in cases {
            assert_eq!(found(query), want, "{query}");
        }
        assert_eq!(
            inv.pod_by_uid("uid-web").map(|p| p.name.as_str()),
            Some("web")
        );
        assert!(inv.pod_by_uid("").is_none(), "no uid is no pod");
        assert!(inv.pod_by_uid("uid-twin").is_none(), "ambiguous");
        assert!(inv.pod_by_uid("uid-none").is_none());

        // A short form that fits two containers names none.
        let (a, b) = (full("abcdef0123451"), full("abcdef0123452"));
        let doc = json!({ "items": [with_containers("p", "u", &[("a", &a), ("b", &b)])] });
        let inv = Inventory::new("file:x", parse_pods(&doc.to_string()).unwrap().pods);
        assert!(inv.container(&id("abcdef012345")).is_none());
        assert_eq!(inv.container(&id("abcdef0123451")).unwrap().1.name, "a");
    }

    #[test]
    fn warnings_name_the_pod_and_keep_it() {
        let doc = json!({ "items": [with_containers("p", "u", &[("app", "not-hex")])] });
        let parsed = parse_pods(&doc.to_string()).unwrap();
        assert_eq!(parsed.pods.len(), 1);
        assert_eq!(parsed.pods[0].containers[0].id, None);
        let warnings: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            ["pod n/p: container app: containerID \"containerd://not-hex\": \"not-hex\" is not a container id (12 to 64 hex digits)"]
        );
    }

    /// `kubectl get pod -o json` output: a classic sidecar, a native one (an init container),
    /// an ingress gateway, and the agent's own pods on kind.
    #[test]
    fn real_pods_and_their_containers() {
        let docs = [
            include_str!("../../tests/fixtures/istio-pod.json"),
            include_str!("../../tests/fixtures/istio-native-sidecar-pod.json"),
            include_str!("../../tests/fixtures/istio-ingressgateway-pod.json"),
            include_str!("../../tests/fixtures/cluster/pods.json"),
        ];
        let mut pods = Vec::new();
        for doc in docs {
            let parsed = parse_pods(doc).unwrap();
            assert_eq!((parsed.errors, parsed.warnings), (vec![], vec![]));
            pods.extend(parsed.pods);
        }
        let inv = Inventory::new("file:fixtures", pods);
        let reviews = "reviews-v1-5c4d9f7b68-qk7zd";
        let productpage = "productpage-v1-6d8c4f9b7d-8wqlj";
        let gateway = "istio-ingressgateway-7f8c6d9b54-m4xqz";
        let cases = [
            (
                "0a5f711ae6c938ab34a06c4532ef0f827134e40478f4e06ba86fb7dd8cd47fa0",
                reviews,
                "istio-proxy",
                true,
                MeshMode::Sidecar,
            ),
            (
                "87cfef2c0842f3a693b457b27902551b7d9c86a83752e12456d69994d133b633",
                reviews,
                "reviews",
                false,
                MeshMode::Sidecar,
            ),
            (
                "f566dfdc59c555f9541e0708455947e624cd5df5340655a39261ca6aff560da4",
                reviews,
                "istio-init",
                false,
                MeshMode::Sidecar,
            ),
            (
                "5c60af44fe320d90a8a96653043ddf72e697be1fdc9f3cfac014b53c39bd7db2",
                productpage,
                "istio-proxy",
                true,
                MeshMode::Sidecar,
            ),
            (
                "ce2c5d5bd333c423a51a53ddeb9f4419b29df133f5d80068ccf475e3ed0d8ec5",
                productpage,
                "istio-init",
                false,
                MeshMode::Sidecar,
            ),
            (
                "1ff7c1d8d7cb07e4e07676b384cce8a356c2e11f9a0091488ed69ccd5a789bf8",
                productpage,
                "productpage",
                false,
                MeshMode::Sidecar,
            ),
            (
                "8852da99232ef1306c5ee24513f3d6620f3e0a7df0a0d9974787a498ba035759",
                gateway,
                "istio-proxy",
                true,
                MeshMode::Gateway,
            ),
            (
                "4f1c9a2e7b3d58e6a0c1f4d92b7e3a5c8d6f0b1e2a4c7d9f3b5e8a1c6d2f4b7e",
                "meshguard-7xk2p",
                "meshguard",
                false,
                MeshMode::None,
            ),
            (
                "b8e2d6f0a4c9137e5b2d8f6a0c3e9b1d7f4a2c8e6b0d3f9a1c5e7b2d4f8a6c0e",
                "meshguard-q9d4m",
                "meshguard",
                false,
                MeshMode::None,
            ),
            (
                "1d7a3f9c5e0b2d8a6f4c1e9b7d3a5f0c8e2b6d4a9f1c7e3b5d0a8f2c6e4b9d1a",
                "meshguard-z5rtn",
                "meshguard",
                false,
                MeshMode::None,
            ),
        ];
        for (id, pod, container, proxy, mesh) in cases {
            let (p, c) = inv.container(&ContainerId::from_hex(id).unwrap()).unwrap();
            assert_eq!(
                (p.name.as_str(), c.name.as_str(), c.proxy, p.mesh),
                (pod, container, proxy, mesh),
                "{id}"
            );
            assert_eq!(inv.pod_by_uid(&p.uid).map(|q| &q.name), Some(&p.name));
        }
        let native = inv
            .pod_by_uid("d9df691e-7ace-456d-b918-cd8d03da0311")
            .unwrap();
        let gw = inv
            .pod_by_uid("e6a3e36b-b934-412a-965f-b196d92c5b56")
            .unwrap();
        assert_eq!((native.proxy_uid, native.proxy_uid_explicit), (1337, true));
        assert_eq!(native.probe_ports, BTreeSet::from([15021]));
        assert!(gw.is_proxy_pod() && gw.meshed());
        assert_eq!(
            (gw.proxy_uid, gw.proxy_uid_explicit),
            (1337, true),
            "the pod's runAsUser"
        );
        assert_eq!(gw.label("istio"), Some("ingressgateway"));
        assert_eq!(gw.workload.name, "istio-ingressgateway");
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
