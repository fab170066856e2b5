//! `meshguard edges`: one row per source workload -> destination workload and port, over the
//! records the agents keep, answering "is A -> B really encrypted?" in one line: how many
//! connections, their verdicts, the encryption the wire showed, the mode the mesh declares for
//! B, and one word for the whole.
//!
//! A connection between two watched pods is two records, its client's and its server's (on one
//! node, or on two with `--cluster`): they are paired by the client's address and the address
//! it dialled, and count once. Hops inside one pod (an application and its sidecar) are not
//! edges between workloads and are left out.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::{
    cli::display::printable,
    flow::record::{Endpoint, FlowRecord},
    inventory::policy::MtlsMode,
    verdict::{Direction, Party, Path, Verdict},
    wire::wire_enum,
};

wire_enum! {
    /// One word for an edge.
    pub enum EdgeState ("edge state") {
        /// Every connection was encrypted on the wire, none around the mesh.
        Encrypted = "encrypted",
        /// At least one connection went around the mesh (`bypass-*`).
        Bypassed = "bypassed",
        /// Plaintext only, and nothing went around the mesh: what the mesh allows (PERMISSIVE,
        /// an unmeshed end, expected plaintext).
        PlaintextAllowed = "plaintext-allowed",
        /// Encrypted and plaintext connections both.
        Mixed = "mixed",
        /// No payload seen yet.
        Pending = "pending",
    }
}

impl EdgeState {
    /// Graphviz colour.
    fn color(self) -> &'static str {
        match self {
            Self::Encrypted => "darkgreen",
            Self::Bypassed => "red",
            Self::PlaintextAllowed => "orange",
            Self::Mixed => "purple",
            Self::Pending => "gray",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// `namespace/workload`, `node`, or the address of an end the inventory does not know.
    pub source: String,
    pub destination: String,
    /// The port the client dialled.
    pub port: u16,
    /// Connections (the records of its two ends count once).
    pub flows: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Connections encrypted on the wire, and in plaintext.
    pub encrypted: u64,
    pub plaintext: u64,
    /// The mTLS mode the mesh declares for the destination on this port, where it has a
    /// sidecar (PeerAuthentication).
    pub declared: Option<MtlsMode>,
    pub state: EdgeState,
    /// Records that contradict the declared mode.
    pub contradictions: u64,
}

/// How bad a verdict is, to pick one for a connection whose two ends differ.
fn severity(v: Verdict) -> u8 {
    match v {
        Verdict::BypassPlaintext => 7,
        Verdict::BypassTls => 6,
        Verdict::Plaintext => 5,
        Verdict::Unmeshed => 4,
        Verdict::Expected => 3,
        Verdict::Mtls => 2,
        Verdict::InPod => 1,
        Verdict::Pending => 0,
    }
}

/// A workload as an edge names it.
pub(crate) fn workload(e: &Endpoint) -> String {
    match e.party() {
        Party::Pod {
            namespace,
            workload,
            ..
        } => format!("{namespace}/{workload}"),
        Party::Node => "node".into(),
        Party::Unknown => e.ip.to_string(),
    }
}

/// A record's connection, as both its ends name it: the client's address, the address it
/// dialled.
fn connection(r: &FlowRecord) -> (SocketAddr, SocketAddr) {
    let at = |e: &Endpoint| SocketAddr::new(e.ip, e.port);
    match r.direction {
        Direction::Egress => (at(&r.local), at(&r.remote)),
        Direction::Ingress => (
            at(&r.remote),
            r.local.dialled.unwrap_or_else(|| at(&r.local)),
        ),
    }
}

/// One connection, from one or both of its ends' records.
struct Connection<'a> {
    client: &'a Endpoint,
    server: &'a Endpoint,
    port: u16,
    verdict: Verdict,
    encrypted: bool,
    declared: Option<MtlsMode>,
    contradictions: u64,
}

