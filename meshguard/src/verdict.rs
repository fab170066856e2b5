//! The verdict engine: one flow's evidence from the kernel, joined with what the inventory says
//! its two ends intend, gives a verdict, a reason code and one sentence for a person. Pure: the
//! same inputs always give the same answer, and every rule has a table test below.
//!
//! The judged workload is the adversary (see the design's trust model): it chooses its process
//! name, its ALPN, its ports and its first bytes. So a verdict rests on what it cannot choose:
//! the container that owns the socket (its cgroup), the uid, whether netfilter redirected it,
//! whether its packets stayed on the loopback device, and the whole handshake as it crossed the
//! wire. Names, addresses and ports only name things in the detail sentence, or narrow a rule
//! that other evidence already allows.
//!
//! Each socket is judged on its own evidence, so that a bypass is caught at whichever end of a
//! connection runs meshguard. The rules, in order:
//! 1. no payload yet: `pending`;
//! 2. delivered over the loopback device only (a redirect into the sidecar among them): `in-pod`;
//! 3. plaintext the policy allows, to the destinations it names (kubelet probes, DNS servers,
//!    the proxies' metrics, the control plane): `expected`;
//! 4. a mesh proxy's own socket (its container; a sidecar's or a gateway's): `mtls` for TLS with
//!    the mesh's ALPN (Istio) or HBONE, else `plaintext` or `bypass-*` by what it carried;
//! 5. an application's socket in a meshed pod: `bypass-*` (`spoofed-mesh-alpn`,
//!    `proxy-uid-app`, `udp`, `excluded-port`, `excluded-ip-range`, `no-capture`);
//! 6. an unmeshed end facing a meshed pod: `plaintext`/`unmeshed` with who was unmeshed, or a
//!    `bypass-*` when the meshed pod's own exclusions (or UDP) explain it;
//! 7. otherwise `unmeshed`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    enforce::Mode,
    fingerprint::Encryption,
    inventory::{policy::PolicyRef, ContainerInfo, Identity, MeshMode, PodInfo},
    wire::wire_enum,
};

wire_enum! {
    /// What a flow's evidence says of it. Its place in `ALL` is its code in the kernel's
    /// `REPORTED` map: add new verdicts at the end.
    pub enum Verdict ("verdict") {
        Mtls = "mtls",
        BypassPlaintext = "bypass-plaintext",
        BypassTls = "bypass-tls",
        Plaintext = "plaintext",
        Unmeshed = "unmeshed",
        Expected = "expected",
        InPod = "in-pod",
        Pending = "pending",
    }
}

impl Verdict {
    pub fn is_bypass(self) -> bool {
        matches!(self, Verdict::BypassPlaintext | Verdict::BypassTls)
    }

    /// Kept apart from the flood in the agent's store, and flagged to people: a bypass, or
    /// plaintext.
    pub fn is_flagged(self) -> bool {
        self.is_bypass() || self == Verdict::Plaintext
    }

    /// Its number in the kernel's `REPORTED` map (0 means none).
    pub fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|v| *v == self)
            .map_or(0, |i| i as u8 + 1)
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }
}

/// A reason word read back from the kernel's `REPORTED` map, as the `&'static str` the flow
/// table keeps. Reasons are a small fixed vocabulary, so each distinct one is allocated once.
pub fn intern_reason(reason: &str) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = seen.iter().find(|r| **r == reason) {
        return known;
    }
    let leaked: &'static str = Box::leak(reason.to_string().into_boxed_str());
    seen.push(leaked);
    leaked
}

wire_enum! {
    /// How the flow's bytes travelled.
    pub enum Path ("path") {
        /// Through the pod's proxy.
        Sidecar = "sidecar",
        /// Straight between the application and the network.
        Direct = "direct",
        /// Inside one pod (application and its sidecar, over loopback).
        InPod = "in-pod",
    }
}

wire_enum! {
    /// Which end of the connection a socket is.
    pub enum Direction ("direction") {
        /// This socket opened the connection.
        Egress = "egress",
        /// This socket accepted it.
        Ingress = "ingress",
    }
}

impl Direction {
    /// The end of the connection this socket is, in a person's words.
    pub fn end(self) -> &'static str {
        match self {
            Direction::Egress => "client",
            Direction::Ingress => "server",
        }
    }
}

/// Who owns a socket, from its cgroup: what the application cannot choose.
#[derive(Clone, Copy, Debug)]
pub enum Owner<'a> {
    /// A container of a pod the inventory knows.
    Container {
        pod: &'a PodInfo,
        container: &'a ContainerInfo,
    },
    /// A cgroup of a known pod outside its known containers (its sandbox).
    Pod(&'a PodInfo),
    /// A cgroup outside every pod: a process of the node itself.
    Host,
    /// No cgroup evidence: not recorded, or not mapped to a container (yet).
    Unknown,
}

wire_enum! {
    /// What kind of owner a socket has, as records name it.
    pub enum OwnerKind ("owner kind") {
        /// A mesh proxy's container.
        Proxy = "proxy",
        /// Any other container.
        App = "app",
        /// A pod's cgroup outside its containers.
        Sandbox = "sandbox",
        /// A process of the node.
        Host = "host",
        /// No cgroup evidence.
        Unknown = "unknown",
    }
}

impl Owner<'_> {
    pub fn kind(&self) -> OwnerKind {
        match self {
            Owner::Container { container, .. } if container.proxy => OwnerKind::Proxy,
            Owner::Container { .. } => OwnerKind::App,
            Owner::Pod(_) => OwnerKind::Sandbox,
            Owner::Host => OwnerKind::Host,
            Owner::Unknown => OwnerKind::Unknown,
        }
    }

    pub fn container(&self) -> Option<&str> {
        match self {
            Owner::Container { container, .. } => Some(&container.name),
            _ => None,
        }
    }
}

/// What the kernel saw of one socket.
#[derive(Clone, Debug)]
pub struct Evidence<'a> {
    pub direction: Direction,
    pub udp: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub uid: Option<u32>,
    /// The process name: chosen by the process itself, so only ever a hint.
    pub comm: Option<&'a str>,
    pub owner: Owner<'a>,
    /// Where egress really went, when netfilter redirected it.
    pub redirect: Option<SocketAddr>,
    /// Every payload packet seen so far crossed the loopback device, which never leaves the
    /// network namespace: both sockets are in one pod, whatever addresses they use.
    pub loopback: bool,
    pub encryption: Encryption,
    /// ALPN protocols the ClientHello offered.
    pub alpn: &'a [String],
    /// Whether the ClientHello was seen whole, so that its ALPN is all it offered: not when it
    /// was cut (a lost sample, or a flow recovered from the first bytes the flow map keeps).
    pub hello_complete: bool,
    /// The DestinationRule that tells the connection's client's sidecar to send plaintext to
    /// its server (`tls.mode: DISABLE`), if one does: what the mesh itself was told to do.
    pub plaintext_declared_by: Option<PolicyRef>,
}

