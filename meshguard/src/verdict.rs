//! The verdict engine: one flow's evidence from the kernel, joined with what the inventory says
//! its two ends intend, gives a verdict, a reason code and one sentence for a person. Pure: the
//! same inputs always give the same answer, and every rule has a table test below.
//!
//! Each socket is judged on its own evidence, so that a bypass is caught at whichever end of a
//! connection runs meshguard. The rules, in order:
//! 1. no payload yet: `pending`;
//! 2. loopback inside a pod (or egress redirected to loopback): `in-pod`;
//! 3. plaintext the policy allows (kubelet probes, DNS, metrics, control plane): `expected`;
//! 4. TLS with the mesh's ALPN (Istio) or to the HBONE port: `mtls`;
//! 5. a meshed pod's socket: its proxy's (`plaintext`, `bypass-*` by the peer), an application
//!    running as the proxy's uid (`bypass-*`, `proxy-uid-app`), or an application talking past
//!    its sidecar (`bypass-*`: `excluded-port`, `excluded-ip-range`, `no-capture`);
//! 6. an unmeshed end facing a meshed pod: `plaintext`/`unmeshed` with who was unmeshed, or a
//!    `bypass-*` when the meshed pod's own exclusions explain it;
//! 7. otherwise `unmeshed`.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    fingerprint::EncryptedProtocol,
    flow::Encryption,
    inventory::{Identity, MeshMode, PodInfo},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Mtls,
    BypassPlaintext,
    BypassTls,
    Plaintext,
    Unmeshed,
    Expected,
    InPod,
    Pending,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Mtls => "mtls",
            Verdict::BypassPlaintext => "bypass-plaintext",
            Verdict::BypassTls => "bypass-tls",
            Verdict::Plaintext => "plaintext",
            Verdict::Unmeshed => "unmeshed",
            Verdict::Expected => "expected",
            Verdict::InPod => "in-pod",
            Verdict::Pending => "pending",
        }
    }
}

/// How the flow's bytes travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Through the pod's proxy.
    Sidecar,
    /// Straight between the application and the network.
    Direct,
    /// Inside one pod (application and its sidecar, over loopback).
    InPod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This socket opened the connection.
    Egress,
    /// This socket accepted it.
    Ingress,
}

/// What the kernel saw of one socket.
#[derive(Clone, Debug)]
pub struct Evidence<'a> {
    pub direction: Direction,
    pub udp: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub uid: Option<u32>,
    pub comm: Option<&'a str>,
    /// Where egress really went, when netfilter redirected it.
    pub redirect: Option<SocketAddr>,
    pub encryption: Encryption,
    /// ALPN protocols the ClientHello offered.
    pub alpn: &'a [String],
    /// Whether the ClientHello was seen whole enough to know its ALPN: not when the flow was
    /// recovered from the first bytes the kernel's flow map keeps.
    pub alpn_seen: bool,
}

impl Evidence<'_> {
    /// The server's port: the remote one if this socket connected, the local one if it accepted.
    fn service_port(&self) -> u16 {
        match self.direction {
            Direction::Egress => self.remote.port(),
            Direction::Ingress => self.local.port(),
        }
    }
}

/// Plaintext the mesh owner expects: by port, from anyone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedRule {
    pub rule: String,
    pub ports: Vec<u16>,
}

/// What the verdicts take as given; `--policy FILE` (JSON) overrides any of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Process names (`comm`) of the proxy; a trailing `*` matches a prefix (Envoy names its
    /// worker threads `wrk:worker_N`).
    pub proxy_processes: Vec<String>,
    /// ALPN prefixes that mark sidecar-to-sidecar mTLS.
    pub mesh_alpn_prefixes: Vec<String>,
    /// Ambient's HBONE port (mTLS tunnels between ztunnels and waypoints).
    pub hbone_port: u16,
    /// The sidecar's outbound capture port and the source it hands inbound traffic from.
    pub outbound_capture_port: u16,
    pub inbound_passthrough_source: IpAddr,
    /// Kubelet probes from the node to a pod's declared probe ports are expected plaintext.
    pub probes: bool,
    pub expected: Vec<ExpectedRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            proxy_processes: ["envoy", "wrk:*", "pilot-agent", "ztunnel"]
                .map(String::from)
                .to_vec(),
            mesh_alpn_prefixes: vec!["istio".into()],
            hbone_port: 15008,
            outbound_capture_port: 15001,
            inbound_passthrough_source: IpAddr::from([127, 0, 0, 6]),
            probes: true,
            expected: vec![
                ExpectedRule {
                    rule: "dns".into(),
                    ports: vec![53],
                },
                ExpectedRule {
                    rule: "metrics".into(),
                    ports: vec![15020, 15090],
                },
                ExpectedRule {
                    rule: "control-plane".into(),
                    ports: vec![15010, 15014],
                },
            ],
        }
    }
}

