//! The mesh as it varies in the real world, one variant per axis: how the sidecar's TLS is
//! configured (and so how large its ClientHellos are and where their ALPN sits), how it hands
//! inbound connections to the application, IPv6, and an ingress gateway in front of the mesh.
//! Every variant must carry its requests across the bridge as mTLS with Istio's ALPN.

use anyhow::bail;

use super::CURL;
use crate::testbed::{
    App, Curves, InboundForward, InboundMode, Mesh, MeshPeer, Node, PodSpec, SidecarConfig,
    TlsProfile, APP_UID, CLUSTER_DOMAIN,
};

const NAMESPACE: &str = "realism";
/// The port every variant's server listens on (Bookinfo's).
const PORT: u16 = 9080;
const GATEWAY_PORT: u16 = 8080;

/// One way the mesh looks in the real world, and which pods on the realism node show it.
#[derive(Clone, Debug)]
pub struct RealismVariant {
    pub name: &'static str,
    /// The axis it covers, in words.
    pub covers: &'static str,
    /// The pod whose application makes the requests, and where it sends them.
    pub client: &'static str,
    pub server: &'static str,
    pub port: u16,
    /// Whether the requests (and the mTLS hop) go over IPv6.
    pub ipv6: bool,
    /// The hop that must cross the bridge as mTLS, `(from pod, to pod, port)`: the client's
    /// own connection through its sidecar, or the gateway's to its upstream.
    pub mesh_hop: (&'static str, &'static str, u16),
    /// How the proxy that originates the mesh hop is configured.
    pub sidecar: SidecarConfig,
}

fn peer(server: &str) -> MeshPeer {
    MeshPeer {
        port: PORT,
        service: server.into(),
        namespace: NAMESPACE.into(),
        service_account: server.into(),
    }
}

pub fn realism_variants() -> Vec<RealismVariant> {
    let sidecar_variant = |name, covers, client, server, ipv6, sidecar| RealismVariant {
        name,
        covers,
        client,
        server,
        port: PORT,
        ipv6,
        mesh_hop: (client, server, PORT),
        sidecar,
    };
    vec![
        sidecar_variant(
            "istio",
            "Istio's TLS profile (TLS 1.2-1.3), default curves (X25519MLKEM768), inbound from 127.0.0.6, IPv4",
            "istio-client",
            "istio-server",
            false,
            SidecarConfig::default(),
        ),
        sidecar_variant(
            "envoy-defaults",
            "Envoy's TLS defaults (TLS 1.2, session tickets before ALPN), inbound from the pod's IP, IPv4",
            "envoy-defaults-client",
            "envoy-defaults-server",
            false,
            SidecarConfig {
                tls: TlsProfile::EnvoyDefaults,
                inbound: InboundForward::PodIp,
                ..SidecarConfig::default()
            },
        ),
        sidecar_variant(
            "x25519-only",
            "ecdh_curves [X25519] (no post-quantum group), inbound to 127.0.0.1 per port (Istio before 1.10), IPv4",
            "x25519-client",
            "x25519-server",
            false,
            SidecarConfig {
                curves: Curves::X25519Only,
                inbound: InboundForward::Localhost,
                ..SidecarConfig::default()
            },
        ),
        sidecar_variant(
            "ipv6",
            "default curves, inbound from ::6, over IPv6 on dual-stack pods",
            "ipv6-client",
            "ipv6-server",
            true,
            SidecarConfig::default(),
        ),
        RealismVariant {
            name: "gateway",
            covers: "an unmeshed client calls the ingress gateway in plaintext; the gateway calls a meshed server with mTLS",
            client: "outside",
            server: "istio-ingressgateway",
            port: GATEWAY_PORT,
            ipv6: false,
            mesh_hop: ("istio-ingressgateway", "istio-server", PORT),
            sidecar: SidecarConfig::default(),
        },
    ]
}

/// The realism node's pods: a meshed client and server per sidecar variant, both configured
/// alike, and an unmeshed client in front of an ingress gateway.
pub fn realism_pods() -> Vec<PodSpec> {
    let mut pods = Vec::new();
    for v in realism_variants() {
        if v.mesh_hop.0 != v.client {
            continue;
        }
        let mesh = Mesh::Sidecar {
            inbound: InboundMode::Strict,
            capture: true,
        };
        pods.push(PodSpec {
            mesh: mesh.clone(),
            sidecar: v.sidecar,
            ipv6: v.ipv6,
            mesh_peers: vec![peer(v.server)],
            ..PodSpec::new(NAMESPACE, v.client)
        });
        pods.push(PodSpec {
            mesh,
            sidecar: v.sidecar,
            ipv6: v.ipv6,
            apps: vec![App::Http(PORT)],
            ..PodSpec::new(NAMESPACE, v.server)
        });
    }
    pods.push(PodSpec::new("edge", "outside"));
    pods.push(PodSpec::ingress_gateway(GATEWAY_PORT, peer("istio-server")));
    pods
}

/// `n` HTTP requests from the variant's client application to its server, each on a new TCP
/// connection (so each crosses the mesh with a handshake of its own); every one must get 200.
pub fn mesh_requests(node: &Node, variant: &RealismVariant, n: usize) -> anyhow::Result<()> {
    let server = node.pod(variant.server);
    let address = match (variant.ipv6, server.ip6) {
        (true, Some(ip6)) => format!("[{ip6}]"),
        (true, None) => bail!("{} has no IPv6 address", variant.server),
        (false, _) => server.ip.to_string(),
    };
    let host = format!(
        "{}.{}.svc.{CLUSTER_DOMAIN}",
        server.spec.deployment, server.spec.namespace
    );
    let port = variant.port;
    let client = node.pod(variant.client);
    let out = client.run(
        client
            .command(APP_UID, "curl")
            .args(CURL)
            .args(["-H", "Connection: close", "--resolve"])
            .arg(format!("{host}:{port}:{address}"))
            // curl's URL globbing: one transfer, and one connection, per number.
            .arg(format!("http://{host}:{port}/?n=[1-{n}]")),
    )?;
    let ok = String::from_utf8_lossy(&out.stdout).matches("200").count();
    if ok != n {
        bail!(
            "{}: {ok} of {n} requests got 200: {}",
            variant.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