impl Evidence<'_> {
    /// The server's port: the remote one if this socket connected, the local one if it accepted.
    fn service_port(&self) -> u16 {
        match self.direction {
            Direction::Egress => self.remote.port(),
            Direction::Ingress => self.local.port(),
        }
    }

    /// The server's address and identity: the peer if this socket connected, else this socket.
    fn server<'i>(&self, local: Identity<'i>, remote: Identity<'i>) -> (IpAddr, Identity<'i>) {
        match self.direction {
            Direction::Egress => (self.remote.ip(), remote),
            Direction::Ingress => (self.local.ip(), local),
        }
    }

    /// The ClientHello on the wire offered the mesh's ALPN, whatever followed it.
    fn offers_mesh_alpn(&self, policy: &Policy) -> bool {
        self.alpn.iter().any(|a| {
            policy
                .mesh_alpn_prefixes
                .iter()
                .any(|p| a.starts_with(p.as_str()))
        })
    }
}

/// Where plaintext a policy rule expects may go: the server end of the flow must be one of
/// these. Written in policy files as strings: `node`, `mesh-proxy`, `pods:LABEL=VALUE`, an
/// address or a CIDR, or `any`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Anywhere (what a port alone used to mean; say it only on purpose).
    Any,
    /// The node itself (host-network resolvers, kubelet).
    Node,
    /// A mesh proxy: a meshed pod when this socket connected, the proxy's own socket when it
    /// accepted.
    MeshProxy,
    /// Pods with this label.
    Pods {
        label: String,
        value: String,
    },
    Net(IpNet),
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "any" => Self::Any,
            "node" => Self::Node,
            "mesh-proxy" => Self::MeshProxy,
            _ => match s.strip_prefix("pods:") {
                Some(selector) => {
                    let (label, value) = selector
                        .split_once('=')
                        .filter(|(l, _)| !l.is_empty())
                        .ok_or_else(|| format!("{s:?}: a pod selector is pods:LABEL=VALUE"))?;
                    Self::Pods {
                        label: label.into(),
                        value: value.into(),
                    }
                }
                None => Self::Net(
                    s.parse::<IpNet>()
                        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            format!("{s:?} is not a destination (node, mesh-proxy, pods:LABEL=VALUE, an address or CIDR, any)")
                        })?,
                ),
            },
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Node => f.write_str("node"),
            Self::MeshProxy => f.write_str("mesh-proxy"),
            Self::Pods { label, value } => write!(f, "pods:{label}={value}"),
            Self::Net(net) => net.fmt(f),
        }
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Plaintext the mesh owner expects: on these ports, to these destinations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedRule {
    pub rule: String,
    pub ports: Vec<u16>,
    /// Required: a port alone is a number any workload can pick.
    pub to: Vec<Destination>,
}

/// What the verdicts take as given; `--policy FILE` (JSON) overrides any of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Process names (`comm`) of the proxy; a trailing `*` matches a prefix (Envoy names its
    /// worker threads `wrk:worker_N`). Consulted only where the socket's container is unknown.
    pub proxy_processes: Vec<String>,
    /// ALPN prefixes that mark sidecar-to-sidecar mTLS.
    pub mesh_alpn_prefixes: Vec<String>,
    /// Ambient's HBONE port (mTLS tunnels between ztunnels and waypoints).
    pub hbone_port: u16,
    /// The sidecar's outbound capture port, and the sources it hands inbound traffic from
    /// (names the in-pod hops; the loopback device is the evidence).
    pub outbound_capture_port: u16,
    pub inbound_passthrough_sources: Vec<IpAddr>,
    /// Kubelet probes from the node to a pod's declared probe ports are expected plaintext.
    pub probes: bool,
    pub expected: Vec<ExpectedRule>,
    /// The mesh's root namespace: a PeerAuthentication there without a selector is mesh-wide
    /// (Istio's `istio-system`; OpenShift Service Mesh's control plane namespace).
    pub mesh_root_namespace: String,
    /// The enforcement mode of a pod whose own annotation or label and namespace's label say
    /// none (see `enforce`).
    pub enforcement: Mode,
}

impl Default for Policy {
    fn default() -> Self {
        let to = |list: &[&str]| -> Vec<Destination> {
            list.iter()
                .map(|d| d.parse().expect("a valid default destination"))
                .collect()
        };
        Self {
            proxy_processes: ["envoy", "wrk:*", "pilot-agent", "ztunnel"]
                .map(String::from)
                .to_vec(),
            mesh_alpn_prefixes: vec!["istio".into()],
            hbone_port: 15008,
            outbound_capture_port: 15001,
            inbound_passthrough_sources: vec![
                IpAddr::from([127, 0, 0, 6]),
                "::6".parse().expect("an address"),
            ],
            probes: true,
            mesh_root_namespace: crate::inventory::policy::DEFAULT_ROOT_NAMESPACE.into(),
            enforcement: Mode::Off,
            expected: vec![
                ExpectedRule {
                    rule: "dns".into(),
                    ports: vec![53],
                    // CoreDNS pods (kube-dns; OpenShift's dns-default), resolvers on the node,
                    // and the usual cluster DNS service addresses: kubeadm's, OpenShift's and
                    // NodeLocal DNSCache's. Add the cluster's own with --policy.
                    to: to(&[
                        "pods:k8s-app=kube-dns",
                        "pods:dns.operator.openshift.io/daemonset-dns=default",
                        "node",
                        "10.96.0.10",
                        "172.30.0.10",
                        "169.254.20.10",
                    ]),
                },
                ExpectedRule {
                    rule: "metrics".into(),
                    ports: vec![15020, 15090],
                    to: to(&["mesh-proxy"]),
                },
                ExpectedRule {
                    rule: "control-plane".into(),
                    ports: vec![15010, 15014],
                    to: to(&["pods:app=istiod"]),
                },
            ],
        }
    }
}

impl Policy {
    fn is_proxy_process(&self, comm: &str) -> bool {
        self.proxy_processes
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => comm.starts_with(prefix),
                None => comm == p,
            })
    }

    fn is_passthrough_source(&self, ip: IpAddr) -> bool {
        self.inbound_passthrough_sources.contains(&ip)
    }
}

/// How a socket was found to be the mesh proxy's, for the detail sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyEvidence {
    /// Its cgroup is the proxy container's.
    Container,
    /// No container is known for it: the proxy's uid and a proxy process name, which a process
    /// running as that uid could also show.
    UidAndName,
}

/// Whether the socket is a mesh proxy's. Its container says so when it is known; without it,
/// the proxy's uid and a proxy process name, never one of them alone, and never a guess.
fn proxy_owned(ev: &Evidence, local: Identity, policy: &Policy) -> Option<ProxyEvidence> {
    match ev.owner {
        Owner::Container { container, .. } => container.proxy.then_some(ProxyEvidence::Container),
        Owner::Pod(_) | Owner::Host => None,
        Owner::Unknown => {
            let pod = local.pod().filter(|p| p.is_proxy_pod())?;
            let named = ev.comm.is_some_and(|c| policy.is_proxy_process(c));
            (ev.uid == Some(pod.proxy_uid) && named).then_some(ProxyEvidence::UidAndName)
        }
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

/// Who is at one end of a flow, as far as the inventory knows: what every name of an end is
/// made from (the detail sentences here, the CLI's tables, `explain`, the metrics' labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party<'a> {
    Pod {
        namespace: &'a str,
        pod: &'a str,
        workload: &'a str,
        meshed: bool,
    },
    /// The node itself (host network).
    Node,
    /// Not in the inventory.
    Unknown,
}

impl<'a> From<Identity<'a>> for Party<'a> {
    fn from(id: Identity<'a>) -> Self {
        match id {
            Identity::Pod(p) => Party::Pod {
                namespace: &p.namespace,
                pod: &p.name,
                workload: &p.workload.name,
                meshed: p.meshed(),
            },
            Identity::Node => Party::Node,
            Identity::Unknown => Party::Unknown,
        }
    }
}