impl Policy {
    fn is_proxy_process(&self, comm: Option<&str>) -> bool {
        // Without process attribution, the proxy's uid is all there is to go on.
        let Some(comm) = comm else { return true };
        self.proxy_processes
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => comm.starts_with(prefix),
                None => comm == p,
            })
    }

    fn mesh_tls(&self, ev: &Evidence) -> Option<&'static str> {
        if ev.encryption != Encryption::Tls {
            return None;
        }
        if ev.alpn.iter().any(|a| {
            self.mesh_alpn_prefixes
                .iter()
                .any(|p| a.starts_with(p.as_str()))
        }) {
            return Some("istio-mtls");
        }
        (ev.service_port() == self.hbone_port).then_some("hbone")
    }
}

/// The verdict on one flow, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: &'static str,
    pub path: Path,
    pub detail: String,
}

fn decision(verdict: Verdict, reason: &'static str, path: Path, detail: String) -> Decision {
    Decision {
        verdict,
        reason,
        path,
        detail,
    }
}

/// How a person would name one end.
fn name(id: Identity, addr: SocketAddr) -> String {
    match id {
        Identity::Pod(p) => format!("{}/{}", p.namespace, p.name),
        Identity::Node => format!("the node ({})", addr.ip()),
        Identity::Unknown => addr.ip().to_string(),
    }
}

fn sidecar(id: Identity<'_>) -> Option<&PodInfo> {
    // TODO(gateway): a gateway's proxy is its workload and has no capture; judged as a
    // sidecar until the verdict rules tell the two apart.
    id.pod().filter(|p| p.is_proxy_pod())
}

fn in_range(pod: &PodInfo, ip: IpAddr) -> bool {
    pod.exclude_outbound_ranges
        .iter()
        .any(|net| net.contains(&ip))
}

fn bypass(ev: &Evidence, cause: &'static str) -> (Verdict, &'static str) {
    if ev.encryption.is_encrypted() {
        (Verdict::BypassTls, "app-tls")
    } else {
        (Verdict::BypassPlaintext, cause)
    }
}

