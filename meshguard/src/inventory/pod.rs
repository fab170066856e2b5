//! A Kubernetes Pod object, as the API server or `kubectl get pods -o json` gives it, reduced
//! to what verdicts need: addresses, workload, mesh intent, probe ports, and the containers
//! whose cgroups own its sockets. Parsing is lenient about what it does not need and strict
//! about what it does, naming the object on error; what it forgives, it reports as a warning.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use super::cgroups::ContainerId;
use crate::enforce::{self, Mode};

/// The uid Istio's sidecar runs as, unless the pod or its namespace says otherwise.
pub const DEFAULT_PROXY_UID: u32 = 1337;

const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
const TLS_MODE: &str = "security.istio.io/tlsMode";
const AMBIENT_MODE: &str = "istio.io/dataplane-mode";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const EXCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

/// Names of the mesh's proxy container: Istio's Envoy (sidecar, gateway or waypoint), and
/// ztunnel.
pub const PROXY_CONTAINERS: [&str; 2] = ["istio-proxy", "ztunnel"];

/// pilot-agent's role (`proxy ROLE` in the proxy's args) when the proxy is the pod's workload.
/// Helm-installed gateways are injected, with Istio's gateway template: their injection
/// status alone would call them sidecars.
const GATEWAY_ROLES: [&str; 2] = ["router", "waypoint"];

/// How a pod takes part in the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    /// Not in the mesh.
    #[default]
    None,
    /// An injected Envoy sidecar with iptables capture.
    Sidecar,
    /// Ambient: ztunnel on the node carries its traffic over HBONE.
    Ambient,
    /// The mesh's proxy is the pod's workload, without capture: an ingress, egress or
    /// east-west gateway, a waypoint, or ztunnel itself.
    Gateway,
}