impl<'a> Party<'a> {
    /// `namespace/pod`, the node as `{node} (IP)`, or the address of an end nobody knows.
    fn named(self, ip: IpAddr, node: &str) -> String {
        match self {
            Party::Pod { namespace, pod, .. } => format!("{namespace}/{pod}"),
            Party::Node => format!("{node} ({ip})"),
            Party::Unknown => ip.to_string(),
        }
    }

    /// How a table names the end at `ip`: `shop/web-1`, `node (10.0.0.1)`, `203.0.113.9`.
    pub fn name(self, ip: IpAddr) -> String {
        self.named(ip, "node")
    }

    /// How a sentence names the end at `ip`: `shop/web-1`, `the node (10.0.0.1)`,
    /// `203.0.113.9`.
    pub fn in_sentence(self, ip: IpAddr) -> String {
        self.named(ip, "the node")
    }

    /// What `meshguard explain` says of it.
    pub fn described(self) -> String {
        match self {
            Party::Pod {
                namespace,
                pod,
                workload,
                meshed,
            } => format!(
                "{namespace}/{pod} (workload {workload}, {})",
                if meshed { "meshed" } else { "not meshed" }
            ),
            Party::Node => "the node itself (host network)".to_string(),
            Party::Unknown => "not in the inventory".to_string(),
        }
    }

    /// Its metric labels, namespace and workload: a pod's, else no namespace and `node` or
    /// `unknown`.
    pub fn labels(self) -> (&'a str, &'a str) {
        match self {
            Party::Pod {
                namespace,
                workload,
                ..
            } => (namespace, workload),
            Party::Node => ("", "node"),
            Party::Unknown => ("", "unknown"),
        }
    }
}

/// A pod whose traffic a mesh proxy carries: a sidecar's, or a gateway itself.
fn meshed(id: Identity<'_>) -> Option<&PodInfo> {
    id.pod().filter(|p| p.is_proxy_pod())
}

fn in_range(pod: &PodInfo, ip: IpAddr) -> bool {
    pod.exclude_outbound_ranges
        .iter()
        .any(|net| net.contains(&ip))
}

const SPOOFED_ALPN: &str = "spoofed-mesh-alpn";

/// A bypass of the mesh: encrypted by the application itself, or plaintext for `cause`.
fn bypass(ev: &Evidence, cause: &'static str) -> (Verdict, &'static str) {
    match ev.encryption {
        Encryption::Tls if cause == SPOOFED_ALPN => (Verdict::BypassTls, SPOOFED_ALPN),
        Encryption::Tls => (Verdict::BypassTls, "app-tls"),
        Encryption::Ssh => (Verdict::BypassTls, "app-ssh"),
        Encryption::Quic => (Verdict::BypassTls, "app-quic"),
        Encryption::Dtls => (Verdict::BypassTls, "app-dtls"),
        Encryption::Plaintext | Encryption::Unknown => (Verdict::BypassPlaintext, cause),
    }
}

/// How a decision's sentence names the socket's end, its peer and what crossed the wire.
#[derive(Clone, Copy)]
struct Words<'a> {
    me: &'a str,
    peer: &'a str,
    enc: &'static str,
}

