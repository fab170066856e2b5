//! `--agent https://...`: the CLI against a TLS server holding a test certificate, verified
//! with `--ca-file`, refused without it.
#![cfg(feature = "tls")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
};

use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    ServerConfig,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

const STATUS: &str = r#"{"node":"kind-worker","kernel":"6.1.0","version":"0.1.0","started_at":"2026-11-28T22:00:00.000Z","degraded":[],"programs_attached":["sock_ops"],"inventory":{"pods":12,"source":"kubernetes","age_seconds":3},"flow_map":{"capacity":131072,"entries":40},"flows_tracked":40,"flows_stored":310,"flagged_stored":2,"events_lost":{}}"#;

/// An agent look-alike on 127.0.0.1 speaking TLS: answers every request with a status
/// document and keeps each request's head.
fn serve() -> (u16, Arc<Mutex<Vec<String>>>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("agent.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("agent-key.pem")).unwrap();
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                // A client that refuses the certificate ends the handshake: next one.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{STATUS}",
                    STATUS.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
    });
    (port, heads)
}

fn status(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .arg("status")
        .args(args)
        .env_remove("MESHGUARD_AGENT")
        .env_remove("MESHGUARD_TOKEN_FILE")
        .env_remove("MESHGUARD_CA_FILE")
        .output()
        .unwrap()
}

#[test]
fn https_agent_verified_with_the_ca_file() {
    let (port, heads) = serve();
    let token = std::env::temp_dir().join(format!("meshguard-https-test-token-{port}"));
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let agent = format!("https://localhost:{port}");

    let out = status(&[
        "--agent",
        &agent,
        "--ca-file",
        fixture("ca.pem").to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let _ = std::fs::remove_file(&token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["node"], "kind-worker");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("GET /v1/status HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("authorization: bearer 0123456789abcdef0123\r\n"),
        "{}",
        heads[0]
    );
}

#[test]
fn an_untrusted_certificate_is_refused() {
    let (port, heads) = serve();
    // Without --ca-file the system's roots decide, and the test CA is not among them.
    let out = status(&["--agent", &format!("https://localhost:{port}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot reach the agent at https://localhost:{port}"
        )),
        "{err}"
    );
    assert!(heads.lock().unwrap().is_empty(), "no request went out");

    let out = status(&[
        "--agent",
        &format!("https://localhost:{port}"),
        "--ca-file",
        fixture("README.md").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a CA file without certificates is bad usage: {err}"
    );
    assert!(err.contains("no PEM certificate in it"), "{err}");
}
