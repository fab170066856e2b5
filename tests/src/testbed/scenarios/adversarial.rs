//! Workloads that try to pass for the mesh, or for traffic a policy lets through: each runs in
//! meshed web's application container (so its sockets' cgroup is the application's, whatever
//! uid or name it takes) and chooses what a judged workload can choose: its ALPN, its process
//! name, its uid, its destination port, its protocol. Not part of [`super::all`]: the verdicts
//! here are what meshguard must come to give.

use super::{both_ends, curl, end, url, Crossing, Expected, Party, Scenario, Wire};
use crate::testbed::{
    capture::INBOUND_PORT,
    envoy::{istio_sni, ISTIO_ALPN},
    MeshPeer, Node, APP_UID, PROXY_UID, PYTHON,
};

/// Source ports the scenarios fix, so that each one's flows are told apart from others between
/// the same pods.
const SPOOFED_ALPN_PORT: u16 = 40001;
const RENAMED_ENVOY_PORT: u16 = 40002;
const RENAMED_WORKER_PORT: u16 = 40003;
const DNS_THEN_UDP_PORT: u16 = 40004;
const CATALOG_NAME: &str = "catalog.legacy.svc.cluster.local";

/// A genuine ClientHello (Python's TLS stack, through a memory BIO: no TLS session follows)
/// offering Istio's ALPN and SNI, then plaintext HTTP on the same connection.
/// Arguments: server address, port, source port, SNI, ALPN (comma-separated).
const SPOOFED_ALPN: &str = r"
import socket, ssl, sys, time
server, port, source, sni, alpn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.set_alpn_protocols(alpn.split(','))
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
try:
    ctx.wrap_bio(incoming, outgoing, server_hostname=sni).do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', source))
s.connect((server, port))
s.sendall(hello)
time.sleep(0.1)
try:
    s.sendall(b'GET / HTTP/1.0\r\nHost: catalog\r\n\r\n')
    # The server closes first: no TIME_WAIT on this fixed source port.
    while s.recv(4096):
        pass
except ConnectionError:
    pass
s.close()
";

/// Takes a process name (`prctl(PR_SET_NAME)`), then sends a plaintext HTTP request and
/// expects 200. Arguments: name, server address, port, source port.
const RENAMED: &str = r"
import ctypes, socket, sys
name, server, port, source = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
PR_SET_NAME = 15
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
assert open('/proc/self/comm').read().strip() == name
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', source))
s.connect((server, port))
s.sendall(b'GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n')
response = b''
while chunk := s.recv(4096):
    response += chunk
s.close()
assert response.startswith(b'HTTP/1.0 200') or response.startswith(b'HTTP/1.1 200'), response[:80]
";

/// One unconnected UDP socket: a DNS query for a service, then plaintext datagrams to the
/// address it got. Arguments: DNS server, name, port for the datagrams, source port.
const DNS_THEN_UDP: &str = r"
import socket, struct, sys
dns, name, port, source = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('', source))
s.settimeout(5)
question = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0\0\1\0\1'
s.sendto(struct.pack('>HHHHHH', 0x4d47, 0x0100, 1, 0, 0, 0) + question, (dns, 53))
answer, _ = s.recvfrom(512)
assert answer[:2] == b'\x4d\x47' and answer[3] & 0xf == 0 and answer[7] == 1, answer
address = socket.inet_ntoa(answer[-4:])
for i in range(3):
    s.sendto(b'PLAINTEXT datagram %d to %s\n' % (i, name.encode()), (address, port))
print(address)
";

/// Runs `script` with `args` in `from`'s application container as `uid`.
fn python(node: &Node, from: &str, uid: u32, script: &str, args: &[String]) -> anyhow::Result<()> {
    let pod = node.pod(from);
    pod.run(pod.command(uid, PYTHON).args(["-c", script]).args(args))
        .map(drop)
}

/// The ends of a connection whose client fixed its source port.
fn from_port(mut ends: Vec<Expected>, port: u16) -> Vec<Expected> {
    for e in &mut ends {
        if e.remote_port.is_some() {
            e.local_port = Some(port);
        } else {
            e.remote_port = Some(port);
        }
    }
    ends
}

/// An application as the proxy's uid, under a name of the proxy's, sending plaintext to reviews
/// from `port`.
fn renamed(
    name: &'static str,
    title: &'static str,
    port: u16,
    drive: fn(&Node) -> anyhow::Result<()>,
) -> Scenario {
    let web = Party::Pod("web");
    let mut client = end(
        "client socket",
        web,
        Party::Pod("reviews"),
        (Some(port), Some(9080)),
        "bypass-plaintext",
        "proxy-uid-app",
    );
    client.uid = Some(PROXY_UID);
    Scenario {
        name,
        title,
        client: web,
        server: "reviews",
        port: 9080,
        wire: Wire::PlaintextHttp,
        client_port: Some(port),
        also: Vec::new(),
        expect: vec![
            client,
            end(
                "reviews sidecar accepting plaintext",
                Party::Pod("reviews"),
                web,
                (Some(INBOUND_PORT), Some(port)),
                "bypass-plaintext",
                "peer-bypass",
            ),
        ],
        drive,
    }
}

fn renamed_drive(node: &Node, comm: &str, port: u16) -> anyhow::Result<()> {
    let args = [
        comm.to_string(),
        node.pod("reviews").ip.to_string(),
        "9080".into(),
        port.to_string(),
    ];
    python(node, "web", PROXY_UID, RENAMED, &args)
}