pub fn decide(ev: &Evidence, local: Identity, remote: Identity, policy: &Policy) -> Decision {
    let me = Party::from(local).in_sentence(ev.local.ip());
    let peer = format!(
        "{}:{}",
        Party::from(remote).in_sentence(ev.remote.ip()),
        ev.remote.port()
    );
    let enc = ev.encryption.word();
    let words = Words {
        me: &me,
        peer: &peer,
        enc,
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

    // 2. Inside one pod: the loopback device, or an application's egress redirected to it.
    if let Some(d) = in_pod(ev, local, policy, enc) {
        return d;
    }

    // 3. Plaintext the policy expects, to where it expects it.
    if ev.encryption == Encryption::Plaintext {
        if let Some(d) = expected(ev, local, remote, policy, words) {
            return d;
        }
    }

    // 4. A mesh proxy's own socket.
    if let Some(how) = proxy_owned(ev, local, policy) {
        return proxy_socket(ev, local, remote, policy, how, words);
    }

    // 5. An application's socket in a meshed pod.
    if let Some(pod) = meshed(local) {
        return app_socket(ev, pod, policy, words);
    }
    if let Some(pod) = local.pod().filter(|p| p.mesh == MeshMode::Ambient) {
        return decision(Verdict::Plaintext, "ambient-unverified", Path::Direct, format!("{enc} from {}/{}'s application; in ambient mode its ztunnel carries it, which this socket cannot show", pod.namespace, pod.name));
    }

    // 6. An unmeshed end facing a meshed pod.
    if let Some(pod) = meshed(remote) {
        return facing_meshed(ev, pod, policy, words);
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

/// Rule 2: the socket's packets never left its network namespace: the loopback device is the
/// evidence, whatever the addresses; a redirect, ports and the owner only name the hop.
fn in_pod(ev: &Evidence, local: Identity, policy: &Policy, enc: &str) -> Option<Decision> {
    if !ev.loopback {
        return None;
    }
    if let Some(to) = ev.redirect {
        let me = Party::from(local).in_sentence(ev.local.ip());
        let peer = ev.remote;
        return Some(decision(Verdict::InPod, "app-to-sidecar", Path::InPod, format!("{me}'s application connected to {peer}; netfilter redirected it to its sidecar on {to}")));
    }
    let by_proxy = proxy_owned(ev, local, policy).is_some();
    let reason =
        if ev.direction == Direction::Ingress && ev.local.port() == policy.outbound_capture_port {
            "app-to-sidecar"
        } else if policy.is_passthrough_source(ev.local.ip())
            || policy.is_passthrough_source(ev.remote.ip())
            || (by_proxy && ev.direction == Direction::Egress)
        {
            "sidecar-to-app"
        } else {
            "loopback"
        };
    Some(decision(
        Verdict::InPod,
        reason,
        Path::InPod,
        format!(
            "{enc} over the loopback device between {} and {}, inside one network namespace",
            ev.local, ev.remote
        ),
    ))
}

/// Rule 3: plaintext on a port the policy expects, when the flow's server is a destination the
/// rule names.
fn expected(
    ev: &Evidence,
    local: Identity,
    remote: Identity,
    policy: &Policy,
    words: Words,
) -> Option<Decision> {
    let Words { me, peer, .. } = words;
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
            return Some(decision(
                Verdict::Expected,
                "probe",
                Path::Direct,
                format!(
                    "kubelet probe between {me} and {peer}: port {port} is a declared probe port"
                ),
            ));
        }
    }
    let (server_ip, server) = ev.server(local, remote);
    let rule = policy.expected.iter().find(|r| {
        r.ports.contains(&port)
            && r.to.iter().any(|to| match to {
                Destination::Any => true,
                Destination::Node => matches!(server, Identity::Node),
                Destination::MeshProxy => match ev.direction {
                    Direction::Egress => meshed(server).is_some(),
                    Direction::Ingress => proxy_owned(ev, local, policy).is_some(),
                },
                Destination::Pods { label, value } => server
                    .pod()
                    .is_some_and(|p| p.label(label) == Some(value.as_str())),
                Destination::Net(net) => net.contains(&server_ip),
            })
    })?;
    // Reason codes are static; the rule's name is in the detail (and "dns"/"metrics"/... for
    // the default rules, which is what people filter on).
    let reason = match rule.rule.as_str() {
        "dns" => "dns",
        "metrics" => "metrics",
        "control-plane" => "control-plane",
        _ => "policy",
    };
    Some(decision(
        Verdict::Expected,
        reason,
        Path::Direct,
        format!(
            "plaintext between {me} and {peer} on port {port} is allowed by policy rule {:?} (to {})",
            rule.rule,
            rule.to
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Rule 4: the mesh proxy's own socket. mTLS is what it originates and terminates; anything
/// else it carried is judged by what it was and who the peer is.
fn proxy_socket(
    ev: &Evidence,
    local: Identity,
    remote: Identity,
    policy: &Policy,
    how: ProxyEvidence,
    words: Words,
) -> Decision {
    let Words { me, peer, enc } = words;
    let peer_meshed = meshed(remote).is_some();
    // A known pod outside the mesh: mesh mTLS never goes there, so a mesh ALPN toward it is an
    // application's handshake that the proxy passed through.
    let peer_unmeshed = remote
        .pod()
        .is_some_and(|p| !p.is_proxy_pod() && p.mesh != MeshMode::Ambient);
    let gateway = local.pod().is_some_and(|p| p.mesh == MeshMode::Gateway);
    let who = match (gateway, how) {
        (true, _) => format!("gateway {me}"),
        (false, ProxyEvidence::Container) => format!("{me}'s sidecar"),
        (false, ProxyEvidence::UidAndName) => {
            format!("{me}'s sidecar (by uid and process name: its container is unknown)")
        }
    };
    let tls = ev.encryption == Encryption::Tls;
    let hbone = tls && ev.service_port() == policy.hbone_port;
    if (tls && ev.offers_mesh_alpn(policy)) || hbone {
        if ev.direction == Direction::Egress && peer_unmeshed {
            return decision(Verdict::BypassTls, SPOOFED_ALPN, Path::Sidecar, format!("{who} passed TLS offering the mesh's ALPN ({}) to {peer}, which is not in the mesh: an application's own handshake, not mesh mTLS", ev.alpn.join(",")));
        }
        let reason = if hbone { "hbone" } else { "istio-mtls" };
        return decision(
            Verdict::Mtls,
            reason,
            Path::Sidecar,
            format!(
                "mesh mTLS between {who} and {peer} (ALPN {})",
                ev.alpn.join(",")
            ),
        );
    }
    if ev.encryption == Encryption::Tls && !ev.hello_complete && peer_meshed {
        // Its ClientHello was cut (a lost sample, or a flow recovered from the few bytes the
        // flow map keeps): TLS from the proxy to a meshed peer is how mesh mTLS looks. Say so
        // rather than raise an alarm on a partial parse.
        return decision(Verdict::Mtls, "mtls-alpn-unseen", Path::Sidecar, format!("{who} carried TLS with meshed {peer}; its ClientHello was not seen whole, so its ALPN is unknown and mesh mTLS is assumed"));
    }
    let plaintext = ev.encryption == Encryption::Plaintext;
    match (ev.direction, plaintext, peer_meshed) {
        // The mesh was told to send it: plaintext, not a bypass, and its rule contradicts the
        // mesh's intent (see intent.rs). Were it the client's application past its sidecar
        // instead, the client's own socket says so.
        (Direction::Ingress, true, true) if ev.plaintext_declared_by.is_some() => decision(Verdict::Plaintext, "tls-disabled", Path::Sidecar, format!("{who} accepted plaintext from meshed {peer}, as {} tells {peer}'s sidecar to send (tls mode DISABLE)", declared_by(ev))),
        (Direction::Ingress, true, true) => decision(Verdict::BypassPlaintext, "peer-bypass", Path::Sidecar, format!("{who} accepted plaintext from meshed {peer}, whose own sidecar would have used mTLS: {peer} bypassed its sidecar")),
        (Direction::Ingress, true, false) if gateway => decision(Verdict::Plaintext, "gateway-inbound", Path::Sidecar, format!("{who} accepted plaintext from {peer}, outside the mesh")),
        (Direction::Ingress, true, false) => decision(Verdict::Plaintext, "permissive-inbound", Path::Sidecar, format!("{who} accepted plaintext from {peer} (PERMISSIVE mTLS)")),
        (Direction::Egress, true, true) if ev.plaintext_declared_by.is_some() => decision(Verdict::Plaintext, "tls-disabled", Path::Sidecar, format!("{who} sent plaintext to meshed {peer}, as {} tells it to (tls mode DISABLE)", declared_by(ev))),
        (Direction::Egress, true, true) => decision(Verdict::Plaintext, "proxy-plaintext", Path::Sidecar, format!("{who} sent plaintext to meshed {peer}: it was told not to originate mTLS")),
        (Direction::Egress, true, false) => decision(Verdict::Plaintext, "passthrough", Path::Sidecar, format!("{who} passed plaintext through to {peer}, outside the mesh")),
        (_, false, true) => {
            let (verdict, reason) = bypass(ev, "app-tls");
            decision(verdict, reason, Path::Sidecar, format!("{who} passed the application's own {enc} between it and meshed {peer}: no mesh identity"))
        }
        (_, false, false) => decision(Verdict::Unmeshed, "passthrough-tls", Path::Sidecar, format!("{who} passed the application's own {enc} through with {peer}, outside the mesh")),
    }
}

fn declared_by(ev: &Evidence) -> String {
    ev.plaintext_declared_by
        .as_ref()
        .map_or_else(String::new, ToString::to_string)
}

/// Rule 5: an application's socket in a meshed pod: whatever it sent on the network, it sent
/// past its proxy.
fn app_socket(ev: &Evidence, pod: &PodInfo, policy: &Policy, words: Words) -> Decision {
    let Words { me, peer, enc } = words;
    let process = match ev.comm {
        Some(c) if policy.is_proxy_process(c) => format!("a process calling itself {c:?}"),
        Some(c) => c.to_string(),
        None => "a process".to_string(),
    };
    let container = match ev.owner {
        Owner::Container { container, .. } => format!(" (container {})", container.name),
        _ => String::new(),
    };
    if ev.offers_mesh_alpn(policy) {
        let (verdict, reason) = bypass(ev, SPOOFED_ALPN);
        let then = if ev.encryption == Encryption::Tls {
            "TLS"
        } else {
            "then plaintext"
        };
        return decision(verdict, reason, Path::Direct, format!("{process} in {me}{container}, not its proxy, offered the mesh's ALPN ({}) to {peer}, {then}: only the proxy originates mesh mTLS", ev.alpn.join(",")));
    }
    let (verb, prep) = match ev.direction {
        Direction::Egress => ("sent", "straight to"),
        Direction::Ingress => ("accepted", "straight from"),
    };
    if ev.uid == Some(pod.proxy_uid) {
        let (verdict, _) = bypass(ev, "proxy-uid-app");
        return decision(verdict, "proxy-uid-app", Path::Direct, format!("{process} in {me}{container} runs as the proxy's uid {}, so capture let its {enc} to {peer} through unproxied", pod.proxy_uid));
    }
    let who = match (ev.comm, ev.uid) {
        (Some(_), Some(u)) => format!("{me}'s application ({process}, uid {u}){container}"),
        _ => format!("{me}'s application{container}"),
    };
    let cause = match ev.direction {
        _ if ev.udp => ("udp", "the mesh's sidecar carries TCP only".to_string()),
        Direction::Egress if pod.exclude_outbound_ports.contains(&ev.remote.port()) => ("excluded-port", format!("port {} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundPorts)", ev.remote.port())),
        Direction::Egress if in_range(pod, ev.remote.ip()) => ("excluded-ip-range", format!("{} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundIPRanges)", ev.remote.ip())),
        Direction::Ingress if pod.exclude_inbound_ports.contains(&ev.local.port()) => ("excluded-port", format!("port {} is excluded from its sidecar's capture (traffic.sidecar.istio.io/excludeInboundPorts)", ev.local.port())),
        _ => ("no-capture", "its sidecar's capture rules did not redirect it".to_string()),
    };
    let (verdict, reason) = bypass(ev, cause.0);
    decision(
        verdict,
        reason,
        Path::Direct,
        format!("{who} {verb} {enc} {prep} {peer}: {}", cause.1),
    )
}

/// What reached or left an end outside the mesh: `unmeshed` when encrypted, `plaintext` not.
fn outside_mesh(ev: &Evidence) -> Verdict {
    if ev.encryption.is_encrypted() {
        Verdict::Unmeshed
    } else {
        Verdict::Plaintext
    }
}

/// Rule 6: this end is not in the mesh; its peer is.
fn facing_meshed(ev: &Evidence, pod: &PodInfo, policy: &Policy, words: Words) -> Decision {
    let Words { me, peer, enc } = words;
    if ev.direction == Direction::Egress {
        let verdict = outside_mesh(ev);
        return decision(
            verdict,
            "unmeshed-client",
            Path::Direct,
            format!("{me} is not in the mesh and sent {enc} to meshed {peer}, which accepted it"),
        );
    }
    let port = ev.local.port();
    let cause = if ev.udp {
        Some(("udp", "sent it over UDP, which its sidecar never carries"))
    } else if pod.exclude_outbound_ports.contains(&port) {
        Some(("excluded-port", "excludes this port from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundPorts)"))
    } else if in_range(pod, ev.local.ip()) {
        Some(("excluded-ip-range", "excludes this address from its sidecar's capture (traffic.sidecar.istio.io/excludeOutboundIPRanges)"))
    } else {
        None
    };
    match cause {
        Some((cause, why)) => {
            // Past its sidecar, a mesh ALPN can only be the application's own claim.
            let cause = if ev.offers_mesh_alpn(policy) {
                SPOOFED_ALPN
            } else {
                cause
            };
            let (verdict, reason) = bypass(ev, cause);
            decision(
                verdict,
                reason,
                Path::Direct,
                format!("meshed {peer} sent {enc} to {me} past its sidecar: it {why}"),
            )
        }
        None => {
            let verdict = outside_mesh(ev);
            decision(verdict, "unmeshed-server", Path::Direct, format!("meshed {peer} sent {enc} to {me}, which is not in the mesh (through its sidecar's passthrough, or past it: its own node's record says which)"))
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn verdict_codes_round_trip_and_reasons_intern_once() {
        for v in Verdict::ALL {
            assert_ne!(v.code(), 0);
            assert_eq!(Verdict::from_code(v.code()), Some(v));
        }
        assert_eq!(Verdict::from_code(0), None);
        assert_eq!(Verdict::from_code(200), None);
        let a = intern_reason("istio-mtls");
        assert!(std::ptr::eq(a, intern_reason("istio-mtls")));
    }

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::inventory::{pod::Workload, Inventory};

    const PROXY: u32 = 1337;
    const APP: u32 = 1000;

    fn container(name: &str, proxy: bool) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            id: None,
            proxy,
        }
    }

    fn pod(name: &str, mesh: MeshMode, ip: &str) -> PodInfo {
        let mut containers = vec![container(name, false)];
        if mesh == MeshMode::Sidecar {
            containers.push(container("istio-proxy", true));
        }
        if mesh == MeshMode::Gateway {
            containers = vec![container("istio-proxy", true)];
        }
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            host_ips: vec!["10.0.0.1".parse().unwrap()],
            workload: Workload {
                kind: "Deployment".into(),
                name: name.into(),
            },
            mesh,
            proxy_uid: PROXY,
            proxy_uid_explicit: true,
            exclude_outbound_ports: BTreeSet::from([5000, 8443, 2222]),
            exclude_inbound_ports: BTreeSet::from([8081]),
            exclude_outbound_ranges: vec!["192.0.2.0/24".parse().unwrap()],
            probe_ports: BTreeSet::from([8081]),
            containers,
            ..PodInfo::default()
        }
    }

    /// Who owns the judged socket, as a table row names it.
    #[derive(Clone, Copy)]
    enum Own {
        /// The local pod's application container.
        App,
        /// The local pod's proxy container.
        Proxy,
        /// The ztunnel pod's container (a node proxy acting in another pod's namespace).
        Ztunnel,
        /// No cgroup evidence.
        Unknown,
        Host,
    }

    struct Case {
        name: &'static str,
        direction: Direction,
        udp: bool,
        local: (&'static str, u16),
        remote: (&'static str, u16),
        uid: u32,
        /// Empty: no process attribution.
        comm: &'static str,
        owner: Own,
        redirect: Option<&'static str>,
        loopback: bool,
        encryption: Encryption,
        alpn: &'static [&'static str],
        hello_complete: bool,
        /// The DestinationRule (in shop) that tells the client's sidecar to send plaintext.
        plaintext_declared_by: Option<&'static str>,
        want: (Verdict, &'static str, Path),
    }

    /// One table row, read left to right: the flow's direction and ends, its socket's uid,
    /// process name and owner, what crossed the wire, and the decision wanted.
    const fn case(
        name: &'static str,
        (direction, local, remote): (Direction, (&'static str, u16), (&'static str, u16)),
        (uid, comm, owner): (u32, &'static str, Own),
        encryption: Encryption,
        want: (Verdict, &'static str, Path),
    ) -> Case {
        Case {
            name,
            direction,
            udp: false,
            local,
            remote,
            uid,
            comm,
            owner,
            redirect: None,
            loopback: false,
            encryption,
            alpn: &[],
            hello_complete: true,
            plaintext_declared_by: None,
            want,
        }
    }

    use Direction::{Egress, Ingress};
    use Encryption::{Plaintext as Plain, Quic, Ssh, Tls, Unknown};
    use Own::{App, Proxy};
    use Verdict::*;

    const ISTIO: &[&str] = &["istio-peer-exchange", "istio"];

    // Addresses: 10.0.0.1 node; .10 web (sidecar); .11 api (sidecar); .12 catalog (no mesh);
    // .13 amb (ambient); .14 coredns; .15 gw (gateway); .16 ztunnel; 203.0.113.9 outside
    // anything known; 10.96.0.10 the cluster DNS service.
    fn cases() -> Vec<Case> {
        vec![
            case(
                "nothing sent yet",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                (APP, "curl", App),
                Unknown,
                (Pending, "no-payload", Path::Direct),
            ),
            Case {
                redirect: Some("127.0.0.1:15001"),
                loopback: true,
                ..case(
                    "app to its sidecar",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (APP, "curl", App),
                    Plain,
                    (InPod, "app-to-sidecar", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "sidecar accepting its app",
                    (Ingress, ("127.0.0.1", 15001), ("10.0.0.10", 40000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (InPod, "app-to-sidecar", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "sidecar to its app",
                    (Egress, ("127.0.0.6", 41000), ("10.0.0.11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (InPod, "sidecar-to-app", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "app accepting its sidecar",
                    (Ingress, ("10.0.0.11", 8080), ("127.0.0.6", 41000)),
                    (APP, "python3", App),
                    Plain,
                    (InPod, "sidecar-to-app", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "sidecar to its app at the pod IP (no 127.0.0.6 bind)",
                    (Egress, ("10.0.0.11", 41000), ("10.0.0.11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (InPod, "sidecar-to-app", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "app accepting its sidecar from the pod IP",
                    (Ingress, ("10.0.0.11", 8080), ("10.0.0.11", 41000)),
                    (APP, "python3", App),
                    Plain,
                    (InPod, "loopback", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "app TLS inside mTLS, handed over at the pod IP",
                    (Ingress, ("10.0.0.11", 8443), ("10.0.0.11", 41000)),
                    (APP, "openssl", App),
                    Tls,
                    (InPod, "loopback", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "sidecar to its app over IPv6 from ::6",
                    (Egress, ("::6", 41000), ("fd00::11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (InPod, "sidecar-to-app", Path::InPod),
                )
            },
            Case {
                loopback: true,
                ..case(
                    "plain loopback",
                    (Egress, ("127.0.0.1", 41000), ("127.0.0.1", 9000)),
                    (APP, "curl", App),
                    Plain,
                    (InPod, "loopback", Path::InPod),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "sidecar to sidecar",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "sidecar to sidecar, by uid and process name (container unknown)",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (PROXY, "envoy", Own::Unknown),
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "mesh ALPN from the proxy's uid without a process name or container",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 5000)),
                    (PROXY, "", Own::Unknown),
                    Tls,
                    (BypassTls, "spoofed-mesh-alpn", Path::Direct),
                )
            },
            Case {
                hello_complete: false,
                plaintext_declared_by: None,
                ..case(
                    "sidecar to sidecar, ClientHello cut before its ALPN",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Tls,
                    (Mtls, "mtls-alpn-unseen", Path::Sidecar),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "sidecar accepting sidecar",
                    (Ingress, ("10.0.0.11", 15006), ("10.0.0.10", 40000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "gateway to a meshed pod",
                    (Egress, ("10.0.0.15", 40000), ("10.0.0.11", 8080)),
                    (PROXY, "envoy", Proxy),
                    Tls,
                    (Mtls, "istio-mtls", Path::Sidecar),
                )
            },
            case(
                "gateway accepting an outside client",
                (Ingress, ("10.0.0.15", 8080), ("10.0.0.12", 40000)),
                (PROXY, "envoy", Proxy),
                Plain,
                (Plaintext, "gateway-inbound", Path::Sidecar),
            ),
            case(
                "HBONE from ztunnel",
                (Egress, ("10.0.0.13", 40000), ("10.0.0.11", 15008)),
                (0, "ztunnel", Own::Ztunnel),
                Tls,
                (Mtls, "hbone", Path::Sidecar),
            ),
            Case {
                alpn: ISTIO,
                ..case(
                    "app offering the mesh's ALPN past its sidecar",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 5000)),
                    (APP, "python3", App),
                    Tls,
                    (BypassTls, "spoofed-mesh-alpn", Path::Direct),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "app offering the mesh's ALPN, then plaintext",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 5000)),
                    (APP, "python3", App),
                    Plain,
                    (BypassPlaintext, "spoofed-mesh-alpn", Path::Direct),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "app renamed envoy under the proxy's uid, mesh ALPN",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9080)),
                    (PROXY, "envoy", App),
                    Tls,
                    (BypassTls, "spoofed-mesh-alpn", Path::Direct),
                )
            },
            case(
                "app renamed envoy under the proxy's uid",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9080)),
                (PROXY, "envoy", App),
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            case(
                "app renamed as an Envoy worker under the proxy's uid",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9080)),
                (PROXY, "wrk:worker_0", App),
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            Case {
                alpn: ISTIO,
                ..case(
                    "sidecar passing an app's mesh-ALPN handshake to an unmeshed pod",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 9000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Tls,
                    (BypassTls, "spoofed-mesh-alpn", Path::Sidecar),
                )
            },
            Case {
                alpn: ISTIO,
                ..case(
                    "sidecar passing a fake mesh-ALPN hello then plaintext",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 9000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (Plaintext, "passthrough", Path::Sidecar),
                )
            },
            case(
                "excluded outbound port",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 5000)),
                (APP, "curl", App),
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "excluded outbound range",
                (Egress, ("10.0.0.10", 40000), ("192.0.2.7", 80)),
                (APP, "curl", App),
                Plain,
                (BypassPlaintext, "excluded-ip-range", Path::Direct),
            ),
            case(
                "capture missing",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 80)),
                (APP, "curl", App),
                Plain,
                (BypassPlaintext, "no-capture", Path::Direct),
            ),
            case(
                "app TLS past the sidecar",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 8443)),
                (APP, "curl", App),
                Tls,
                (BypassTls, "app-tls", Path::Direct),
            ),
            case(
                "app SSH past the sidecar",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 2222)),
                (APP, "ssh", App),
                Ssh,
                (BypassTls, "app-ssh", Path::Direct),
            ),
            Case {
                udp: true,
                ..case(
                    "app UDP past the sidecar",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 9999)),
                    (APP, "python3", App),
                    Plain,
                    (BypassPlaintext, "udp", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "app QUIC past the sidecar",
                    (Egress, ("10.0.0.10", 40000), ("203.0.113.9", 443)),
                    (APP, "curl", App),
                    Quic,
                    (BypassTls, "app-quic", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "app UDP to port 53 of a peer that serves no DNS",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 53)),
                    (APP, "python3", App),
                    Plain,
                    (BypassPlaintext, "udp", Path::Direct),
                )
            },
            case(
                "app as the proxy's uid",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9080)),
                (PROXY, "curl", App),
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            case(
                "app as the proxy's uid, TLS",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9080)),
                (PROXY, "openssl", App),
                Tls,
                (BypassTls, "proxy-uid-app", Path::Direct),
            ),
            case(
                "app as the proxy's uid to port 15020 of a pod outside the mesh",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 15020)),
                (PROXY, "curl", App),
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            case(
                "app as the proxy's uid to port 53 over TCP, not a DNS server",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 53)),
                (PROXY, "curl", App),
                Plain,
                (BypassPlaintext, "proxy-uid-app", Path::Direct),
            ),
            case(
                "excluded inbound port",
                (Ingress, ("10.0.0.11", 8081), ("10.0.0.12", 40000)),
                (APP, "python3", App),
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "inbound capture missing",
                (Ingress, ("10.0.0.11", 8080), ("10.0.0.12", 40000)),
                (APP, "python3", App),
                Plain,
                (BypassPlaintext, "no-capture", Path::Direct),
            ),
            case(
                "PERMISSIVE sidecar, unmeshed client",
                (Ingress, ("10.0.0.11", 15006), ("10.0.0.12", 40000)),
                (PROXY, "wrk:worker_0", Proxy),
                Plain,
                (Plaintext, "permissive-inbound", Path::Sidecar),
            ),
            case(
                "PERMISSIVE sidecar, meshed client that bypassed",
                (Ingress, ("10.0.0.11", 15006), ("10.0.0.10", 40000)),
                (PROXY, "wrk:worker_0", Proxy),
                Plain,
                (BypassPlaintext, "peer-bypass", Path::Sidecar),
            ),
            case(
                "sidecar told not to use mTLS",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                (PROXY, "wrk:worker_0", Proxy),
                Plain,
                (Plaintext, "proxy-plaintext", Path::Sidecar),
            ),
            Case {
                plaintext_declared_by: Some("api-plaintext"),
                ..case(
                    "sidecar told by a DestinationRule to send plaintext",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (Plaintext, "tls-disabled", Path::Sidecar),
                )
            },
            Case {
                plaintext_declared_by: Some("api-plaintext"),
                ..case(
                    "sidecar accepting the plaintext a DestinationRule tells its meshed client to send",
                    (Ingress, ("10.0.0.11", 15006), ("10.0.0.10", 40000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Plain,
                    (Plaintext, "tls-disabled", Path::Sidecar),
                )
            },
            Case {
                plaintext_declared_by: Some("api-plaintext"),
                ..case(
                    "the same rule, but TLS on the wire: the application's own",
                    (Ingress, ("10.0.0.11", 15006), ("10.0.0.10", 40000)),
                    (PROXY, "wrk:worker_0", Proxy),
                    Tls,
                    (BypassTls, "app-tls", Path::Sidecar),
                )
            },
            Case {
                plaintext_declared_by: Some("api-plaintext"),
                ..case(
                    "the same rule, but the client's application past its sidecar",
                    (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 8080)),
                    (APP, "curl", App),
                    Plain,
                    (BypassPlaintext, "no-capture", Path::Direct),
                )
            },
            case(
                "sidecar passthrough, plaintext",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.12", 80)),
                (PROXY, "wrk:worker_0", Proxy),
                Plain,
                (Plaintext, "passthrough", Path::Sidecar),
            ),
            case(
                "sidecar passthrough, app TLS",
                (Egress, ("10.0.0.10", 40000), ("203.0.113.9", 443)),
                (PROXY, "envoy", Proxy),
                Tls,
                (Unmeshed, "passthrough-tls", Path::Sidecar),
            ),
            case(
                "sidecar passing app TLS to a meshed pod",
                (Egress, ("10.0.0.10", 40000), ("10.0.0.11", 9443)),
                (PROXY, "envoy", Proxy),
                Tls,
                (BypassTls, "app-tls", Path::Sidecar),
            ),
            case(
                "unmeshed client to meshed",
                (Egress, ("10.0.0.12", 40000), ("10.0.0.11", 9080)),
                (APP, "curl", App),
                Plain,
                (Plaintext, "unmeshed-client", Path::Direct),
            ),
            case(
                "meshed client to unmeshed, excluded port",
                (Ingress, ("10.0.0.12", 5000), ("10.0.0.10", 40000)),
                (APP, "python3", App),
                Plain,
                (BypassPlaintext, "excluded-port", Path::Direct),
            ),
            case(
                "meshed client to unmeshed, TLS on excluded port",
                (Ingress, ("10.0.0.12", 8443), ("10.0.0.10", 40000)),
                (APP, "openssl", App),
                Tls,
                (BypassTls, "app-tls", Path::Direct),
            ),
            case(
                "meshed client to unmeshed, SSH on excluded port",
                (Ingress, ("10.0.0.12", 2222), ("10.0.0.10", 40000)),
                (0, "sshd", App),
                Ssh,
                (BypassTls, "app-ssh", Path::Direct),
            ),
            Case {
                alpn: ISTIO,
                ..case(
                    "meshed client's fake mesh hello on an excluded port, at the server",
                    (Ingress, ("10.0.0.12", 5000), ("10.0.0.10", 40000)),
                    (APP, "python3", App),
                    Plain,
                    (BypassPlaintext, "spoofed-mesh-alpn", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "meshed client's UDP at an unmeshed server",
                    (Ingress, ("10.0.0.12", 9999), ("10.0.0.10", 40000)),
                    (APP, "python3", App),
                    Plain,
                    (BypassPlaintext, "udp", Path::Direct),
                )
            },
            case(
                "meshed client to unmeshed",
                (Ingress, ("10.0.0.12", 80), ("10.0.0.10", 40000)),
                (APP, "python3", App),
                Plain,
                (Plaintext, "unmeshed-server", Path::Direct),
            ),
            case(
                "kubelet probe, node end",
                (Egress, ("10.0.0.1", 40000), ("10.0.0.11", 8081)),
                (0, "kubelet", Own::Host),
                Plain,
                (Expected, "probe", Path::Direct),
            ),
            case(
                "kubelet probe, pod end",
                (Ingress, ("10.0.0.11", 8081), ("10.0.0.1", 40000)),
                (APP, "python3", App),
                Plain,
                (Expected, "probe", Path::Direct),
            ),
            Case {
                udp: true,
                ..case(
                    "DNS to a CoreDNS pod",
                    (Egress, ("10.0.0.12", 40000), ("10.0.0.14", 53)),
                    (APP, "curl", App),
                    Plain,
                    (Expected, "dns", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "DNS at the CoreDNS pod",
                    (Ingress, ("10.0.0.14", 53), ("10.0.0.10", 40000)),
                    (APP, "coredns", App),
                    Plain,
                    (Expected, "dns", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "DNS from a meshed app to the cluster DNS service",
                    (Egress, ("10.0.0.10", 40000), ("10.96.0.10", 53)),
                    (APP, "curl", App),
                    Plain,
                    (Expected, "dns", Path::Direct),
                )
            },
            Case {
                udp: true,
                ..case(
                    "port 53 to a host that is no DNS server",
                    (Egress, ("10.0.0.12", 40000), ("203.0.113.9", 53)),
                    (APP, "curl", App),
                    Plain,
                    (Unmeshed, "no-sidecar", Path::Direct),
                )
            },
            case(
                "metrics scrape of a meshed pod, scraper end",
                (Egress, ("10.0.0.1", 40000), ("10.0.0.11", 15020)),
                (65534, "prometheus", Own::Host),
                Plain,
                (Expected, "metrics", Path::Direct),
            ),
            case(
                "metrics scrape, the proxy's end",
                (Ingress, ("10.0.0.11", 15020), ("10.0.0.1", 40000)),
                (PROXY, "pilot-agent", Proxy),
                Plain,
                (Expected, "metrics", Path::Direct),
            ),
            case(
                "port 15020 served by an app, not the proxy",
                (Ingress, ("10.0.0.11", 15020), ("10.0.0.12", 40000)),
                (APP, "python3", App),
                Plain,
                (BypassPlaintext, "no-capture", Path::Direct),
            ),
            case(
                "unmeshed both",
                (Egress, ("10.0.0.12", 40000), ("203.0.113.9", 80)),
                (APP, "curl", App),
                Plain,
                (Unmeshed, "no-sidecar", Path::Direct),
            ),
            case(
                "host network",
                (Egress, ("10.0.0.1", 40000), ("203.0.113.9", 80)),
                (0, "curl", Own::Host),
                Plain,
                (Unmeshed, "host-network", Path::Direct),
            ),
            case(
                "ambient pod's application",
                (Egress, ("10.0.0.13", 40000), ("10.0.0.12", 80)),
                (APP, "curl", App),
                Plain,
                (Plaintext, "ambient-unverified", Path::Direct),
            ),
        ]
    }

    fn node() -> Inventory {
        let mut coredns = pod("coredns", MeshMode::None, "10.0.0.14");
        coredns.labels = BTreeMap::from([("k8s-app".into(), "kube-dns".into())]);
        let mut ztunnel = pod("ztunnel", MeshMode::None, "10.0.0.16");
        ztunnel.containers = vec![container("ztunnel", true)];
        let mut web = pod("web", MeshMode::Sidecar, "10.0.0.10");
        web.ips.push("fd00::10".parse().unwrap());
        let mut api = pod("api", MeshMode::Sidecar, "10.0.0.11");
        api.ips.push("fd00::11".parse().unwrap());
        Inventory::new(
            "test",
            vec![
                web,
                api,
                pod("catalog", MeshMode::None, "10.0.0.12"),
                pod("amb", MeshMode::Ambient, "10.0.0.13"),
                coredns,
                pod("gw", MeshMode::Gateway, "10.0.0.15"),
                ztunnel,
            ],
        )
    }

    fn owner<'a>(own: Own, local: Identity<'a>, inventory: &'a Inventory) -> Owner<'a> {
        let find = |pod: &'a PodInfo, proxy: bool| match pod
            .containers
            .iter()
            .find(|c| c.proxy == proxy)
        {
            Some(container) => Owner::Container { pod, container },
            None => Owner::Pod(pod),
        };
        match (own, local.pod()) {
            (App, Some(pod)) => find(pod, false),
            (Proxy, Some(pod)) => find(pod, true),
            (Own::Ztunnel, _) => match inventory.lookup("10.0.0.16".parse().unwrap()) {
                Identity::Pod(pod) => find(pod, true),
                _ => unreachable!("the ztunnel pod"),
            },
            (Own::Host, _) => Owner::Host,
            _ => Owner::Unknown,
        }
    }

    #[test]
    fn every_verdict_and_reason() {
        let inventory = node();
        let policy = Policy::default();
        let mut wrong = Vec::new();
        for c in cases() {
            let alpn: Vec<String> = c.alpn.iter().map(|s| s.to_string()).collect();
            let addr = |(ip, port): (&str, u16)| SocketAddr::new(ip.parse().unwrap(), port);
            let (local, remote) = (addr(c.local), addr(c.remote));
            let local_id = inventory.lookup(local.ip());
            let ev = Evidence {
                direction: c.direction,
                udp: c.udp,
                local,
                remote,
                uid: Some(c.uid),
                comm: Some(c.comm).filter(|c| !c.is_empty()),
                owner: owner(c.owner, local_id, &inventory),
                redirect: c.redirect.map(|r| r.parse().unwrap()),
                loopback: c.loopback,
                encryption: c.encryption,
                alpn: &alpn,
                hello_complete: c.hello_complete,
                plaintext_declared_by: c.plaintext_declared_by.map(|name| PolicyRef {
                    kind: crate::inventory::policy::PolicyKind::DestinationRule,
                    namespace: "shop".into(),
                    name: name.into(),
                }),
            };
            let d = decide(&ev, local_id, inventory.lookup(remote.ip()), &policy);
            if (d.verdict, d.reason, d.path) != c.want {
                wrong.push(format!(
                    "{}: want {:?}, got {:?}: {}",
                    c.name,
                    c.want,
                    (d.verdict, d.reason, d.path),
                    d.detail
                ));
            }
            assert!(
                !d.detail.is_empty() && !d.detail.contains('\n'),
                "{}: one sentence",
                c.name
            );
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
    fn no_name_or_port_earns_mtls_for_an_application() {
        // Whatever an application in a meshed pod chooses (its name, its uid's match with the
        // proxy's, the mesh ALPN, a mesh port), its own socket is never mtls.
        let inventory = node();
        let policy = Policy::default();
        let web = inventory.lookup("10.0.0.10".parse().unwrap());
        let istio: Vec<String> = ISTIO.iter().map(|s| s.to_string()).collect();
        for comm in ["envoy", "wrk:worker_0", "pilot-agent", "curl"] {
            for uid in [PROXY, APP] {
                for port in [8080, 15008, 15001, 15006] {
                    let ev = Evidence {
                        direction: Egress,
                        udp: false,
                        local: "10.0.0.10:40000".parse().unwrap(),
                        remote: SocketAddr::new("10.0.0.11".parse().unwrap(), port),
                        uid: Some(uid),
                        comm: Some(comm),
                        owner: owner(App, web, &inventory),
                        redirect: None,
                        loopback: false,
                        encryption: Tls,
                        alpn: &istio,
                        hello_complete: true,
                        plaintext_declared_by: None,
                    };
                    let remote = inventory.lookup(ev.remote.ip());
                    let d = decide(&ev, web, remote, &policy);
                    assert!(d.verdict.is_bypass(), "{comm} uid {uid} port {port}: {d:?}");
                }
            }
        }
    }

    #[test]
    fn destinations_parse_and_print() {
        for (text, ok) in [
            ("node", true),
            ("mesh-proxy", true),
            ("any", true),
            ("pods:k8s-app=kube-dns", true),
            ("10.96.0.10", true),
            ("fd00::/8", true),
            ("pods:=x", false),
            ("pods:k8s-app", false),
            ("kube-dns", false),
        ] {
            let parsed = text.parse::<Destination>();
            assert_eq!(parsed.is_ok(), ok, "{text}: {parsed:?}");
            if let Ok(d) = parsed {
                let round = d.to_string();
                assert_eq!(round.parse::<Destination>().unwrap(), d, "{text}");
            }
        }
        assert_eq!(
            "10.96.0.10".parse::<Destination>().unwrap().to_string(),
            "10.96.0.10/32"
        );
    }

    #[test]
    fn policy_files() {
        let p: Policy =
            serde_json::from_str(r#"{"proxy_processes": ["my-proxy"], "probes": false}"#).unwrap();
        assert_eq!(p.proxy_processes, ["my-proxy"]);
        assert!(!p.probes);
        assert_eq!(p.hbone_port, 15008, "unset fields keep their defaults");
        assert_eq!(p.mesh_root_namespace, "istio-system");
        let p: Policy =
            serde_json::from_str(r#"{"mesh_root_namespace": "istio-system-2"}"#).unwrap();
        assert_eq!(p.mesh_root_namespace, "istio-system-2");
        let e = serde_json::from_str::<Policy>(r#"{"proxy_proceses": []}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `proxy_proceses`"), "{e}");
        let e = serde_json::from_str::<Policy>(r#"{"expected": [{"rule": "dns", "ports": [53]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing field `to`"),
            "a port alone is not a rule: {e}"
        );
        let e = serde_json::from_str::<Policy>(
            r#"{"expected": [{"rule": "dns", "ports": [53], "to": ["kube-dns"]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not a destination"), "{e}");
        let p: Policy = serde_json::from_str(
            r#"{"expected": [{"rule": "dns", "ports": [53], "to": ["10.43.0.10", "pods:k8s-app=kube-dns"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&p.expected).unwrap()[0]["to"],
            serde_json::json!(["10.43.0.10/32", "pods:k8s-app=kube-dns"])
        );
    }
}
