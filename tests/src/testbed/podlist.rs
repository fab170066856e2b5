//! The pods a node runs, as `kubectl get pods -o json` prints them: what meshguard's inventory
//! reads in place of the API server, here and in the demo. Each container's status carries the
//! id of the container whose cgroup the testbed made, as the kubelet reports containerd's.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::{InboundMode, Mesh, Node, Pod, PodSpec, PROXY_CONTAINER, PROXY_IMAGE};

/// The init container Istio's injector adds to install the capture rules; it has exited (and
/// its cgroup is gone) by the time the pod runs.
const INIT_CONTAINER: &str = "istio-init";
/// What Istio's injector writes on a pod it injected.
const SIDECAR_STATUS: &str = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A stable, Kubernetes-looking hash from a name (pod-template-hash, name suffixes).
fn hash(s: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = fnv1a(s.bytes());
    let mut out = String::new();
    for _ in 0..len {
        out.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
        if h == 0 {
            h = 0x9e37_79b9_7f4a_7c15;
        }
    }
    out
}

/// `len` stable lowercase hex digits from a name: uids, container ids, image digests.
fn hex_digest(s: &str, len: usize) -> String {
    let mut out = String::new();
    for round in 0u64.. {
        if out.len() >= len {
            break;
        }
        out += &format!("{:016x}", fnv1a(s.bytes().chain(round.to_le_bytes())));
    }
    out.truncate(len);
    out
}

/// A stable UUID (version 4 form, as the API server makes uids) from a name.
fn uuid(s: &str) -> String {
    let h = hex_digest(s, 32);
    let variant = ["8", "9", "a", "b"][usize::from(h.as_bytes()[16]) % 4];
    format!(
        "{}-{}-4{}-{variant}{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    )
}

/// The pod's `metadata.uid`.
pub fn pod_uid(spec: &PodSpec) -> String {
    uuid(&format!("pod/{}/{}", spec.namespace, spec.name))
}

/// containerd's id for a container of the pod: 64 hex digits.
pub fn container_id(spec: &PodSpec, container: &str) -> String {
    hex_digest(
        &format!("container/{}/{}/{container}", spec.namespace, spec.name),
        64,
    )
}

pub fn image(spec: &PodSpec, container: &str) -> String {
    if container == PROXY_CONTAINER {
        PROXY_IMAGE.to_string()
    } else {
        format!("registry.example/{}:1.0", spec.deployment)
    }
}

/// `repo@sha256:<digest>` of an image, as the runtime reports the image it pulled.
fn image_id(image: &str) -> String {
    let repo = image.rsplit_once(':').map_or(image, |(repo, _tag)| repo);
    format!(
        "{repo}@sha256:{}",
        hex_digest(&format!("image/{image}"), 64)
    )
}

/// A time as the API server writes it (RFC 3339, UTC, whole seconds).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, time) = ((secs / 86_400) as i64, secs % 86_400);
    // The proleptic Gregorian date of a day count (Howard Hinnant's civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

/// `podIPs`/`hostIPs`: IPv4 first, then a dual-stack pod's IPv6, as the kubelet lists them.
fn ips(ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Vec<Value> {
    std::iter::once(ip.to_string())
        .chain(ip6.map(|ip6| ip6.to_string()))
        .map(|ip| json!({ "ip": ip }))
        .collect()
}

fn container_statuses(pod: &Pod) -> Vec<Value> {
    pod.containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "state": { "running": { "startedAt": rfc3339(c.started) } },
                "lastState": {},
                "ready": true,
                "started": true,
                "restartCount": 0,
                "image": c.image,
                "imageID": image_id(&c.image),
                "containerID": format!("containerd://{}", c.id),
            })
        })
        .collect()
}

/// istio-init, run to completion before the pod's containers started.
fn init_container_status(pod: &Pod) -> Value {
    let id = format!("containerd://{}", container_id(&pod.spec, INIT_CONTAINER));
    let at = rfc3339(pod.containers[0].started);
    json!({
        "name": INIT_CONTAINER,
        "state": { "terminated": {
            "exitCode": 0, "reason": "Completed", "startedAt": at, "finishedAt": at, "containerID": id,
        } },
        "lastState": {},
        "ready": true,
        "started": false,
        "restartCount": 0,
        "image": PROXY_IMAGE,
        "imageID": image_id(PROXY_IMAGE),
        "containerID": id,
    })
}

/// The node's pods, the mesh policy declared for them and the Services its rules name, as
/// `kubectl get pods,peerauthentications,destinationrules,services -o json` lists them.
pub fn pod_list(node: &Node) -> Value {
    let mut items: Vec<Value> = node.pods.iter().map(|p| pod(node, p)).collect();
    items.extend(peer_authentications(node));
    items.extend(destination_rules(node));
    items.extend(services(node));
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": { "resourceVersion": "" },
        "items": items,
    })
}