/// The owner that gives a pod its stable name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// One of a pod's containers, with the runtime's id once it has started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// From the container's status; `None` until it has started, or if the id was malformed.
    pub id: Option<ContainerId>,
    /// The mesh's proxy: one of [`PROXY_CONTAINERS`], running for the pod's life (a main
    /// container, or a native sidecar: an init container with `restartPolicy: Always`).
    pub proxy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`, which names the pod's cgroup; empty if the object has none.
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// The node's addresses, as the pod's status gives them.
    pub host_ips: Vec<IpAddr>,
    pub host_network: bool,
    pub workload: Workload,
    pub mesh: MeshMode,
    pub proxy_uid: u32,
    /// The pod itself names the proxy's uid (`runAsUser` on `istio-proxy`); otherwise the
    /// namespace may (OpenShift).
    pub proxy_uid_explicit: bool,
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ranges: Vec<IpNet>,
    /// Ports kubelet probes (HTTP, TCP or gRPC; named ports resolved).
    pub probe_ports: BTreeSet<u16>,
    /// The containers' named ports (what a Service's `targetPort` may name).
    pub named_ports: BTreeMap<String, u16>,
    /// The pod's own enforcement mode (`meshguard.io/enforce`, annotation or label).
    pub enforce: Option<Mode>,
    /// Init containers, then main ones, then ephemeral ones, in spec order.
    pub containers: Vec<ContainerInfo>,
}

/// Empty, not meshed, with the default proxy uid (not 0: root is no proxy).
impl Default for PodInfo {
    fn default() -> Self {
        PodInfo {
            namespace: String::new(),
            name: String::new(),
            uid: String::new(),
            labels: BTreeMap::new(),
            ips: Vec::new(),
            host_ips: Vec::new(),
            host_network: false,
            workload: Workload::default(),
            mesh: MeshMode::None,
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_uid_explicit: false,
            exclude_outbound_ports: BTreeSet::new(),
            exclude_inbound_ports: BTreeSet::new(),
            exclude_outbound_ranges: Vec::new(),
            probe_ports: BTreeSet::new(),
            named_ports: BTreeMap::new(),
            enforce: None,
            containers: Vec::new(),
        }
    }
}

/// A pod, and what was wrong with it that verdicts can do without (a malformed container
/// id: that container's sockets are then just not attributed), for the caller to log.
#[derive(Debug)]
pub struct ParsedPod {
    pub pod: PodInfo,
    pub warnings: Vec<PodError>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pod {object}: {what}")]
pub struct PodError {
    /// `namespace/name`, or the item's position when it has no name.
    pub object: String,
    pub what: String,
}

impl PodInfo {
    pub fn meshed(&self) -> bool {
        self.mesh != MeshMode::None
    }

    /// Whether the pod runs the mesh's proxy itself, as a sidecar or as its workload.
    pub fn is_proxy_pod(&self) -> bool {
        matches!(self.mesh, MeshMode::Sidecar | MeshMode::Gateway)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    pub fn parse(v: &Value) -> Result<ParsedPod, PodError> {
        let meta = &v["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let namespace = meta["namespace"].as_str().unwrap_or("default");
        let object = format!(
            "{namespace}/{}",
            if name.is_empty() { "<no name>" } else { name }
        );
        let err = |what: String| PodError {
            object: object.clone(),
            what,
        };
        if v["kind"].as_str().is_some_and(|k| k != "Pod") {
            return Err(err(format!("kind is {}, not Pod", v["kind"])));
        }
        if name.is_empty() {
            return Err(err("metadata.name is missing".into()));
        }
        let annotations = &meta["annotations"];
        let labels: BTreeMap<String, String> = meta["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let spec = &v["spec"];
        let status = &v["status"];
        let host_network = spec["hostNetwork"].as_bool().unwrap_or(false);

        let mut ips = Vec::new();
        for ip in status["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["ip"].as_str())
            .chain(status["podIP"].as_str())
        {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| err(format!("podIP {ip:?} is not an address")))?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }

        let host_ips = status["hostIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["ip"].as_str())
            .chain(status["hostIP"].as_str())
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut v: Vec<IpAddr>, ip| {
                if !v.contains(&ip) {
                    v.push(ip);
                }
                v
            });

        let long_running: Vec<&Value> = declared_containers(spec)
            .filter(|(declared, c)| declared.runs_for_the_pod(c))
            .map(|(_, c)| c)
            .collect();
        // The proxy container's own uid, else the pod's (where istioctl's gateways set it).
        let explicit_uid = long_running
            .iter()
            .find(|c| is_proxy_name(c))
            .and_then(|c| {
                c["securityContext"]["runAsUser"]
                    .as_u64()
                    .or(spec["securityContext"]["runAsUser"].as_u64())
            })
            .and_then(|u| u32::try_from(u).ok());
        let mut warnings = Vec::new();
        let containers = containers(spec, status, |what| warnings.push(err(what)));

        let ports = |key: &str| -> Result<BTreeSet<u16>, PodError> {
            match annotations[key].as_str() {
                None => Ok(BTreeSet::new()),
                Some(list) => parse_ports(list).map_err(|e| err(format!("annotation {key}: {e}"))),
            }
        };
        // A mode not understood is said, and the namespace's (or the default) holds.
        let enforce = match annotations[enforce::KEY]
            .as_str()
            .or(labels.get(enforce::KEY).map(String::as_str))
        {
            None => None,
            Some(word) => word
                .parse()
                .map_err(|e| warnings.push(err(format!("{}: {e}", enforce::KEY))))
                .ok(),
        };
        let exclude_outbound_ranges = match annotations[EXCLUDE_OUTBOUND_RANGES].as_str() {
            None => Vec::new(),
            Some(list) => parse_ranges(list)
                .map_err(|e| err(format!("annotation {EXCLUDE_OUTBOUND_RANGES}: {e}")))?,
        };

        let pod = PodInfo {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: meta["uid"].as_str().unwrap_or_default().to_string(),
            ips,
            host_ips,
            host_network,
            workload: workload(name, meta),
            mesh: mesh_mode(annotations, &labels, spec),
            labels,
            proxy_uid: explicit_uid.unwrap_or(DEFAULT_PROXY_UID),
            proxy_uid_explicit: explicit_uid.is_some(),
            exclude_outbound_ports: ports(EXCLUDE_OUTBOUND_PORTS)?,
            exclude_inbound_ports: ports(EXCLUDE_INBOUND_PORTS)?,
            exclude_outbound_ranges,
            probe_ports: probe_ports(&long_running),
            named_ports: named_ports(&long_running),
            enforce,
            containers,
        };
        Ok(ParsedPod { pod, warnings })
    }
}

fn is_proxy_name(container: &Value) -> bool {
    PROXY_CONTAINERS.iter().any(|n| container["name"] == *n)
}

/// An injected sidecar, unless the proxy is a main container in a gateway's role or the pod
/// was not injected at all; then the pod is the proxy's own.
fn mesh_mode(annotations: &Value, labels: &BTreeMap<String, String>, spec: &Value) -> MeshMode {
    let injected = annotations[SIDECAR_STATUS].is_string()
        || labels.get(TLS_MODE).is_some_and(|m| m == "istio");
    let proxy = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| is_proxy_name(c));
    if let Some(proxy) = proxy {
        let args = &proxy["args"];
        let gateway_role = args[0] == "proxy" && GATEWAY_ROLES.iter().any(|r| args[1] == *r);
        if gateway_role || !injected {
            return MeshMode::Gateway;
        }
    }
    if injected {
        MeshMode::Sidecar
    } else if labels.get(AMBIENT_MODE).is_some_and(|m| m == "ambient") {
        MeshMode::Ambient
    } else {
        MeshMode::None
    }
}

/// Where a container is declared in the spec, and its status in the pod's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Declared {
    Init,
    Main,
    Ephemeral,
}

impl Declared {
    const ALL: [Declared; 3] = [Declared::Init, Declared::Main, Declared::Ephemeral];

    /// The spec's list and the status's.
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            Declared::Init => ("initContainers", "initContainerStatuses"),
            Declared::Main => ("containers", "containerStatuses"),
            Declared::Ephemeral => ("ephemeralContainers", "ephemeralContainerStatuses"),
        }
    }

    /// Main containers and native sidecars run beside the workload; plain init containers
    /// have exited before it starts, and ephemeral ones are debuggers added later, never the
    /// proxy.
    fn runs_for_the_pod(self, container: &Value) -> bool {
        match self {
            Declared::Main => true,
            Declared::Init => container["restartPolicy"] == "Always",
            Declared::Ephemeral => false,
        }
    }
}

fn declared_containers(spec: &Value) -> impl Iterator<Item = (Declared, &Value)> {
    Declared::ALL.into_iter().flat_map(move |declared| {
        spec[declared.keys().0]
            .as_array()
            .into_iter()
            .flatten()
            .map(move |c| (declared, c))
    })
}

/// The spec's containers, each with the id its status gives (statuses name their container).
/// A status naming none of the spec's is warned about and ignored; a malformed id is warned
/// about and its container kept without one.
fn containers(spec: &Value, status: &Value, mut warn: impl FnMut(String)) -> Vec<ContainerInfo> {
    let mut out: Vec<(Declared, ContainerInfo)> = Vec::new();
    for (declared, c) in declared_containers(spec) {
        match c["name"].as_str() {
            Some(name) => out.push((
                declared,
                ContainerInfo {
                    name: name.to_string(),
                    id: None,
                    proxy: is_proxy_name(c) && declared.runs_for_the_pod(c),
                },
            )),
            None => warn(format!(
                "a container in spec.{} has no name",
                declared.keys().0
            )),
        }
    }
    for declared in Declared::ALL {
        let key = declared.keys().1;
        for s in status[key].as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or_default();
            let Some((_, container)) = out
                .iter_mut()
                .find(|(d, c)| *d == declared && c.name == name)
            else {
                warn(format!(
                    "status.{key} names container {name:?}, which the spec does not declare"
                ));
                continue;
            };
            // Absent or empty until the container has started.
            match s["containerID"].as_str().filter(|id| !id.is_empty()) {
                None => {}
                Some(id) => match ContainerId::from_status(id) {
                    Ok(id) => container.id = Some(id),
                    Err(e) => warn(format!("container {name}: {e}")),
                },
            }
        }
    }
    out.into_iter().map(|(_, c)| c).collect()
}

/// A comma-separated port list; `*` (all ports) is kept as the full range's bounds.
pub fn parse_ports(list: &str) -> Result<BTreeSet<u16>, String> {
    let mut out = BTreeSet::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "*" {
            out.extend([0, u16::MAX]);
            continue;
        }
        out.insert(
            item.parse::<u16>()
                .map_err(|_| format!("{item:?} is not a port"))?,
        );
    }
    Ok(out)
}

fn parse_ranges(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            if item == "*" {
                return Ok("0.0.0.0/0".parse().expect("a valid network"));
            }
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is not an address range"))
        })
        .collect()
}

/// The workload a pod belongs to, from its controller owner reference. A ReplicaSet's name is
/// its Deployment's plus a pod-template hash; a Job's, for one made by a CronJob, its CronJob's
/// plus a schedule timestamp.
fn workload(pod_name: &str, meta: &Value) -> Workload {
    let owners: Vec<&Value> = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let owner = owners
        .iter()
        .find(|o| o["controller"] == true)
        .or(owners.first());
    let Some(owner) = owner else {
        return Workload {
            kind: "Pod".into(),
            name: pod_name.into(),
        };
    };
    let kind = owner["kind"].as_str().unwrap_or("Unknown");
    let name = owner["name"].as_str().unwrap_or(pod_name);
    let strip_suffix = |name: &str, suffix_ok: fn(&str) -> bool| -> Option<String> {
        let (base, suffix) = name.rsplit_once('-')?;
        suffix_ok(suffix).then(|| base.to_string())
    };
    match kind {
        "ReplicaSet" => match strip_suffix(name, |s| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())
        }) {
            Some(deployment) => Workload {
                kind: "Deployment".into(),
                name: deployment,
            },
            None => Workload {
                kind: kind.into(),
                name: name.into(),
            },
        },
        "Job" => match strip_suffix(name, |s| {
            s.len() >= 8 && s.chars().all(|c| c.is_ascii_digit())
        }) {
            Some(cronjob) => Workload {
                kind: "CronJob".into(),
                name: cronjob,
            },
            None => Workload {
                kind: kind.into(),
                name: name.into(),
            },
        },
        _ => Workload {
            kind: kind.into(),
            name: name.into(),
        },
    }
}

fn named_ports(containers: &[&Value]) -> BTreeMap<String, u16> {
    containers
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| {
            let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
            Some((p["name"].as_str()?.to_string(), port))
        })
        .collect()
}

fn probe_ports(containers: &[&Value]) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for c in containers {
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let p = &c[probe];
            for port in [
                &p["httpGet"]["port"],
                &p["tcpSocket"]["port"],
                &p["grpc"]["port"],
            ] {
                let resolved = match port {
                    Value::Number(n) => n.as_u64(),
                    // A named port: the container's port of that name.
                    Value::String(name) => c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|cp| cp["name"] == name.as_str())
                        .and_then(|cp| cp["containerPort"].as_u64()),
                    _ => None,
                };
                if let Some(port) = resolved.and_then(|p| u16::try_from(p).ok()) {
                    out.insert(port);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(meta: Value, spec: Value, status: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status })
    }

    /// A pod that parses without a warning.
    fn parse(v: &Value) -> PodInfo {
        let ParsedPod { pod, warnings } = PodInfo::parse(v).unwrap();
        assert_eq!(warnings, [], "{v}");
        pod
    }

    #[test]
    fn meshed_deployment_pod() {
        let v = pod(
            json!({
                "name": "web-7d9f8b6c5d-x2k4q", "namespace": "shop",
                "labels": { "app": "web", "security.istio.io/tlsMode": "istio" },
                "annotations": {
                    "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
                    "traffic.sidecar.istio.io/excludeOutboundPorts": "5000, 8443",
                    "traffic.sidecar.istio.io/excludeInboundPorts": "8081",
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,192.0.2.7",
                },
                "ownerReferences": [{ "kind": "ReplicaSet", "name": "web-7d9f8b6c5d", "controller": true }],
            }),
            json!({ "containers": [
                { "name": "web", "ports": [{ "name": "health", "containerPort": 8081 }],
                  "readinessProbe": { "httpGet": { "port": "health", "path": "/healthz" } },
                  "livenessProbe": { "tcpSocket": { "port": 8080 } } },
                { "name": "istio-proxy", "securityContext": { "runAsUser": 1337 } },
            ]}),
            json!({ "podIP": "10.244.1.10", "podIPs": [{ "ip": "10.244.1.10" }, { "ip": "fd00::a" }] }),
        );
        let p = parse(&v);
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("shop", "web-7d9f8b6c5d-x2k4q")
        );
        assert_eq!(
            p.ips,
            [
                "10.244.1.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
        assert_eq!(
            p.workload,
            Workload {
                kind: "Deployment".into(),
                name: "web".into()
            }
        );
        assert_eq!(p.mesh, MeshMode::Sidecar);
        assert_eq!(p.proxy_uid, 1337);
        assert_eq!(p.exclude_outbound_ports, BTreeSet::from([5000, 8443]));
        assert_eq!(p.exclude_inbound_ports, BTreeSet::from([8081]));
        assert_eq!(p.exclude_outbound_ranges.len(), 2);
        assert_eq!(p.probe_ports, BTreeSet::from([8080, 8081]));
        assert_eq!(p.label("security.istio.io/tlsMode"), Some("istio"));
        assert_eq!(p.uid, "", "none in this object");
        let names: Vec<(&str, bool)> = p
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c.proxy))
            .collect();
        assert_eq!(names, [("web", false), ("istio-proxy", true)]);
    }

    #[test]
    fn workloads_from_owner_references() {
        let cases = [
            (
                json!([{ "kind": "ReplicaSet", "name": "api-5c7f9d8b4", "controller": true }]),
                "Deployment",
                "api",
            ),
            (
                json!([{ "kind": "StatefulSet", "name": "db", "controller": true }]),
                "StatefulSet",
                "db",
            ),
            (
                json!([{ "kind": "DaemonSet", "name": "meshguard", "controller": true }]),
                "DaemonSet",
                "meshguard",
            ),
            (
                json!([{ "kind": "Job", "name": "report-29132460", "controller": true }]),
                "CronJob",
                "report",
            ),
            (
                json!([{ "kind": "Job", "name": "migrate", "controller": true }]),
                "Job",
                "migrate",
            ),
            (json!([]), "Pod", "lonely"),
            (Value::Null, "Pod", "lonely"),
        ];
        for (owners, kind, name) in cases {
            let v = pod(
                json!({ "name": "lonely", "namespace": "x", "ownerReferences": owners }),
                json!({}),
                json!({}),
            );
            assert_eq!(
                parse(&v).workload,
                Workload {
                    kind: kind.into(),
                    name: name.into()
                },
                "{owners}"
            );
        }
    }

    #[test]
    fn mesh_modes() {
        let injected = json!({ "annotations": { "sidecar.istio.io/status": "{}" } });
        let uninjected = json!({});
        let proxy =
            |args: Value| json!({ "containers": [{ "name": "istio-proxy", "args": args }] });
        let classic = json!({ "containers": [
            { "name": "app" }, { "name": "istio-proxy", "args": ["proxy", "sidecar"] },
        ]});
        let native = json!({
            "initContainers": [
                { "name": "istio-init" },
                { "name": "istio-proxy", "restartPolicy": "Always", "args": ["proxy", "sidecar"] },
            ],
            "containers": [{ "name": "app" }],
        });
        let cases = [
            (
                json!({ "labels": { "security.istio.io/tlsMode": "istio" } }),
                json!({}),
                MeshMode::Sidecar,
            ),
            (injected.clone(), json!({}), MeshMode::Sidecar),
            (injected.clone(), classic, MeshMode::Sidecar),
            (injected.clone(), native.clone(), MeshMode::Sidecar),
            // The istio/gateway chart injects the gateway template; istioctl's gateways and
            // waypoints are not injected; ztunnel's container is istio-proxy too.
            (
                injected.clone(),
                proxy(json!(["proxy", "router"])),
                MeshMode::Gateway,
            ),
            (
                uninjected.clone(),
                proxy(json!(["proxy", "router"])),
                MeshMode::Gateway,
            ),
            (
                uninjected.clone(),
                proxy(json!(["proxy", "waypoint"])),
                MeshMode::Gateway,
            ),
            (
                uninjected.clone(),
                proxy(json!(["proxy", "ztunnel"])),
                MeshMode::Gateway,
            ),
            (uninjected.clone(), proxy(Value::Null), MeshMode::Gateway),
            (
                uninjected.clone(),
                json!({ "containers": [{ "name": "ztunnel" }] }),
                MeshMode::Gateway,
            ),
            (
                injected.clone(),
                proxy(json!(["proxy", "sidecar"])),
                MeshMode::Sidecar,
            ),
            // Only a main container makes the pod the proxy's.
            (uninjected.clone(), native, MeshMode::None),
            (
                json!({ "labels": { "istio.io/dataplane-mode": "ambient" } }),
                json!({}),
                MeshMode::Ambient,
            ),
            (
                json!({ "labels": { "security.istio.io/tlsMode": "disabled" } }),
                json!({}),
                MeshMode::None,
            ),
            (
                uninjected,
                json!({ "containers": [{ "name": "app" }] }),
                MeshMode::None,
            ),
        ];
        for (extra, spec, want) in cases {
            let mut meta = json!({ "name": "p", "namespace": "n" });
            for key in ["labels", "annotations"] {
                meta[key] = extra[key].clone();
            }
            let p = parse(&pod(meta, spec.clone(), json!({})));
            assert_eq!(p.mesh, want, "{extra} {spec}");
            assert_eq!(
                p.is_proxy_pod(),
                matches!(want, MeshMode::Sidecar | MeshMode::Gateway)
            );
        }
    }

    const APP_ID: &str = "4f1c9a2e7b3d58e6a0c1f4d92b7e3a5c8d6f0b1e2a4c7d9f3b5e8a1c6d2f4b7e";
    const PROXY_ID: &str = "b8e2d6f0a4c9137e5b2d8f6a0c3e9b1d7f4a2c8e6b0d3f9a1c5e7b2d4f8a6c0e";
    const INIT_ID: &str = "1d7a3f9c5e0b2d8a6f4c1e9b7d3a5f0c8e2b6d4a9f1c7e3b5d0a8f2c6e4b9d1a";

    fn container(name: &str, id: Option<&str>, proxy: bool) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            id: id.map(|id| ContainerId::from_hex(id).unwrap()),
            proxy,
        }
    }

    #[test]
    fn containers_with_their_ids() {
        let v = pod(
            json!({ "name": "web-1", "namespace": "shop", "uid": "b3e9a8d2-51c4-4f0a-a7e6-9c2d4f1b8e30",
                    "labels": { "app": "web", "version": 2 } }),
            json!({
                "initContainers": [
                    { "name": "istio-init" },
                    { "name": "istio-proxy", "restartPolicy": "Always",
                      "securityContext": { "runAsUser": 1337 },
                      "readinessProbe": { "httpGet": { "port": 15021 } } },
                ],
                "containers": [{ "name": "web" }, { "name": "ztunnel" }],
                "ephemeralContainers": [{ "name": "debugger-x7" }],
            }),
            json!({
                "initContainerStatuses": [
                    { "name": "istio-init", "containerID": format!("containerd://{INIT_ID}"),
                      "state": { "terminated": { "exitCode": 0, "reason": "Completed" } } },
                    { "name": "istio-proxy", "containerID": format!("containerd://{PROXY_ID}") },
                ],
                "containerStatuses": [
                    { "name": "web", "containerID": format!("containerd://{}", APP_ID.to_uppercase()) },
                    { "name": "ztunnel", "containerID": "", "state": { "waiting": { "reason": "PodInitializing" } } },
                ],
                "ephemeralContainerStatuses": [{ "name": "debugger-x7" }],
            }),
        );
        let p = parse(&v);
        assert_eq!(
            p.containers,
            [
                container("istio-init", Some(INIT_ID), false),
                container("istio-proxy", Some(PROXY_ID), true),
                container("web", Some(APP_ID), false),
                container("ztunnel", None, true),
                container("debugger-x7", None, false),
            ]
        );
        assert_eq!(p.uid, "b3e9a8d2-51c4-4f0a-a7e6-9c2d4f1b8e30");
        assert_eq!(p.label("app"), Some("web"));
        assert_eq!(p.label("version"), None, "not a string");
        assert_eq!(p.label("missing"), None);
        // The native sidecar's uid and probe count like a main container's.
        assert_eq!((p.proxy_uid, p.proxy_uid_explicit), (1337, true));
        assert_eq!(p.probe_ports, BTreeSet::from([15021]));

        // A plain init container runs to completion first: whatever its name, not the proxy.
        let v = pod(
            json!({ "name": "p", "namespace": "n" }),
            json!({ "initContainers": [{ "name": "istio-proxy" }], "containers": [{ "name": "app" }] }),
            json!({}),
        );
        assert_eq!(
            parse(&v).containers,
            [
                container("istio-proxy", None, false),
                container("app", None, false)
            ]
        );
        assert!(PodInfo::default().containers.is_empty());
        assert_eq!(PodInfo::default().proxy_uid, DEFAULT_PROXY_UID);
    }

    #[test]
    fn container_flaws_are_warnings_not_errors() {
        let v = pod(
            json!({ "name": "p", "namespace": "shop" }),
            json!({
                "initContainers": [{ "image": "busybox" }],
                "containers": [{ "name": "app" }, { "name": "istio-proxy" }],
            }),
            json!({ "containerStatuses": [
                { "name": "app", "containerID": "rkt://4f1c9a2e7b3d" },
                { "name": "istio-proxy", "containerID": "containerd://xyz" },
                { "name": "gone", "containerID": format!("containerd://{APP_ID}") },
                { "containerID": format!("containerd://{APP_ID}") },
            ]}),
        );
        let ParsedPod { pod, warnings } = PodInfo::parse(&v).unwrap();
        assert_eq!(
            pod.containers,
            [
                container("app", None, false),
                container("istio-proxy", None, true)
            ]
        );
        let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "pod shop/p: a container in spec.initContainers has no name",
                "pod shop/p: container app: containerID \"rkt://4f1c9a2e7b3d\": runtime \"rkt\" is not one of containerd, cri-o, docker",
                "pod shop/p: container istio-proxy: containerID \"containerd://xyz\": \"xyz\" is not a container id (12 to 64 hex digits)",
                "pod shop/p: status.containerStatuses names container \"gone\", which the spec does not declare",
                "pod shop/p: status.containerStatuses names container \"\", which the spec does not declare",
            ]
        );
    }

    #[test]
    fn malformed_pods_name_the_object() {
        let cases = [
            (json!({ "kind": "Pod", "metadata": { "namespace": "shop" } }), "pod shop/<no name>: metadata.name is missing"),
            (json!({ "kind": "Service", "metadata": { "name": "s", "namespace": "shop" } }), "pod shop/s: kind is \"Service\", not Pod"),
            (
                pod(json!({ "name": "p", "namespace": "shop" }), json!({}), json!({ "podIP": "10.0.0.999" })),
                "pod shop/p: podIP \"10.0.0.999\" is not an address",
            ),
            (
                pod(json!({ "name": "p", "namespace": "shop", "annotations": { "traffic.sidecar.istio.io/excludeOutboundPorts": "80,http" } }), json!({}), json!({})),
                "pod shop/p: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"http\" is not a port",
            ),
            (
                pod(json!({ "name": "p", "namespace": "shop", "annotations": { "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33" } }), json!({}), json!({})),
                "pod shop/p: annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/33\" is not an address range",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(PodInfo::parse(&v).unwrap_err().to_string(), want);
        }
        // Whatever the shape, never a panic.
        for v in [
            json!(null),
            json!(42),
            json!([]),
            json!({ "metadata": 7, "spec": "x", "status": [] }),
        ] {
            assert!(PodInfo::parse(&v).is_err());
        }
    }

    #[test]
    fn a_pod_without_an_address_yet_is_fine() {
        let p = parse(&pod(
            json!({ "name": "p", "namespace": "n" }),
            json!({}),
            json!({ "phase": "Pending" }),
        ));
        assert!(p.ips.is_empty());
    }
}