/// Plaintext HTTP over TCP to a port of catalog a policy might take as harmless, as the
/// proxy's uid (which capture lets through).
fn proxy_uid_to_port(
    name: &'static str,
    title: &'static str,
    port: u16,
    drive: fn(&Node) -> anyhow::Result<()>,
) -> Scenario {
    let mut client = end(
        "client socket",
        Party::Pod("web"),
        Party::Pod("catalog"),
        (None, Some(port)),
        "bypass-plaintext",
        "proxy-uid-app",
    );
    client.uid = Some(PROXY_UID);
    Scenario {
        name,
        title,
        client: Party::Pod("web"),
        server: "catalog",
        port,
        wire: Wire::PlaintextHttp,
        client_port: None,
        also: Vec::new(),
        expect: vec![client],
        drive,
    }
}

pub fn adversarial() -> Vec<Scenario> {
    let web = Party::Pod("web");
    vec![
        Scenario {
            name: "spoofed-alpn",
            title: "meshed web's application sends a genuine ClientHello with Istio's ALPN, then plaintext, on an excluded port",
            client: web,
            server: "catalog",
            port: 5000,
            wire: Wire::TlsThenPlaintextHttp {
                alpn: ISTIO_ALPN.map(String::from).to_vec(),
            },
            client_port: Some(SPOOFED_ALPN_PORT),
            also: Vec::new(),
            expect: from_port(
                both_ends(
                    web,
                    "catalog",
                    5000,
                    5000,
                    ("bypass-plaintext", "spoofed-mesh-alpn"),
                    ("bypass-plaintext", "spoofed-mesh-alpn"),
                ),
                SPOOFED_ALPN_PORT,
            ),
            drive: |node| {
                let sni = istio_sni(&MeshPeer {
                    port: 5000,
                    service: "catalog".into(),
                    namespace: "legacy".into(),
                    service_account: "catalog".into(),
                });
                let args = [
                    node.pod("catalog").ip.to_string(),
                    "5000".into(),
                    SPOOFED_ALPN_PORT.to_string(),
                    sni,
                    ISTIO_ALPN.join(","),
                ];
                python(node, "web", APP_UID, SPOOFED_ALPN, &args)
            },
        },
        renamed(
            "renamed-envoy",
            "an application in meshed web, as the proxy's uid, names itself envoy and sends plaintext",
            RENAMED_ENVOY_PORT,
            |node| renamed_drive(node, "envoy", RENAMED_ENVOY_PORT),
        ),
        renamed(
            "renamed-worker",
            "an application in meshed web, as the proxy's uid, names itself after an Envoy worker thread and sends plaintext",
            RENAMED_WORKER_PORT,
            |node| renamed_drive(node, "wrk:worker_0", RENAMED_WORKER_PORT),
        ),
        Scenario {
            name: "dns-then-udp",
            title: "meshed web's application asks DNS for catalog, then sends it plaintext datagrams, from one UDP socket",
            client: web,
            server: "coredns",
            port: 53,
            wire: Wire::Dns {
                name: CATALOG_NAME.into(),
                answer: "catalog",
            },
            client_port: Some(DNS_THEN_UDP_PORT),
            also: vec![Crossing {
                client: web,
                client_port: Some(DNS_THEN_UDP_PORT),
                server: "catalog",
                port: 9999,
                wire: Wire::PlaintextUdp,
            }],
            expect: vec![
                end(
                    "query to coredns",
                    web,
                    Party::Pod("coredns"),
                    (Some(DNS_THEN_UDP_PORT), Some(53)),
                    "expected",
                    "dns",
                ),
                end(
                    "client socket to catalog",
                    web,
                    Party::Pod("catalog"),
                    (Some(DNS_THEN_UDP_PORT), Some(9999)),
                    "bypass-plaintext",
                    "udp",
                ),
                end(
                    "catalog's socket",
                    Party::Pod("catalog"),
                    web,
                    (Some(9999), Some(DNS_THEN_UDP_PORT)),
                    "bypass-plaintext",
                    "udp",
                ),
            ],
            drive: |node| {
                let args = [
                    node.pod("coredns").ip.to_string(),
                    CATALOG_NAME.into(),
                    "9999".into(),
                    DNS_THEN_UDP_PORT.to_string(),
                ];
                python(node, "web", APP_UID, DNS_THEN_UDP, &args)
            },
        },
        proxy_uid_to_port(
            "port-53-tcp",
            "an application in meshed web, as the proxy's uid, sends plaintext HTTP to TCP port 53",
            53,
            |node| curl(node, "web", PROXY_UID, &[], &url(node, "catalog", 53, "/")),
        ),
        proxy_uid_to_port(
            "port-15020-tcp",
            "an application in meshed web, as the proxy's uid, sends plaintext HTTP to port 15020 (Istio's agent)",
            15020,
            |node| curl(node, "web", PROXY_UID, &[], &url(node, "catalog", 15020, "/")),
        ),
        Scenario {
            name: "app-ssh",
            title: "meshed web's application speaks SSH to catalog on an excluded port",
            client: web,
            server: "catalog",
            port: 2222,
            wire: Wire::Ssh,
            client_port: None,
            also: Vec::new(),
            expect: both_ends(
                web,
                "catalog",
                2222,
                2222,
                ("bypass-tls", "app-ssh"),
                ("bypass-tls", "app-ssh"),
            ),
            drive: |node| {
                // ssh-keyscan runs a real key exchange to get the host key.
                let pod = node.pod("web");
                let out = pod.run(
                    pod.command(APP_UID, "ssh-keyscan")
                        .args(["-p", "2222", "-T", "5", "-t", "ed25519"])
                        .arg(node.pod("catalog").ip.to_string()),
                )?;
                if !String::from_utf8_lossy(&out.stdout).contains("ssh-ed25519 ") {
                    anyhow::bail!(
                        "ssh-keyscan got no host key: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(())
            },
        },
    ]
}