/// What an operator would have applied for the sidecars' inbound modes: per namespace with
/// sidecars, a namespace-wide PeerAuthentication (STRICT where any sidecar is strict), and
/// one per workload whose sidecar differs from it.
fn peer_authentications(node: &Node) -> Vec<Value> {
    let word = |mode: InboundMode| match mode {
        InboundMode::Strict => "STRICT",
        InboundMode::Permissive => "PERMISSIVE",
    };
    let sidecars: Vec<(&PodSpec, InboundMode)> = node
        .pods
        .iter()
        .filter_map(|p| match p.spec.mesh {
            Mesh::Sidecar { inbound, .. } => Some((&p.spec, inbound)),
            _ => None,
        })
        .collect();
    let namespaces: BTreeSet<&str> = sidecars.iter().map(|(s, _)| s.namespace.as_str()).collect();
    let policy = |namespace: &str, name: &str, selector: Option<&str>, mode: InboundMode| {
        let mut spec = json!({ "mtls": { "mode": word(mode) } });
        if let Some(app) = selector {
            spec["selector"] = json!({ "matchLabels": { "app": app } });
        }
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uuid(&format!("pa/{namespace}/{name}")),
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": spec,
        })
    };
    let mut out = Vec::new();
    for namespace in namespaces {
        let here = || {
            sidecars
                .iter()
                .filter(move |(s, _)| s.namespace == namespace)
        };
        let default = if here().any(|(_, m)| *m == InboundMode::Strict) {
            InboundMode::Strict
        } else {
            InboundMode::Permissive
        };
        out.push(policy(namespace, "default", None, default));
        let differing: BTreeSet<&str> = here()
            .filter(|(_, m)| *m != default)
            .map(|(s, _)| s.deployment.as_str())
            .collect();
        for deployment in differing {
            let mode = if default == InboundMode::Strict {
                InboundMode::Permissive
            } else {
                InboundMode::Strict
            };
            out.push(policy(namespace, deployment, Some(deployment), mode));
        }
    }
    out
}

/// What an operator would have applied for the services a sidecar reaches in plaintext: a
/// DestinationRule per service, in its namespace, by its short name, turning TLS off.
fn destination_rules(node: &Node) -> Vec<Value> {
    let peers: BTreeSet<(&str, &str)> = node
        .pods
        .iter()
        .flat_map(|p| &p.spec.plaintext_peers)
        .map(|peer| (peer.namespace.as_str(), peer.service.as_str()))
        .collect();
    peers
        .into_iter()
        .map(|(namespace, service)| {
            let name = format!("{service}-plaintext");
            json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": uuid(&format!("dr/{namespace}/{name}")),
                    "resourceVersion": "1",
                    "generation": 1,
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                },
                "spec": {
                    "host": service,
                    "trafficPolicy": { "tls": { "mode": "DISABLE" } },
                },
            })
        })
        .collect()
}

/// A Service per deployment that serves something, selecting its pods by `app`, each port
/// targeting the container port's name.
fn services(node: &Node) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    node.pods
        .iter()
        .map(|p| &p.spec)
        .filter(|s| !s.apps.is_empty() && seen.insert((&s.namespace, &s.deployment)))
        .map(|s| {
            let ports: Vec<Value> = s
                .apps
                .iter()
                .map(|a| {
                    json!({ "name": a.port_name(), "port": a.port(), "protocol": a.protocol(),
                            "targetPort": a.port_name() })
                })
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": s.deployment,
                    "namespace": s.namespace,
                    "uid": uuid(&format!("svc/{}/{}", s.namespace, s.deployment)),
                    "resourceVersion": "1",
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": { "app": s.deployment },
                },
                "spec": {
                    "type": "ClusterIP",
                    "selector": { "app": s.deployment },
                    "ports": ports,
                    "sessionAffinity": "None",
                },
            })
        })
        .collect()
}

/// The name the pod would have in Kubernetes: its deployment, the ReplicaSet hash, a suffix.
pub fn pod_name(pod: &Pod) -> String {
    let s = &pod.spec;
    format!(
        "{}-{}-{}",
        s.deployment,
        hash(&s.deployment, 10),
        hash(&format!("pod/{}/{}", s.namespace, s.name), 5)
    )
}