/// The edges the records show, sorted by source, destination and port.
pub fn edges(records: &[FlowRecord]) -> Vec<Edge> {
    // Newest record of each end first (a flow's closing record supersedes its first).
    // By connection, end (server: true) and flow.
    let mut ends: BTreeMap<(SocketAddr, SocketAddr, bool, u64), &FlowRecord> = BTreeMap::new();
    for r in records {
        if r.path == Path::InPod || r.verdict == Verdict::InPod || r.loopback {
            continue;
        }
        let (client, server) = connection(r);
        let key = (
            client,
            server,
            r.direction == Direction::Ingress,
            r.cookie(),
        );
        let newer = ends
            .get(&key)
            .is_none_or(|old| old.last_seen.0 <= r.last_seen.0);
        if newer {
            ends.insert(key, r);
        }
    }
    let mut connections: BTreeMap<(SocketAddr, SocketAddr), Connection> = BTreeMap::new();
    for ((client, server, ..), r) in ends {
        let (client_end, server_end) = r.source_and_destination();
        let port = server.port();
        let c = connections.entry((client, server)).or_insert(Connection {
            client: client_end,
            server: server_end,
            port,
            verdict: Verdict::Pending,
            encrypted: false,
            declared: None,
            contradictions: 0,
        });
        if severity(r.verdict) > severity(c.verdict) {
            c.verdict = r.verdict;
        }
        c.encrypted |= r.encryption.is_encrypted();
        c.declared = c.declared.or(r.policy.as_ref().map(|p| p.mode));
        c.contradictions += u64::from(r.contradiction.is_some());
    }
    let mut edges: BTreeMap<(String, String, u16), Edge> = BTreeMap::new();
    for c in connections.into_values() {
        let (source, destination) = (workload(c.client), workload(c.server));
        let e = edges
            .entry((source.clone(), destination.clone(), c.port))
            .or_insert_with(|| Edge {
                source,
                destination,
                port: c.port,
                flows: 0,
                verdicts: BTreeMap::new(),
                encrypted: 0,
                plaintext: 0,
                declared: None,
                state: EdgeState::Pending,
                contradictions: 0,
            });
        e.flows += 1;
        *e.verdicts.entry(c.verdict.as_str()).or_default() += 1;
        if c.verdict != Verdict::Pending {
            if c.encrypted {
                e.encrypted += 1;
            } else {
                e.plaintext += 1;
            }
        }
        e.declared = e.declared.or(c.declared);
        e.contradictions += c.contradictions;
    }
    let mut edges: Vec<Edge> = edges.into_values().collect();
    for e in &mut edges {
        let bypassed = Verdict::ALL
            .iter()
            .any(|v| v.is_bypass() && e.verdicts.contains_key(v.as_str()));
        e.state = match (bypassed, e.encrypted, e.plaintext) {
            (true, ..) => EdgeState::Bypassed,
            (false, 0, 0) => EdgeState::Pending,
            (false, _, 0) => EdgeState::Encrypted,
            (false, 0, _) => EdgeState::PlaintextAllowed,
            (false, ..) => EdgeState::Mixed,
        };
    }
    edges
}

/// An end the inventory does not know is named by its address: drawn dashed.
fn is_address(name: &str) -> bool {
    name.parse::<IpAddr>().is_ok()
}

/// The table: a row an edge, for people.
pub fn table(edges: &[Edge]) -> String {
    let mut out = format!(
        "{:<32} {:<38} {:>6} {:>9} {:>9} {:<10} {:<17} VERDICTS\n",
        "SOURCE", "DESTINATION", "FLOWS", "ENCRYPTED", "PLAINTEXT", "DECLARED", "STATE"
    );
    for e in edges {
        let verdicts: Vec<String> = e.verdicts.iter().map(|(v, n)| format!("{v}={n}")).collect();
        let _ = writeln!(
            out,
            "{:<32} {:<38} {:>6} {:>9} {:>9} {:<10} {:<17} {}",
            printable(&e.source),
            printable(&format!("{}:{}", e.destination, e.port)),
            e.flows,
            e.encrypted,
            e.plaintext,
            e.declared.map_or("-", MtlsMode::as_str),
            e.state.as_str(),
            verdicts.join(" ")
        );
    }
    out
}

