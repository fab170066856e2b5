//! `meshguard strict-ready -n NAMESPACE`: for each workload of the namespace, whether switching
//! it to STRICT would break a client seen in the window, and which.
//!
//! STRICT changes what a workload's sidecar accepts: it refuses plaintext. So the clients it
//! would break are those whose plaintext its sidecar accepted, as the server's own socket
//! shows (the sidecar's container owns it, which no client can choose). Plaintext that reaches
//! the application past its sidecar (a port excluded from capture) is not changed by STRICT:
//! it is a contradiction (see `meshguard edges`), not a client STRICT would stop.

use std::{collections::BTreeMap, fmt::Write as _, time::SystemTime};

use serde::Serialize;

use crate::{
    cli::{display::printable, edges::workload},
    fingerprint::Encryption,
    flow::record::{Endpoint, FlowRecord, Timestamp},
    inventory::policy::MtlsMode,
    verdict::{Direction, OwnerKind, Party, Path},
};

/// A client that STRICT would break.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Client {
    /// `namespace/workload`, `node`, or its address.
    pub workload: String,
    /// Its pod, when the inventory names it.
    pub pod: Option<String>,
    pub last_seen: Timestamp,
    /// Its plaintext connections accepted by the workload's sidecar in the window.
    pub flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// `namespace/workload`.
    pub workload: String,
    /// The mode the mesh declares for it now, where a record says.
    pub declared: Option<MtlsMode>,
    pub ready: bool,
    pub clients: Vec<Client>,
}

/// The `namespace/workload` of an end in `namespace`.
fn in_namespace(end: &Endpoint, namespace: &str) -> Option<String> {
    match end.party() {
        Party::Pod {
            namespace: ns,
            workload,
            ..
        } if ns == namespace => Some(format!("{ns}/{workload}")),
        _ => None,
    }
}

/// The server's own record of a connection whose plaintext its sidecar accepted.
fn sidecar_accepted_plaintext(r: &FlowRecord) -> bool {
    r.direction == Direction::Ingress
        && r.owner.kind == OwnerKind::Proxy
        && r.encryption == Encryption::Plaintext
        && r.path != Path::InPod
        && !r.loopback
}

/// Each workload of `namespace` the records show, with the clients STRICT would break.
pub fn readiness(records: &[FlowRecord], namespace: &str) -> Vec<Readiness> {
    let mut out: BTreeMap<String, Readiness> = BTreeMap::new();
    // By (workload, client, client's pod): its newest record, and each flow once.
    type Seen = (SystemTime, Vec<u64>);
    let mut clients: BTreeMap<(String, String, Option<String>), Seen> = BTreeMap::new();
    for r in records {
        for end in [&r.local, &r.remote] {
            if let Some(name) = in_namespace(end, namespace) {
                out.entry(name.clone()).or_insert_with(|| Readiness {
                    workload: name,
                    declared: None,
                    ready: true,
                    clients: Vec::new(),
                });
            }
        }
        let server = match r.direction {
            Direction::Ingress => in_namespace(&r.local, namespace),
            Direction::Egress => None,
        };
        let Some(server) = server else {
            continue;
        };
        if let Some(w) = out.get_mut(&server) {
            w.declared = w.declared.or(r.policy.as_ref().map(|p| p.mode));
        }
        if !sidecar_accepted_plaintext(r) {
            continue;
        }
        let key = (server, workload(&r.remote), r.remote.pod.clone());
        let (last, flows) = clients
            .entry(key)
            .or_insert((SystemTime::UNIX_EPOCH, Vec::new()));
        *last = (*last).max(r.last_seen.0);
        if !flows.contains(&r.cookie()) {
            flows.push(r.cookie());
        }
    }
    for ((server, client, pod), (last, flows)) in clients {
        if let Some(w) = out.get_mut(&server) {
            w.ready = false;
            w.clients.push(Client {
                workload: client,
                pod,
                last_seen: Timestamp(last),
                flows: flows.len() as u64,
            });
        }
    }
    out.into_values().collect()
}

/// The table, for people.
pub fn table(workloads: &[Readiness]) -> String {
    let mut out = format!(
        "{:<36} {:<10} {:<6} CLIENTS STRICT WOULD BREAK\n",
        "WORKLOAD", "DECLARED", "READY"
    );
    for w in workloads {
        let clients: Vec<String> = w
            .clients
            .iter()
            .map(|c| {
                format!(
                    "{}{} ({} flow{}, last {})",
                    c.workload,
                    c.pod
                        .as_deref()
                        .map(|p| format!(" pod {p}"))
                        .unwrap_or_default(),
                    c.flows,
                    if c.flows == 1 { "" } else { "s" },
                    c.last_seen
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<36} {:<10} {:<6} {}",
            printable(&w.workload),
            w.declared.map_or("-", MtlsMode::as_str),
            if w.ready { "yes" } else { "no" },
            if clients.is_empty() {
                "-".to_string()
            } else {
                printable(&clients.join("; ")).into_owned()
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        flow::record::{tests::record, PolicyRecord},
        verdict::Verdict,
    };

    /// The server's record of a connection from shop/web to legacy/catalog (see `record`),
    /// accepted by `owner`.
    fn accepted(id: u64, owner: OwnerKind, encryption: Encryption, at: u64) -> FlowRecord {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
        let mut r = (*record(id, Verdict::Plaintext, at)).clone();
        std::mem::swap(&mut r.local, &mut r.remote);
        r.direction = Direction::Ingress;
        r.owner.kind = owner;
        r.encryption = encryption;
        r.path = Path::Sidecar;
        r.last_seen = Timestamp(at);
        r.policy = Some(PolicyRecord {
            object: None,
            mode: MtlsMode::Permissive,
            port: 5000,
            destination_rule: None,
        });
        r
    }

    #[test]
    fn clients_whose_plaintext_the_sidecar_accepted() {
        let records = [
            accepted(1, OwnerKind::Proxy, Encryption::Plaintext, 10),
            accepted(1, OwnerKind::Proxy, Encryption::Plaintext, 12), // the same flow, closed
            accepted(2, OwnerKind::Proxy, Encryption::Plaintext, 20),
            accepted(3, OwnerKind::Proxy, Encryption::Tls, 30),
            // Past the sidecar: STRICT would not change it.
            accepted(4, OwnerKind::App, Encryption::Plaintext, 40),
        ];
        let got = readiness(&records, "legacy");
        assert_eq!(got.len(), 1);
        let catalog = &got[0];
        assert_eq!(
            (catalog.workload.as_str(), catalog.declared, catalog.ready),
            ("legacy/catalog", Some(MtlsMode::Permissive), false)
        );
        assert_eq!(
            catalog.clients,
            [Client {
                workload: "shop/web".into(),
                pod: Some("web-abc".into()),
                last_seen: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(20)),
                flows: 2,
            }]
        );
        // mTLS only, or plaintext past the sidecar only: ready.
        for only in [&records[3..4], &records[4..5]] {
            let got = readiness(only, "legacy");
            assert!(got[0].ready && got[0].clients.is_empty(), "{got:?}");
        }
        // The client's namespace: its workloads are listed, and ready.
        let shop = readiness(&records, "shop");
        assert_eq!(shop.len(), 1);
        assert!(shop[0].ready, "{shop:?}");
        let text = table(&got);
        assert!(
            text.contains("legacy/catalog") && text.contains("(2 flows, last "),
            "{text}"
        );
    }
}