pub fn decide(ev: &Evidence, local: Identity, remote: Identity, policy: &Policy) -> Decision {
    let me = name(local, ev.local);
    let peer = format!("{}:{}", name(remote, ev.remote), ev.remote.port());
    let enc = match ev.encryption {
        Encryption::Tls => "TLS",
        Encryption::Encrypted(EncryptedProtocol::Ssh) => "SSH",
        Encryption::Encrypted(EncryptedProtocol::Quic) => "QUIC",
        Encryption::Encrypted(EncryptedProtocol::Dtls) => "DTLS",
        Encryption::Plaintext | Encryption::Unknown => "plaintext",
    };

    // 1. Nothing to judge yet.
    if ev.encryption == Encryption::Unknown {
        return decision(
            Verdict::Pending,
            "no-payload",
            Path::Direct,
            format!("{me} and {peer} have exchanged no payload yet"),
        );
    }

    // 2. Inside one pod: loopback, or an application's egress redirected to its sidecar.
    let loopback = |ip: IpAddr| ip.is_loopback() || ip == policy.inbound_passthrough_source;
    if let Some(to) = ev.redirect.filter(|r| r.ip().is_loopback()) {
        return decision(Verdict::InPod, "app-to-sidecar", Path::InPod, format!("{me}'s application connected to {peer}; netfilter redirected it to its sidecar on {to}"));
    }
    if loopback(ev.local.ip()) || loopback(ev.remote.ip()) {
        let handoff = ev.local.ip() == policy.inbound_passthrough_source
            || ev.remote.ip() == policy.inbound_passthrough_source;
        let capture = ev.local.port() == policy.outbound_capture_port
            || ev.remote.port() == policy.outbound_capture_port;
        let reason = match (handoff, capture) {
            (true, _) => "sidecar-to-app",
            (_, true) => "app-to-sidecar",
            _ => "loopback",
        };
        return decision(
            Verdict::InPod,
            reason,
            Path::InPod,
            format!(
                "{enc} over loopback between {} and {}, inside one pod",
                ev.local, ev.remote
            ),
        );
    }

    // 3. Plaintext the policy expects.
    if ev.encryption == Encryption::Plaintext {
        let port = ev.service_port();
        if policy.probes {
            let probed = match ev.direction {
                Direction::Egress => {
                    matches!(local, Identity::Node)
                        && remote.pod().is_some_and(|p| p.probe_ports.contains(&port))
                }
                Direction::Ingress => {
                    matches!(remote, Identity::Node)
                        && local.pod().is_some_and(|p| p.probe_ports.contains(&port))
                }
            };
            if probed {
                return decision(Verdict::Expected, "probe", Path::Direct, format!("kubelet probe between {me} and {peer}: port {port} is a declared probe port"));
            }
        }
        if let Some(rule) = policy.expected.iter().find(|r| r.ports.contains(&port)) {
            return decision(
                Verdict::Expected,
                "policy",
                Path::Direct,
                format!(
                    "plaintext on port {port} is allowed by policy rule {:?}",
                    rule.rule
                ),
            );
        }
    }

    // 4. Mesh mTLS.
    if let Some(reason) = policy.mesh_tls(ev) {
        let path = if sidecar(local).is_some() {
            Path::Sidecar
        } else {
            Path::Direct
        };
        return decision(
            Verdict::Mtls,
            reason,
            path,
            format!(
                "mesh mTLS between {me} and {peer} (ALPN {})",
                ev.alpn.join(",")
            ),
        );
    }

    // 5. A meshed pod's own socket.
    if let Some(pod) = sidecar(local) {
        let proxy_uid = ev.uid == Some(pod.proxy_uid);
        if proxy_uid && policy.is_proxy_process(ev.comm) {
            if ev.encryption == Encryption::Tls && !ev.alpn_seen && sidecar(remote).is_some() {
                // Recovered evidence: TLS from the proxy to a meshed peer is how mesh mTLS
                // looks; without its ALPN, say so rather than raise a bypass-tls alarm.
                return decision(Verdict::Mtls, "mtls-alpn-unseen", Path::Sidecar, format!("{me}'s sidecar carried TLS with meshed {peer}; its ALPN was not seen (the flow was recovered from the kernel's flow map), so mesh mTLS is assumed"));
            }
            return proxy_socket(ev, remote, &me, &peer, enc);
        }
        if proxy_uid {
            let (verdict, _) = bypass(ev, "proxy-uid-app");
            let who = ev.comm.unwrap_or("a process");
            return decision(verdict, "proxy-uid-app", Path::Direct, format!("{who} in {me} runs as the proxy's uid {}, so capture let its {enc} to {peer} through unproxied", pod.proxy_uid));
        }
        let who = match (ev.comm, ev.uid) {
            (Some(c), Some(u)) => format!("{me}'s application ({c}, uid {u})"),
            _ => format!("{me}'s application"),
        };
        let cause = match ev.direction {
            Direction::Egress if pod.exclude_outbound_ports.contains(&ev.remote.port()) => ("excluded-port", format!("port {} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundPorts)", ev.remote.port())),
            Direction::Egress if in_range(pod, ev.remote.ip()) => ("excluded-ip-range", format!("{} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundIPRanges)", ev.remote.ip())),
            Direction::Ingress if pod.exclude_inbound_ports.contains(&ev.local.port()) => ("excluded-port", format!("port {} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeInboundPorts)", ev.local.port())),
            _ => ("no-capture", "its sidecar's capture rules did not redirect it".to_string()),
        };
        let (verdict, reason) = bypass(ev, cause.0);
        let (verb, prep) = match ev.direction {
            Direction::Egress => ("sent", "straight to"),
            Direction::Ingress => ("accepted", "straight from"),
        };
        return decision(
            verdict,
            reason,
            Path::Direct,
            format!("{who} {verb} {enc} {prep} {peer}: {}", cause.1),
        );
    }
    if let Some(pod) = local.pod().filter(|p| p.mesh == MeshMode::Ambient) {
        return decision(Verdict::Plaintext, "ambient-unverified", Path::Direct, format!("{enc} from {}/{}'s application; in ambient mode its ztunnel carries it, which this socket cannot show", pod.namespace, pod.name));
    }

    // 6. An unmeshed end facing a meshed pod.
    if let Some(pod) = sidecar(remote) {
        return match ev.direction {
            Direction::Egress => {
                let verdict = if ev.encryption.is_encrypted() {
                    Verdict::Unmeshed
                } else {
                    Verdict::Plaintext
                };
                decision(verdict, "unmeshed-client", Path::Direct, format!("{me} is not in the mesh and sent {enc} to meshed {peer}, which accepted it"))
            }
            Direction::Ingress => {
                let port = ev.local.port();
                let cause = if pod.exclude_outbound_ports.contains(&port) {
                    Some(("excluded-port", "excludes this port from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundPorts)"))
                } else if in_range(pod, ev.local.ip()) {
                    Some(("excluded-ip-range", "excludes this address from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundIPRanges)"))
                } else {
                    None
                };
                match cause {
                    Some((cause, why)) => {
                        let (verdict, reason) = bypass(ev, cause);
                        decision(
                            verdict,
                            reason,
                            Path::Direct,
                            format!("meshed {peer} sent {enc} to {me} past its sidecar: it {why}"),
                        )
                    }
                    None => {
                        let verdict = if ev.encryption.is_encrypted() {
                            Verdict::Unmeshed
                        } else {
                            Verdict::Plaintext
                        };
                        decision(verdict, "unmeshed-server", Path::Direct, format!("meshed {peer} sent {enc} to {me}, which is not in the mesh (through its sidecar's passthrough, or past it: its own node's record says which)"))
                    }
                }
            }
        };
    }

    // 7. Neither end in the mesh.
    let reason = if matches!(local, Identity::Node) {
        "host-network"
    } else {
        "no-sidecar"
    };
    decision(
        Verdict::Unmeshed,
        reason,
        Path::Direct,
        format!("{enc} between {me} and {peer}; neither is in the mesh"),
    )
}