/// A Graphviz digraph: workloads as nodes, edges coloured by state.
pub fn dot(edges: &[Edge]) -> String {
    // A DOT string: quotes and backslashes escaped, control characters shown as escapes.
    let quoted = |s: &str| {
        format!(
            "\"{}\"",
            printable(s).replace('\\', "\\\\").replace('"', "\\\"")
        )
    };
    let mut out = String::from("digraph meshguard {\n  rankdir=LR;\n  node [shape=box];\n");
    let mut nodes: Vec<&str> = edges
        .iter()
        .flat_map(|e| [e.source.as_str(), e.destination.as_str()])
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    for n in nodes {
        let style = if is_address(n) { ", style=dashed" } else { "" };
        let _ = writeln!(out, "  {}[label={}{style}];", quoted(n), quoted(n));
    }
    for e in edges {
        let label = format!(
            "{} {} ({}){}",
            e.port,
            e.state.as_str(),
            e.flows,
            e.declared
                .map(|m| format!(" {}", m.as_str()))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  {} -> {} [label={}, color={}];",
            quoted(&e.source),
            quoted(&e.destination),
            quoted(&label),
            e.state.color()
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        fingerprint::Encryption,
        flow::record::{tests::record, PolicyRecord, Timestamp},
        intent::Contradiction,
    };

    /// One end's record of a connection from shop/web 10.0.0.1:40000 to legacy/catalog
    /// 10.0.0.2:5000 (see `record`), as `direction` sees it.
    fn end(id: u64, direction: Direction, verdict: Verdict, encryption: Encryption) -> FlowRecord {
        let mut r = (*record(id, verdict, SystemTime::now())).clone();
        r.local.ip = "10.0.0.1".parse().unwrap();
        r.remote.ip = "10.0.0.2".parse().unwrap();
        r.encryption = encryption;
        r.path = Path::Direct;
        if direction == Direction::Ingress {
            std::mem::swap(&mut r.local, &mut r.remote);
        }
        r.direction = direction;
        r
    }

    #[test]
    fn both_ends_count_once_and_in_pod_hops_are_no_edges() {
        use Direction::*;
        let client = end(1, Egress, Verdict::Plaintext, Encryption::Plaintext);
        let mut server = end(2, Ingress, Verdict::BypassPlaintext, Encryption::Plaintext);
        // Reached through its sidecar's inbound capture: dialled 5000, accepted on 15006.
        server.local.port = 15006;
        server.local.dialled = Some("10.0.0.2:5000".parse().unwrap());
        server.policy = Some(PolicyRecord {
            object: None,
            mode: MtlsMode::Strict,
            port: 5000,
            destination_rule: None,
        });
        server.contradiction = Some(Contradiction::StrictPlaintext);
        let mut hop = end(3, Egress, Verdict::InPod, Encryption::Plaintext);
        hop.path = Path::InPod;
        let mut older = server.clone();
        older.last_seen = Timestamp(SystemTime::UNIX_EPOCH);
        let got = edges(&[client, server, hop, older]);
        assert_eq!(
            got,
            [Edge {
                source: "shop/web".into(),
                destination: "legacy/catalog".into(),
                port: 5000,
                flows: 1,
                verdicts: BTreeMap::from([("bypass-plaintext", 1)]),
                encrypted: 0,
                plaintext: 1,
                declared: Some(MtlsMode::Strict),
                state: EdgeState::Bypassed,
                contradictions: 1,
            }]
        );
    }

    #[test]
    fn one_word_for_an_edge() {
        use Direction::Egress;
        let conn = |id: u64, verdict, encryption| {
            let mut r = end(id, Egress, verdict, encryption);
            r.local.port = 40000 + id as u16;
            r
        };
        let cases: [(&str, Vec<FlowRecord>, EdgeState); 5] = [
            (
                "mTLS only",
                vec![conn(1, Verdict::Mtls, Encryption::Tls)],
                EdgeState::Encrypted,
            ),
            (
                "plaintext the mesh allows",
                vec![conn(1, Verdict::Plaintext, Encryption::Plaintext)],
                EdgeState::PlaintextAllowed,
            ),
            (
                "one bypass among mTLS",
                vec![
                    conn(1, Verdict::Mtls, Encryption::Tls),
                    conn(2, Verdict::BypassTls, Encryption::Tls),
                ],
                EdgeState::Bypassed,
            ),
            (
                "both",
                vec![
                    conn(1, Verdict::Mtls, Encryption::Tls),
                    conn(2, Verdict::Unmeshed, Encryption::Plaintext),
                ],
                EdgeState::Mixed,
            ),
            (
                "no payload yet",
                vec![conn(1, Verdict::Pending, Encryption::Unknown)],
                EdgeState::Pending,
            ),
        ];
        for (what, records, state) in cases {
            let got = edges(&records);
            assert_eq!(got.len(), 1, "{what}");
            assert_eq!(got[0].state, state, "{what}");
            assert_eq!(got[0].flows as usize, records.len(), "{what}");
        }
    }

    #[test]
    fn the_graph_quotes_what_pods_can_name() {
        let mut r = end(1, Direction::Egress, Verdict::Mtls, Encryption::Tls);
        r.local.workload = Some("we\"b\\\x1b[2J".into());
        let graph = dot(&edges(&[r]));
        assert!(graph.starts_with("digraph meshguard {"), "{graph}");
        assert!(
            graph.contains(r#""shop/we\"b\\\\x1b[2J" -> "legacy/catalog""#),
            "{graph}"
        );
        assert!(!graph.contains('\x1b'));
        assert!(table(&edges(&[])).starts_with("SOURCE"));
    }
}
