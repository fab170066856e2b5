//! The traffic meshguard must judge, driven by real clients against the node's real servers.
//! Each scenario says what it does, what must be seen on the wire (the ground truth, checked
//! without meshguard), and the verdict and reason each resulting flow must get, at both ends.

mod adversarial;
mod realism;

use std::net::Ipv4Addr;

use anyhow::bail;
use serde_json::Value;

use super::{
    capture::{INBOUND_PASSTHROUGH_SOURCE, INBOUND_PORT, OUTBOUND_PORT},
    envoy::{istio_sni, ISTIO_ALPN},
    App, Exclusions, InboundMode, Mesh, MeshPeer, Node, PodSpec, APP_UID, PROXY_UID,
};
pub use adversarial::adversarial;
pub use realism::{mesh_requests, realism_pods, realism_variants, RealismVariant};

/// The pods every scenario runs on: a meshed shop and an unmeshed legacy namespace, and the
/// cluster's DNS.
pub fn pods() -> Vec<PodSpec> {
    let sidecar = |inbound, capture| Mesh::Sidecar { inbound, capture };
    let api = MeshPeer {
        port: 8080,
        service: "api".into(),
        namespace: "shop".into(),
        service_account: "api".into(),
    };
    vec![
        PodSpec {
            mesh: sidecar(InboundMode::Strict, true),
            exclude: Exclusions {
                outbound_ports: vec![5000, 8443, 2222],
                ..Exclusions::default()
            },
            mesh_peers: vec![api],
            plaintext_peers: vec![MeshPeer {
                port: 9080,
                service: "ratings".into(),
                namespace: "shop".into(),
                service_account: "ratings".into(),
            }],
            ..PodSpec::new("shop", "web")
        },
        PodSpec {
            mesh: sidecar(InboundMode::Strict, true),
            apps: vec![App::Http(8080), App::Http(8081)],
            probe_port: Some(8081),
            exclude: Exclusions {
                inbound_ports: vec![8081],
                ..Exclusions::default()
            },
            ..PodSpec::new("shop", "api")
        },
        PodSpec {
            mesh: sidecar(InboundMode::Permissive, true),
            apps: vec![App::Http(9080)],
            ..PodSpec::new("shop", "reviews")
        },
        // Injected, but its capture rules never landed (the CNI race).
        PodSpec {
            mesh: sidecar(InboundMode::Strict, false),
            ..PodSpec::new("shop", "batch")
        },
        // Beside its HTTP service, listeners for the adversarial workloads: ports a policy
        // might take for DNS or Istio's agent, a UDP sink, sshd.
        PodSpec {
            apps: vec![
                App::Http(5000),
                App::Http(53),
                App::Http(15020),
                App::UdpSink(9999),
                App::Ssh(2222),
            ],
            ..PodSpec::new("legacy", "catalog")
        },
        PodSpec {
            apps: vec![App::Tls(8443)],
            ..PodSpec::new("legacy", "vault")
        },
        PodSpec::new("legacy", "client"),
        // Last, so that adding it moved no other pod's address.
        PodSpec {
            apps: vec![App::Dns(53)],
            labels: vec![("k8s-app".into(), "kube-dns".into())],
            ..PodSpec::new("kube-system", "coredns")
        },
        // Reached by web's sidecar in plaintext, as a DestinationRule tells it (see
        // podlist.rs), so PERMISSIVE.
        PodSpec {
            mesh: sidecar(InboundMode::Permissive, true),
            apps: vec![App::Http(9080)],
            ..PodSpec::new("shop", "ratings")
        },
    ]
}

/// One end of a flow, as a scenario names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Pod(&'static str),
    /// The node itself (host network: kubelet).
    Node,
    /// A loopback address inside a pod (app-to-sidecar hops).
    Loopback(&'static str),
}

/// A flow a scenario produces and the verdict it must get.
#[derive(Clone, Debug)]
pub struct Expected {
    pub what: &'static str,
    pub local: Party,
    pub remote: Party,
    pub local_port: Option<u16>,
    pub remote_port: Option<u16>,
    /// The socket owner, where two sockets share the other fields (app and sidecar).
    pub uid: Option<u32>,
    /// The address its client dialled, where a sidecar's capture accepted it on a port it
    /// accepts every destination on.
    pub dialled: Option<(Party, u16)>,
    pub verdict: &'static str,
    pub reason: &'static str,
}

impl Expected {
    fn ip(node: &Node, party: Party) -> String {
        match party {
            Party::Pod(name) => node.pod(name).ip.to_string(),
            Party::Node => node.ip.to_string(),
            Party::Loopback(ip) => ip.to_string(),
        }
    }