/// A container's spec: the application's ports and probe, or the proxy's ports and uid.
fn container(s: &PodSpec, name: &str) -> Value {
    let port = |port: u16, protocol: &str| json!({ "containerPort": port, "protocol": protocol });
    if name != PROXY_CONTAINER {
        let ports: Vec<Value> = s
            .apps
            .iter()
            .map(|a| {
                let mut p = port(a.port(), a.protocol());
                p["name"] = json!(a.port_name());
                p
            })
            .collect();
        let mut app = json!({
            "name": name,
            "image": image(s, name),
            "ports": ports,
        });
        if let Some(port) = s.probe_port {
            app["readinessProbe"] = json!({ "httpGet": { "path": "/healthz", "port": port, "scheme": "HTTP" }, "periodSeconds": 10 });
        }
        return app;
    }
    let mut ports =
        vec![json!({ "containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP" })];
    if let Mesh::Gateway { port: gateway, .. } = s.mesh {
        ports.push(port(gateway, "TCP"));
    }
    json!({
        "name": PROXY_CONTAINER,
        "image": PROXY_IMAGE,
        "ports": ports,
        "securityContext": { "runAsUser": super::PROXY_UID, "runAsGroup": super::PROXY_UID },
    })
}

fn pod(node: &Node, pod: &Pod) -> Value {
    let s = &pod.spec;
    let template_hash = hash(&s.deployment, 10);
    let mut labels = json!({ "app": s.deployment, "pod-template-hash": template_hash });
    for (key, value) in &s.labels {
        labels[key] = json!(value);
    }
    let mut annotations = json!({});
    let mut init_containers = Vec::new();
    let containers: Vec<Value> = s
        .containers()
        .into_iter()
        .map(|name| container(s, name))
        .collect();
    if let Mesh::Gateway { .. } = s.mesh {
        // The gateway chart's labels; it is not injected, so no sidecar status.
        labels["istio"] = json!("ingressgateway");
        labels["service.istio.io/canonical-name"] = json!(s.deployment);
        labels["sidecar.istio.io/inject"] = json!("false");
    }
    if let Mesh::Sidecar { .. } = s.mesh {
        labels["security.istio.io/tlsMode"] = json!("istio");
        labels["service.istio.io/canonical-name"] = json!(s.deployment);
        annotations["sidecar.istio.io/status"] = json!(SIDECAR_STATUS);
        annotations["kubectl.kubernetes.io/default-container"] = json!(s.deployment);
        annotations["kubectl.kubernetes.io/default-logs-container"] = json!(s.deployment);
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if !s.exclude.outbound_ports.is_empty() {
            annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] =
                json!(list(&s.exclude.outbound_ports));
        }
        if !s.exclude.inbound_ports.is_empty() {
            annotations["traffic.sidecar.istio.io/excludeInboundPorts"] =
                json!(list(&s.exclude.inbound_ports));
        }
        if !s.exclude.outbound_ip_ranges.is_empty() {
            annotations["traffic.sidecar.istio.io/excludeOutboundIPRanges"] =
                json!(s.exclude.outbound_ip_ranges.join(","));
        }
        init_containers.push(json!({
            "name": INIT_CONTAINER,
            "image": PROXY_IMAGE,
            "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"],
            "securityContext": { "capabilities": { "add": ["NET_ADMIN", "NET_RAW"] } },
        }));
    }
    let name = pod_name(pod);
    let created = rfc3339(pod.containers[0].started);
    let conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(|kind| json!({ "type": kind, "status": "True", "lastTransitionTime": created }));
    let mut spec = json!({
        "nodeName": node.name,
        "serviceAccountName": s.service_account,
        "containers": containers,
    });
    let mut status = json!({
        "phase": "Running",
        "conditions": conditions,
        "hostIP": node.ip.to_string(),
        "hostIPs": ips(node.ip, node.ip6),
        "podIP": pod.ip.to_string(),
        "podIPs": ips(pod.ip, pod.ip6),
        "startTime": created,
        "containerStatuses": container_statuses(pod),
        "qosClass": "BestEffort",
    });
    if !init_containers.is_empty() {
        spec["initContainers"] = json!(init_containers);
        status["initContainerStatuses"] = json!([init_container_status(pod)]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": s.namespace,
            "uid": pod.uid,
            "creationTimestamp": created,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": format!("{}-{template_hash}", s.deployment),
                "uid": uuid(&format!("rs/{}/{}", s.namespace, s.deployment)),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_read_as_the_api_server_writes_them() {
        let at = |secs| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_825_600), "2000-02-29T12:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn ids_have_the_runtime_s_shapes() {
        let spec = PodSpec::new("shop", "web");
        let id = container_id(&spec, "istio-proxy");
        assert_eq!(id.len(), 64);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(id, container_id(&spec, "web"));
        let uid = pod_uid(&spec);
        let groups: Vec<usize> = uid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{uid}");
        assert_eq!(&uid[14..15], "4", "{uid}");
        assert!("89ab".contains(&uid[19..20]), "{uid}");
        assert_eq!(
            image_id("docker.io/istio/proxyv2:1.24.0")[..31],
            *"docker.io/istio/proxyv2@sha256:"
        );
    }
}
