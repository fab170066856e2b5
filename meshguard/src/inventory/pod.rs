//! A Kubernetes Pod object, as the API server or `kubectl get pods -o json` gives it, reduced
//! to what verdicts need: addresses, workload, mesh intent, probe ports. Parsing is lenient
//! about what it does not need and strict about what it does, naming the object on error.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

/// The uid Istio's sidecar runs as, unless the pod or its namespace says otherwise.
pub const DEFAULT_PROXY_UID: u32 = 1337;

const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
const TLS_MODE: &str = "security.istio.io/tlsMode";
const AMBIENT_MODE: &str = "istio.io/dataplane-mode";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const EXCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const PROXY_CONTAINER: &str = "istio-proxy";

/// How a pod takes part in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    /// Not in the mesh.
    None,
    /// An injected Envoy sidecar with iptables capture.
    Sidecar,
    /// Ambient: ztunnel on the node carries its traffic over HBONE.
    Ambient,
}

/// The owner that gives a pod its stable name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
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

    pub fn parse(v: &Value) -> Result<PodInfo, PodError> {
        let meta = &v["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let namespace = meta["namespace"].as_str().unwrap_or("default");
        let err = |what: String| PodError {
            object: format!(
                "{namespace}/{}",
                if name.is_empty() { "<no name>" } else { name }
            ),
            what,
        };
        if v["kind"].as_str().is_some_and(|k| k != "Pod") {
            return Err(err(format!("kind is {}, not Pod", v["kind"])));
        }
        if name.is_empty() {
            return Err(err("metadata.name is missing".into()));
        }
        let annotations = &meta["annotations"];
        let labels = &meta["labels"];
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

        let mesh = if annotations[SIDECAR_STATUS].is_string() || labels[TLS_MODE] == "istio" {
            MeshMode::Sidecar
        } else if labels[AMBIENT_MODE] == "ambient" {
            MeshMode::Ambient
        } else {
            MeshMode::None
        };

        let containers: Vec<&Value> = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let explicit_uid = containers
            .iter()
            .find(|c| c["name"] == PROXY_CONTAINER)
            .and_then(|c| c["securityContext"]["runAsUser"].as_u64())
            .and_then(|u| u32::try_from(u).ok());

        let ports = |key: &str| -> Result<BTreeSet<u16>, PodError> {
            match annotations[key].as_str() {
                None => Ok(BTreeSet::new()),
                Some(list) => parse_ports(list).map_err(|e| err(format!("annotation {key}: {e}"))),
            }
        };
        let exclude_outbound_ranges = match annotations[EXCLUDE_OUTBOUND_RANGES].as_str() {
            None => Vec::new(),
            Some(list) => parse_ranges(list)
                .map_err(|e| err(format!("annotation {EXCLUDE_OUTBOUND_RANGES}: {e}")))?,
        };

        Ok(PodInfo {
            namespace: namespace.to_string(),
            name: name.to_string(),
            ips,
            host_ips,
            host_network,
            workload: workload(name, meta),
            mesh,
            proxy_uid: explicit_uid.unwrap_or(DEFAULT_PROXY_UID),
            proxy_uid_explicit: explicit_uid.is_some(),
            exclude_outbound_ports: ports(EXCLUDE_OUTBOUND_PORTS)?,
            exclude_inbound_ports: ports(EXCLUDE_INBOUND_PORTS)?,
            exclude_outbound_ranges,
            probe_ports: probe_ports(&containers),
        })
    }
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
        let p = PodInfo::parse(&v).unwrap();
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
                PodInfo::parse(&v).unwrap().workload,
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
        let cases = [
            (
                json!({ "labels": { "security.istio.io/tlsMode": "istio" } }),
                MeshMode::Sidecar,
            ),
            (
                json!({ "annotations": { "sidecar.istio.io/status": "{}" } }),
                MeshMode::Sidecar,
            ),
            (
                json!({ "labels": { "istio.io/dataplane-mode": "ambient" } }),
                MeshMode::Ambient,
            ),
            (
                json!({ "labels": { "security.istio.io/tlsMode": "disabled" } }),
                MeshMode::None,
            ),
            (json!({}), MeshMode::None),
        ];
        for (extra, want) in cases {
            let mut meta = json!({ "name": "p", "namespace": "n" });
            for key in ["labels", "annotations"] {
                meta[key] = extra[key].clone();
            }
            assert_eq!(
                PodInfo::parse(&pod(meta, json!({}), json!({})))
                    .unwrap()
                    .mesh,
                want,
                "{extra}"
            );
        }
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
        let p = PodInfo::parse(&pod(
            json!({ "name": "p", "namespace": "n" }),
            json!({}),
            json!({ "phase": "Pending" }),
        ))
        .unwrap();
        assert!(p.ips.is_empty());
    }
}