/// The proxy's own socket: mTLS was ruled out, so it carried plaintext or someone else's TLS.
fn proxy_socket(ev: &Evidence, remote: Identity, me: &str, peer: &str, enc: &str) -> Decision {
    let peer_meshed = sidecar(remote).is_some();
    match (ev.direction, ev.encryption, peer_meshed) {
        (Direction::Ingress, Encryption::Plaintext, true) => decision(Verdict::BypassPlaintext, "peer-bypass", Path::Sidecar, format!("{me}'s sidecar accepted plaintext from meshed {peer}, whose own sidecar would have used mTLS: {peer} bypassed its sidecar")),
        (Direction::Ingress, Encryption::Plaintext, false) => decision(Verdict::Plaintext, "permissive-inbound", Path::Sidecar, format!("{me}'s sidecar accepted plaintext from {peer} (PERMISSIVE mTLS)")),
        (Direction::Egress, Encryption::Plaintext, true) => decision(Verdict::Plaintext, "proxy-plaintext", Path::Sidecar, format!("{me}'s sidecar sent plaintext to meshed {peer}: it was told not to originate mTLS")),
        (Direction::Egress, Encryption::Plaintext, false) => decision(Verdict::Plaintext, "passthrough", Path::Sidecar, format!("{me}'s sidecar passed plaintext through to {peer}, outside the mesh")),
        (_, _, true) => decision(Verdict::BypassTls, "app-tls", Path::Sidecar, format!("{me}'s sidecar passed the application's own {enc} between it and meshed {peer}: no mesh identity")),
        (_, _, false) => decision(Verdict::Unmeshed, "passthrough-tls", Path::Sidecar, format!("{me}'s sidecar passed the application's own {enc} through with {peer}, outside the mesh")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::inventory::pod::Workload;

    const PROXY: u32 = 1337;
    const APP: u32 = 1000;

    fn pod(name: &str, mesh: MeshMode, ip: &str) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            host_ips: vec!["10.0.0.1".parse().unwrap()],
            host_network: false,
            workload: Workload {
                kind: "Deployment".into(),
                name: name.into(),
            },
            mesh,
            proxy_uid: PROXY,
            proxy_uid_explicit: true,
            exclude_outbound_ports: BTreeSet::from([5000, 8443]),
            exclude_inbound_ports: BTreeSet::from([8081]),
            exclude_outbound_ranges: vec!["192.0.2.0/24".parse().unwrap()],
            probe_ports: BTreeSet::from([8081]),
            ..PodInfo::default()
        }
    }

    struct Case {
        name: &'static str,
        direction: Direction,
        local: (&'static str, u16),
        remote: (&'static str, u16),
        uid: u32,
        comm: &'static str,
        redirect: Option<&'static str>,
        encryption: Encryption,
        alpn: &'static [&'static str],
        alpn_seen: bool,
        want: (Verdict, &'static str, Path),
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one table row, read left to right"
    )]
    const fn case(
        name: &'static str,
        direction: Direction,
        local: (&'static str, u16),
        remote: (&'static str, u16),
        uid: u32,
        comm: &'static str,
        encryption: Encryption,
        want: (Verdict, &'static str, Path),
    ) -> Case {
        Case {
            name,
            direction,
            local,
            remote,
            uid,
            comm,
            redirect: None,
            encryption,
            alpn: &[],
            alpn_seen: true,
            want,
        }
    }

    use Direction::{Egress, Ingress};
    use Encryption::{Plaintext as Plain, Tls, Unknown};
    use Verdict::*;

    // Addresses: 10.0.0.1 node; .10 web (sidecar); .11 api (sidecar); .12 catalog (no mesh);
    // .13 amb (ambient); 203.0.113.9 outside anything known.
    fn cases() -> Vec<Case> {
        let istio = &["istio-peer-exchange", "istio"][..];
        vec![
            case(
                "nothing sent yet",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.11", 8080),
                APP,
                "curl",
                Unknown,
                (Pending, "no-payload", Path::Direct),
            ),
            Case {
                redirect: Some("127.0.0.1:15001"),
                ..case(
                    "app to its sidecar",
                    Egress,
                    ("10.0.0.10", 40000),
                    ("10.0.0.11", 8080),
                    APP,
                    "curl",
                    Plain,
                    (InPod, "app-to-sidecar", Path::InPod),
                )
            },
            case(
                "sidecar accepting its app",
                Ingress,
                ("127.0.0.1", 15001),
                ("10.0.0.10", 40000),
                PROXY,
                "wrk:worker_0",
                Plain,
                (InPod, "app-to-sidecar", Path::InPod),
            ),
            case(
                "sidecar to its app",
                Egress,
                ("127.0.0.6", 41000),
                ("10.0.0.11", 8080),
                PROXY,
                "wrk:worker_0",
                Plain,
                (InPod, "sidecar-to-app", Path::InPod),
            ),
            case(
                "app accepting its sidecar",
                Ingress,
                ("10.0.0.11", 8080),
                ("127.0.0.6", 41000),
                APP,
                "python3",
                Plain,
                (InPod, "sidecar-to-app", Path::InPod),
            ),
            case(
                "plain loopback",
                Egress,
                ("127.0.0.1", 41000),
                ("127.0.0.1", 9000),
                APP,
                "curl",
                Plain,
                (InPod, "loopback", Path::InPod),
            ),
            Case {
                alpn: istio,
                ..case(
                    "sidecar to sidecar",
                    Egress,
                    ("10.0.0.10", 40000),
                    ("10.0.0.11", 8080),
                    PROXY,
                    "wrk:worker_0",
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            Case {
                alpn_seen: false,
                ..case(
                    "sidecar to sidecar, recovered without its ALPN",
                    Egress,
                    ("10.0.0.10", 40000),
                    ("10.0.0.11", 8080),
                    PROXY,
                    "wrk:worker_0",
                    Tls,
                    (Mtls, "mtls-alpn-unseen", Path::Sidecar),
                )
            },
            Case {
                alpn: istio,
                ..case(
                    "sidecar accepting sidecar",
                    Ingress,
                    ("10.0.0.11", 15006),
                    ("10.0.0.10", 40000),
                    PROXY,
                    "wrk:worker_0",
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            case(
                "HBONE",
                Egress,
                ("10.0.0.13", 40000),
                ("10.0.0.11", 15008),
                0,
                "ztunnel",
                Tls,
                (Mtls, "hbone", Path::Direct),
            ),
            case(
                "excluded outbound port",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.12", 5000),
                APP,
                "curl",
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "excluded outbound range",
                Egress,
                ("10.0.0.10", 40000),
                ("192.0.2.7", 80),
                APP,
                "curl",
                Plain,
                (BypassPlaintext, "excluded-ip-range", Path::Direct),
            ),
            case(
                "capture missing",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.12", 80),
                APP,
                "curl",
                Plain,
                (BypassPlaintext, "no-capture", Path::Direct),
            ),
            case(
                "app TLS past the sidecar",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.12", 8443),
                APP,
                "curl",
                Tls,
                (BypassTls, "app-tls", Path::Direct),
            ),
            case(
                "app SSH past the sidecar: encrypted, yet no mesh identity",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.12", 22),
                APP,
                "ssh",
                Encryption::Encrypted(EncryptedProtocol::Ssh),
                (BypassTls, "app-tls", Path::Direct),
            ),
            case(
                "unmeshed QUIC client to meshed",
                Egress,
                ("10.0.0.12", 40000),
                ("10.0.0.11", 443),
                APP,
                "curl",
                Encryption::Encrypted(EncryptedProtocol::Quic),
                (Unmeshed, "unmeshed-client", Path::Direct),
            ),
            case(
                "app as the proxy's uid",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.11", 9080),
                PROXY,
                "curl",
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            case(
                "app as the proxy's uid, TLS",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.11", 9080),
                PROXY,
                "openssl",
                Tls,
                (BypassTls, "proxy-uid-app", Path::Direct),
            ),
            case(
                "excluded inbound port",
                Ingress,
                ("10.0.0.11", 8081),
                ("10.0.0.12", 40000),
                APP,
                "python3",
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "inbound capture missing",
                Ingress,
                ("10.0.0.11", 8080),
                ("10.0.0.12", 40000),
                APP,
                "python3",
                Plain,
                (BypassPlaintext, "no-capture", Path::Direct),
            ),
            case(
                "PERMISSIVE sidecar, unmeshed client",
                Ingress,
                ("10.0.0.11", 15006),
                ("10.0.0.12", 40000),
                PROXY,
                "wrk:worker_0",
                Plain,
                (Plaintext, "permissive-inbound", Path::Sidecar),
            ),
            case(
                "PERMISSIVE sidecar, meshed client that bypassed",
                Ingress,
                ("10.0.0.11", 15006),
                ("10.0.0.10", 40000),
                PROXY,
                "wrk:worker_0",
                Plain,
                (BypassPlaintext, "peer-bypass", Path::Sidecar),
            ),
            case(
                "sidecar told not to use mTLS",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.11", 8080),
                PROXY,
                "wrk:worker_0",
                Plain,
                (Plaintext, "proxy-plaintext", Path::Sidecar),
            ),
            case(
                "sidecar passthrough, plaintext",
                Egress,
                ("10.0.0.10", 40000),
                ("10.0.0.12", 80),
                PROXY,
                "wrk:worker_0",
                Plain,
                (Plaintext, "passthrough", Path::Sidecar),
            ),
            case(
                "sidecar passthrough, app TLS",
                Egress,
                ("10.0.0.10", 40000),
                ("203.0.113.9", 443),
                PROXY,
                "envoy",
                Tls,
                (Unmeshed, "passthrough-tls", Path::Sidecar),
            ),
            case(
                "unmeshed client to meshed",
                Egress,
                ("10.0.0.12", 40000),
                ("10.0.0.11", 9080),
                APP,
                "curl",
                Plain,
                (Plaintext, "unmeshed-client", Path::Direct),
            ),
            case(
                "meshed client to unmeshed, excluded port",
                Ingress,
                ("10.0.0.12", 5000),
                ("10.0.0.10", 40000),
                APP,
                "python3",
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "meshed client to unmeshed, TLS on excluded port",
                Ingress,
                ("10.0.0.12", 8443),
                ("10.0.0.10", 40000),
                APP,
                "openssl",
                Tls,
                (BypassTls, "app-tls", Path::Direct),
            ),
            case(
                "meshed client to unmeshed",
                Ingress,
                ("10.0.0.12", 80),
                ("10.0.0.10", 40000),
                APP,
                "python3",
                Plain,
                (Plaintext, "unmeshed-server", Path::Direct),
            ),
            case(
                "kubelet probe, node end",
                Egress,
                ("10.0.0.1", 40000),
                ("10.0.0.11", 8081),
                0,
                "kubelet",
                Plain,
                (Expected, "probe", Path::Direct),
            ),
            case(
                "kubelet probe, pod end",
                Ingress,
                ("10.0.0.11", 8081),
                ("10.0.0.1", 40000),
                APP,
                "python3",
                Plain,
                (Expected, "probe", Path::Direct),
            ),
            case(
                "DNS",
                Egress,
                ("10.0.0.12", 40000),
                ("203.0.113.9", 53),
                APP,
                "curl",
                Plain,
                (Expected, "policy", Path::Direct),
            ),
            case(
                "unmeshed both",
                Egress,
                ("10.0.0.12", 40000),
                ("203.0.113.9", 80),
                APP,
                "curl",
                Plain,
                (Unmeshed, "no-sidecar", Path::Direct),
            ),
            case(
                "host network",
                Egress,
                ("10.0.0.1", 40000),
                ("203.0.113.9", 80),
                0,
                "curl",
                Plain,
                (Unmeshed, "host-network", Path::Direct),
            ),
            case(
                "ambient pod's application",
                Egress,
                ("10.0.0.13", 40000),
                ("10.0.0.12", 80),
                APP,
                "curl",
                Plain,
                (Plaintext, "ambient-unverified", Path::Direct),
            ),
        ]
    }

    #[test]
    fn every_verdict_and_reason() {
        let pods = [
            pod("web", MeshMode::Sidecar, "10.0.0.10"),
            pod("api", MeshMode::Sidecar, "10.0.0.11"),
            pod("catalog", MeshMode::None, "10.0.0.12"),
            pod("amb", MeshMode::Ambient, "10.0.0.13"),
        ];
        let inventory = crate::inventory::Inventory::new("test", pods.to_vec());
        let policy = Policy::default();
        for c in cases() {
            let alpn: Vec<String> = c.alpn.iter().map(|s| s.to_string()).collect();
            let addr = |(ip, port): (&str, u16)| SocketAddr::new(ip.parse().unwrap(), port);
            let ev = Evidence {
                direction: c.direction,
                udp: false,
                local: addr(c.local),
                remote: addr(c.remote),
                uid: Some(c.uid),
                comm: Some(c.comm),
                redirect: c.redirect.map(|r| r.parse().unwrap()),
                encryption: c.encryption,
                alpn: &alpn,
                alpn_seen: c.alpn_seen,
            };
            let d = decide(
                &ev,
                inventory.lookup(ev.local.ip()),
                inventory.lookup(ev.remote.ip()),
                &policy,
            );
            assert_eq!(
                (d.verdict, d.reason, d.path),
                c.want,
                "{}: {}",
                c.name,
                d.detail
            );
            assert!(
                !d.detail.is_empty() && !d.detail.contains('\n'),
                "{}: one sentence",
                c.name
            );
        }
    }

    #[test]
    fn every_verdict_is_reachable() {
        let seen: BTreeSet<&str> = cases().iter().map(|c| c.want.0.as_str()).collect();
        for v in [
            Mtls,
            BypassPlaintext,
            BypassTls,
            Plaintext,
            Unmeshed,
            Expected,
            InPod,
            Pending,
        ] {
            assert!(seen.contains(v.as_str()), "{} has no case", v.as_str());
        }
    }

    #[test]
    fn policy_files() {
        let p: Policy =
            serde_json::from_str(r#"{"proxy_processes": ["my-proxy"], "probes": false}"#).unwrap();
        assert_eq!(p.proxy_processes, ["my-proxy"]);
        assert!(!p.probes);
        assert_eq!(p.hbone_port, 15008, "unset fields keep their defaults");
        let e = serde_json::from_str::<Policy>(r#"{"proxy_proceses": []}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `proxy_proceses`"), "{e}");
    }
}