    /// Whether a flow record (`--log-flows` JSON) is this flow.
    pub fn matches(&self, node: &Node, record: &Value) -> bool {
        let port_ok = |at: &str, want: Option<u16>| want.is_none_or(|p| record[at]["port"] == p);
        record["local"]["ip"] == Self::ip(node, self.local).as_str()
            && record["remote"]["ip"] == Self::ip(node, self.remote).as_str()
            && port_ok("local", self.local_port)
            && port_ok("remote", self.remote_port)
            && self.uid.is_none_or(|uid| record["process"]["uid"] == uid)
            && self.dialled.is_none_or(|(party, port)| {
                record["local"]["dialled"] == format!("{}:{port}", Self::ip(node, party)).as_str()
            })
    }
}

/// What a packet capture on the node's bridge must show for a scenario, with no meshguard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    /// A TLS ClientHello with this SNI and ALPN list.
    Tls { sni: String, alpn: Vec<String> },
    /// A plaintext HTTP request.
    PlaintextHttp,
    /// A genuine ClientHello offering this ALPN list, then plaintext HTTP on the same
    /// connection.
    TlsThenPlaintextHttp { alpn: Vec<String> },
    /// A DNS query over UDP for `name`, answered with pod `answer`'s address.
    Dns { name: String, answer: &'static str },
    /// Plaintext UDP datagrams.
    PlaintextUdp,
    /// An SSH key exchange: both versions, then the client's key share and the server's reply.
    Ssh,
}

/// One client-to-server exchange crossing the bridge, and what it must look like there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub client: Party,
    /// The client's source port, where the scenario fixes it.
    pub client_port: Option<u16>,
    pub server: &'static str,
    pub port: u16,
    pub wire: Wire,
}

impl Crossing {
    pub fn client_ip(&self, node: &Node) -> Ipv4Addr {
        match self.client {
            Party::Pod(name) => node.pod(name).ip,
            _ => node.ip,
        }
    }
}

pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    /// Who connects to whom on which port, as it crosses the bridge.
    pub client: Party,
    pub server: &'static str,
    pub port: u16,
    pub wire: Wire,
    /// The client's source port, where the scenario fixes it (to tell its flows apart).
    pub client_port: Option<u16>,
    /// Further exchanges, to other servers, of the same client.
    pub also: Vec<Crossing>,
    pub expect: Vec<Expected>,
    drive: fn(&Node) -> anyhow::Result<()>,
}

impl Scenario {
    /// Runs the scenario's real clients once.
    pub fn run(&self, node: &Node) -> anyhow::Result<()> {
        (self.drive)(node).map_err(|e| e.context(format!("scenario {}", self.name)))
    }

    pub fn client_ip(&self, node: &Node) -> Ipv4Addr {
        self.crossings()[0].client_ip(node)
    }

    /// Every exchange of the scenario that crosses the bridge, the main one first.
    pub fn crossings(&self) -> Vec<Crossing> {
        let main = Crossing {
            client: self.client,
            client_port: self.client_port,
            server: self.server,
            port: self.port,
            wire: self.wire.clone(),
        };
        std::iter::once(main).chain(self.also.clone()).collect()
    }
}

