//! TLS for `--agent https://...`: rustls on ring, the stack the Kubernetes client already
//! brings, so the binary carries one TLS implementation. The server is verified against the
//! system's roots, or against `--ca-file` alone when given (as kubectl's
//! `--certificate-authority` does).

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio_rustls::TlsConnector;

/// A connector trusting the certificates in `ca_file`, else the system's roots.
pub fn connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--ca-file {}: no PEM certificate in it",
                    path.display()
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            }
        }
        None => {
            // Unreadable entries among the system's roots are skipped, as every TLS client does.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no trusted root certificates on this system; name the agent's CA with --ca-file"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name to verify the certificate against: the host of `host:port` (a DNS name or an
/// address, `[v6]` unbracketed).
pub fn server_name(authority: &str) -> Result<ServerName<'static>, String> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a host name or address to verify TLS against"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(
            server_name("agent.example:9465").unwrap(),
            ServerName::try_from("agent.example").unwrap()
        );
        assert!(matches!(
            server_name("10.0.0.7:9465").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[fd00::7]:9465").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(server_name("bad name:9465").is_err());
    }

    #[test]
    fn ca_file_problems_are_named() {
        let missing = connector(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(
            missing.starts_with("--ca-file /nonexistent/ca.pem"),
            "{missing}"
        );
    }
}
