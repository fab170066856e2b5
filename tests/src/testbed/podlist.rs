//! The pods a node runs, as `kubectl get pods -o json` prints them: what meshguard's inventory
//! reads in place of the API server, here and in the demo.

use serde_json::{json, Value};

use super::{Mesh, Node, Pod, PodSpec, PROXY_CONTAINER, PROXY_IMAGE};

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

pub fn pod_list(node: &Node) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": { "resourceVersion": "" },
        "items": node.pods.iter().map(|p| pod(node, p)).collect::<Vec<_>>(),
    })
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

fn pod(node: &Node, pod: &Pod) -> Value {
    let s = &pod.spec;
    let template_hash = hash(&s.deployment, 10);
    let mut labels = json!({ "app": s.deployment, "pod-template-hash": template_hash });
    let mut annotations = json!({});
    let mut containers = vec![json!({
        "name": s.deployment,
        "image": image(s, &s.deployment),
        "ports": s.apps.iter().map(|a| match a {
            super::App::Http(p) | super::App::Tls(p) => json!({ "containerPort": p, "protocol": "TCP" }),
        }).collect::<Vec<_>>(),
    })];
    if let Some(port) = s.probe_port {
        containers[0]["readinessProbe"] = json!({ "httpGet": { "path": "/healthz", "port": port, "scheme": "HTTP" }, "periodSeconds": 10 });
    }
    if let Mesh::Sidecar { .. } = s.mesh {
        labels["security.istio.io/tlsMode"] = json!("istio");
        labels["service.istio.io/canonical-name"] = json!(s.deployment);
        annotations["sidecar.istio.io/status"] = json!(SIDECAR_STATUS);
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
        containers.push(json!({
            "name": PROXY_CONTAINER,
            "image": PROXY_IMAGE,
            "ports": [{ "containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP" }],
            "securityContext": { "runAsUser": super::PROXY_UID, "runAsGroup": super::PROXY_UID },
        }));
    }
    let name = pod_name(pod);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": s.namespace,
            "uid": pod.uid,
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
        "spec": {
            "nodeName": node.name,
            "serviceAccountName": s.service_account,
            "containers": containers,
        },
        "status": {
            "phase": "Running",
            "hostIP": node.ip.to_string(),
            "hostIPs": [{ "ip": node.ip.to_string() }],
            "podIP": pod.ip.to_string(),
            "podIPs": [{ "ip": pod.ip.to_string() }],
        },
    })
}