fn curl_ok(out: std::process::Output, what: &str) -> anyhow::Result<()> {
    let code = String::from_utf8_lossy(&out.stdout);
    if code.trim() != "200" {
        bail!(
            "{what}: HTTP {code}, {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const CURL: [&str; 7] = ["-sS", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"];

/// curl from a pod's application, as `uid`.
fn curl(node: &Node, from: &str, uid: u32, extra: &[&str], url: &str) -> anyhow::Result<()> {
    let pod = node.pod(from);
    let out = pod.run(pod.command(uid, "curl").args(CURL).args(extra).arg(url))?;
    curl_ok(out, url)
}

fn url(node: &Node, pod: &str, port: u16, path: &str) -> String {
    format!("http://{}:{port}{path}", node.pod(pod).ip)
}

fn end(
    what: &'static str,
    local: Party,
    remote: Party,
    ports: (Option<u16>, Option<u16>),
    verdict: &'static str,
    reason: &'static str,
) -> Expected {
    Expected {
        what,
        local,
        remote,
        local_port: ports.0,
        remote_port: ports.1,
        uid: None,
        dialled: None,
        verdict,
        reason,
    }
}

/// The client's and the server's socket of one connection that crossed the bridge.
fn both_ends(
    client: Party,
    server: &'static str,
    server_local_port: u16,
    port: u16,
    client_end: (&'static str, &'static str),
    server_end: (&'static str, &'static str),
) -> Vec<Expected> {
    vec![
        end(
            "client socket",
            client,
            Party::Pod(server),
            (None, Some(port)),
            client_end.0,
            client_end.1,
        ),
        end(
            "server socket",
            Party::Pod(server),
            client,
            (Some(server_local_port), None),
            server_end.0,
            server_end.1,
        ),
    ]
}

/// A meshed client's application calling a meshed server's, captured at both ends: the hops
/// inside each pod, and the sidecar-to-sidecar hop across the bridge with the verdict and
/// reason `bridge` names at both its ends.
fn through_both_sidecars(
    client: &'static str,
    server: &'static str,
    port: u16,
    bridge: (&'static str, &'static str),
) -> Vec<Expected> {
    let (client, server) = (Party::Pod(client), Party::Pod(server));
    let sidecar_to_app = Party::Loopback(INBOUND_PASSTHROUGH_SOURCE);
    vec![
        Expected {
            uid: Some(APP_UID),
            ..end(
                "client app to its sidecar (redirected)",
                client,
                server,
                (None, Some(port)),
                "in-pod",
                "app-to-sidecar",
            )
        },
        Expected {
            dialled: Some((server, port)),
            ..end(
                "client sidecar accepting its app",
                Party::Loopback("127.0.0.1"),
                client,
                (Some(OUTBOUND_PORT), None),
                "in-pod",
                "app-to-sidecar",
            )
        },
        Expected {
            uid: Some(PROXY_UID),
            ..end(
                "client sidecar to server",
                client,
                server,
                (None, Some(port)),
                bridge.0,
                bridge.1,
            )
        },
        end(
            "server sidecar accepting client",
            server,
            client,
            (Some(INBOUND_PORT), None),
            bridge.0,
            bridge.1,
        ),
        end(
            "server sidecar to its app",
            sidecar_to_app,
            server,
            (None, Some(port)),
            "in-pod",
            "sidecar-to-app",
        ),
        end(
            "server app accepting its sidecar",
            server,
            sidecar_to_app,
            (Some(port), None),
            "in-pod",
            "sidecar-to-app",
        ),
    ]
}

fn plain() -> Wire {
    Wire::PlaintextHttp
}

/// The scenarios with a bypass among their flows.
pub fn bypasses() -> Vec<Scenario> {
    let found: Vec<_> = all()
        .into_iter()
        .filter(|s| s.expect.iter().any(|e| e.verdict == "bypass-plaintext"))
        .collect();
    assert!(found.len() >= 3, "the testbed has its bypass scenarios");
    found
}

pub fn all() -> Vec<Scenario> {
    let web = Party::Pod("web");
    let api_sni = istio_sni(&MeshPeer {
        port: 8080,
        service: "api".into(),
        namespace: "shop".into(),
        service_account: "api".into(),
    });
    let with_uid = |mut e: Expected, uid| {
        e.uid = Some(uid);
        e
    };
    vec![
        Scenario {
            name: "mesh-mtls",
            title: "meshed web calls meshed api through both sidecars",
            client: web,
            server: "api",
            port: 8080,
            wire: Wire::Tls {
                sni: api_sni,
                alpn: ISTIO_ALPN.map(String::from).to_vec(),
            },
            expect: through_both_sidecars("web", "api", 8080, ("mtls", "istio-mtls")),
            client_port: None,
            also: Vec::new(),
            drive: |node| curl(node, "web", APP_UID, &[], &url(node, "api", 8080, "/")),
        },
        Scenario {
            name: "rule-plaintext",
            title: "meshed web calls meshed ratings through both sidecars, in plaintext as a DestinationRule says",
            client: web,
            server: "ratings",
            port: 9080,
            wire: plain(),
            expect: through_both_sidecars("web", "ratings", 9080, ("plaintext", "tls-disabled")),
            client_port: None,
            also: Vec::new(),
            drive: |node| curl(node, "web", APP_UID, &[], &url(node, "ratings", 9080, "/")),
        },
        Scenario {
            name: "excluded-port",
            title: "meshed web calls unmeshed catalog on a port excluded from capture",
            client: web,
            server: "catalog",
            port: 5000,
            wire: plain(),
            expect: both_ends(
                web,
                "catalog",
                5000,
                5000,
                ("bypass-plaintext", "excluded-port"),
                ("bypass-plaintext", "excluded-port"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| curl(node, "web", APP_UID, &[], &url(node, "catalog", 5000, "/")),
        },
        Scenario {
            name: "proxy-uid-app",
            title: "an application in meshed web runs as the proxy's uid and skips capture",
            client: web,
            server: "reviews",
            port: 9080,
            wire: plain(),
            expect: vec![
                with_uid(
                    end(
                        "client socket",
                        web,
                        Party::Pod("reviews"),
                        (None, Some(9080)),
                        "bypass-plaintext",
                        "proxy-uid-app",
                    ),
                    PROXY_UID,
                ),
                // Plaintext from a meshed pod, whose sidecar would have used mTLS: the server's
                // end sees the bypass too.
                end(
                    "reviews sidecar accepting plaintext",
                    Party::Pod("reviews"),
                    web,
                    (Some(INBOUND_PORT), None),
                    "bypass-plaintext",
                    "peer-bypass",
                ),
            ],
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                curl(
                    node,
                    "web",
                    PROXY_UID,
                    &[],
                    &url(node, "reviews", 9080, "/"),
                )
            },
        },
        Scenario {
            name: "permissive-plaintext",
            title: "unmeshed client calls PERMISSIVE reviews in plaintext",
            client: Party::Pod("client"),
            server: "reviews",
            port: 9080,
            wire: plain(),
            expect: both_ends(
                Party::Pod("client"),
                "reviews",
                INBOUND_PORT,
                9080,
                ("plaintext", "unmeshed-client"),
                ("plaintext", "permissive-inbound"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                curl(
                    node,
                    "client",
                    APP_UID,
                    &[],
                    &url(node, "reviews", 9080, "/"),
                )
            },
        },
        Scenario {
            name: "app-tls",
            title: "meshed web speaks its own TLS to vault on an excluded port",
            client: web,
            server: "vault",
            port: 8443,
            wire: Wire::Tls {
                sni: "vault.legacy.svc.cluster.local".into(),
                alpn: vec!["http/1.1".into()],
            },
            expect: both_ends(
                web,
                "vault",
                8443,
                8443,
                ("bypass-tls", "app-tls"),
                ("bypass-tls", "app-tls"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                let host = "vault.legacy.svc.cluster.local";
                let resolve = format!("{host}:8443:{}", node.pod("vault").ip);
                curl(
                    node,
                    "web",
                    APP_UID,
                    &["-k", "--http1.1", "--resolve", &resolve],
                    &format!("https://{host}:8443/"),
                )
            },
        },
        Scenario {
            name: "no-capture",
            title: "meshed batch, whose capture rules are missing, calls catalog",
            client: Party::Pod("batch"),
            server: "catalog",
            port: 5000,
            wire: plain(),
            expect: both_ends(
                Party::Pod("batch"),
                "catalog",
                5000,
                5000,
                ("bypass-plaintext", "no-capture"),
                // Alone, the server's end cannot tell a bypass from the sidecar's plaintext
                // passthrough to a server outside the mesh; the client's end can.
                ("plaintext", "unmeshed-server"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                curl(
                    node,
                    "batch",
                    APP_UID,
                    &[],
                    &url(node, "catalog", 5000, "/"),
                )
            },
        },
        Scenario {
            name: "kubelet-probe",
            title: "the node probes api's readiness port",
            client: Party::Node,
            server: "api",
            port: 8081,
            wire: plain(),
            expect: both_ends(
                Party::Node,
                "api",
                8081,
                8081,
                ("expected", "probe"),
                ("expected", "probe"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                let out = node.cgroup.run(
                    node.command("curl")
                        .args(CURL)
                        .arg(url(node, "api", 8081, "/healthz")),
                )?;
                curl_ok(out, "probe")
            },
        },
        // STRICT is declared for api (see podlist.rs), but its sidecar never sees this port.
        Scenario {
            name: "strict-excluded-inbound",
            title: "an unmeshed client reaches STRICT api's application on a port excluded from capture",
            client: Party::Pod("client"),
            server: "api",
            port: 8081,
            wire: plain(),
            expect: both_ends(
                Party::Pod("client"),
                "api",
                8081,
                8081,
                ("plaintext", "unmeshed-client"),
                ("bypass-plaintext", "excluded-port"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                curl(
                    node,
                    "client",
                    APP_UID,
                    &[],
                    &url(node, "api", 8081, "/healthz"),
                )
            },
        },
        Scenario {
            name: "unmeshed",
            title: "unmeshed client calls unmeshed catalog",
            client: Party::Pod("client"),
            server: "catalog",
            port: 5000,
            wire: plain(),
            expect: both_ends(
                Party::Pod("client"),
                "catalog",
                5000,
                5000,
                ("unmeshed", "no-sidecar"),
                ("unmeshed", "no-sidecar"),
            ),
            client_port: None,
            also: Vec::new(),
            drive: |node| {
                curl(
                    node,
                    "client",
                    APP_UID,
                    &[],
                    &url(node, "catalog", 5000, "/"),
                )
            },
        },
    ]
}
