//! The servers a pod's application container runs, each as the application's uid: Python's
//! http.server, openssl s_server with a certificate of its own, a UDP sink, a small DNS server
//! answering for the node's services (what CoreDNS does for a cluster), and OpenSSH's sshd.

use std::fs;

use super::{ca, App, Endpoints, Pod, APP_UID, CLUSTER_DOMAIN, PYTHON};

/// Reads datagrams and drops them.
const UDP_SINK: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
while True:
    s.recvfrom(65535)
";

/// Answers A queries for the names in the records file (`name address` lines) with one
/// record, and anything else with NXDOMAIN, echoing the question as DNS servers do.
const DNS_SERVER: &str = r"
import socket, sys
records = dict(line.split() for line in open(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
while True:
    query, peer = s.recvfrom(512)
    try:
        at, labels = 12, []
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode().lower())
            at += 1 + query[at]
        question = query[12:at + 5]
        address = records.get('.'.join(labels)) if query[at + 1:at + 3] == b'\0\1' else None
    except (IndexError, UnicodeDecodeError):
        continue
    answer = b'\xc0\x0c\0\1\0\1\0\0\0\x1e\0\4' + socket.inet_aton(address) if address else b''
    flags = b'\x85\x80' if address else b'\x85\x83'
    counts = b'\0\1' + (b'\0\1' if address else b'\0\0') + b'\0\0\0\0'
    s.sendto(query[:2] + flags + counts + question + answer, peer)
";

pub(super) fn start(
    pod: &mut Pod,
    app: App,
    ca: &ca::Ca,
    endpoints: &Endpoints,
) -> anyhow::Result<()> {
    // A dual-stack server: Python's http.server takes both families on `::`.
    let (any, family) = if pod.ip6.is_some() {
        ("::", "any")
    } else {
        ("0.0.0.0", "inet")
    };
    let port = app.port().to_string();
    let host = format!(
        "{}.{}.svc.{CLUSTER_DOMAIN}",
        pod.spec.name, pod.spec.namespace
    );
    match app {
        App::Http(_) => {
            let www = pod.dir.join("www");
            fs::create_dir_all(&www)?;
            fs::write(
                www.join("index.html"),
                format!("hello from {}\n", pod.spec.name),
            )?;
            fs::write(www.join("healthz"), "ok\n")?;
            pod.start(
                &format!("http-{port}"),
                pod.command(APP_UID, PYTHON)
                    .args(["-m", "http.server", &port, "--bind", any])
                    .arg("--directory")
                    .arg(&www),
            )
        }
        App::Tls(_) => {
            let tls = pod.dir.join("app-tls");
            ca.issue(&tls, &format!("DNS:{host}"), APP_UID)?;
            pod.start(
                &format!("tls-{port}"),
                pod.command(APP_UID, "openssl")
                    .args(["s_server", "-quiet", "-www", "-accept", &port, "-cert"])
                    .arg(tls.join("cert-chain.pem"))
                    .arg("-key")
                    .arg(tls.join("key.pem")),
            )
        }
        App::UdpSink(_) => pod.start(
            &format!("udp-{port}"),
            pod.command(APP_UID, PYTHON).args(["-c", UDP_SINK, &port]),
        ),
        App::Dns(_) => {
            let records = pod.dir.join("dns-records");
            let lines: String = endpoints
                .names()
                .map(|(name, ip)| format!("{name} {ip}\n"))
                .collect();
            fs::write(&records, lines)?;
            pod.start(
                &format!("dns-{port}"),
                pod.command(APP_UID, PYTHON)
                    .args(["-c", DNS_SERVER, &port])
                    .arg(&records),
            )
        }
        App::Ssh(_) => {
            // sshd runs unprivileged with a host key and configuration of its own.
            let dir = pod.dir.join("sshd");
            fs::create_dir_all(&dir)?;
            let key = dir.join("ssh_host_ed25519_key");
            crate::run(
                std::process::Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", &host, "-f"])
                    .arg(&key),
            )?;
            for file in [key.clone(), key.with_extension("pub")] {
                std::os::unix::fs::chown(file, Some(APP_UID), Some(APP_UID))?;
            }
            let config = dir.join("sshd_config");
            fs::write(
                &config,
                format!(
                    "Port {port}\nAddressFamily {family}\nHostKey {}\nPidFile none\nUsePAM no\nStrictModes no\n",
                    key.display()
                ),
            )?;
            pod.start(
                &format!("sshd-{port}"),
                pod.command(APP_UID, "/usr/sbin/sshd")
                    .args(["-D", "-e", "-f"])
                    .arg(&config),
            )
        }
    }
}
