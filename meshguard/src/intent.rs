//! Declared intent against the wire: where what the mesh declares for a connection's server
//! (its PeerAuthentication, see [`crate::inventory::policy`]) is contradicted by what the kernel
//! saw of the connection. Pure: a record's facts in, a contradiction or none out.
//!
//! Each contradiction is reported at the server's end only (its socket is where acceptance is
//! seen, and a connection between two watched pods is then counted once):
//! - `strict-plaintext`: STRICT declared, and the server's application accepted plaintext past
//!   its sidecar (a port excluded from capture, capture rules missing). The mesh's own STRICT
//!   only guards what its sidecar receives.
//! - `mtls-disabled`: DISABLE declared, by the server's PeerAuthentication or by a
//!   DestinationRule for its client's sidecar, and the server's sidecar accepted plaintext from
//!   a meshed client: plaintext between two meshed workloads that the mesh was told to send.

use crate::{
    flow::record::FlowRecord,
    inventory::policy::{MtlsMode, PolicyRef, TlsMode},
    verdict::{Direction, OwnerKind, Path, Verdict},
    wire::wire_enum,
};

wire_enum! {
    /// How what the kernel saw contradicts what the mesh declares.
    pub enum Contradiction ("contradiction") {
        /// STRICT declared; plaintext accepted by the application past its sidecar.
        StrictPlaintext = "strict-plaintext",
        /// DISABLE declared (PeerAuthentication or DestinationRule); plaintext between meshed
        /// workloads, through their sidecars.
        MtlsDisabled = "mtls-disabled",
    }
}

impl Contradiction {
    /// One sentence for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Self::StrictPlaintext => "STRICT is declared, yet the server's application accepted plaintext past its sidecar: the mesh's STRICT only guards what the sidecar receives",
            Self::MtlsDisabled => "DISABLE is declared: the server's sidecar accepted plaintext from a meshed client, plaintext the mesh was told to send between its own workloads",
        }
    }
}

/// The contradiction a record shows, if any. Plaintext only: what reached the server
/// encrypted, or what policy expects in plaintext (probes, DNS), or a hop inside one pod, never
/// contradicts a mode.
pub fn contradiction(r: &FlowRecord) -> Option<Contradiction> {
    let declared = r.policy.as_ref()?;
    let plaintext = matches!(r.verdict, Verdict::BypassPlaintext | Verdict::Plaintext)
        && !r.encryption.is_encrypted()
        && r.path != Path::InPod
        && !r.loopback;
    if !plaintext || r.direction != Direction::Ingress {
        return None;
    }
    // The server's own socket: its application's, or its sidecar's (the container that made
    // the socket, which neither can choose).
    match (declared.mode, r.owner.kind) {
        (MtlsMode::Strict, OwnerKind::App | OwnerKind::Sandbox) => {
            Some(Contradiction::StrictPlaintext)
        }
        (MtlsMode::Disable, OwnerKind::Proxy) if r.remote.meshed => {
            Some(Contradiction::MtlsDisabled)
        }
        (_, OwnerKind::Proxy) if r.remote.meshed && rule_disables(r) => {
            Some(Contradiction::MtlsDisabled)
        }
        _ => None,
    }
}

/// Whether a DestinationRule tells the connection's client's sidecar to send plaintext.
fn rule_disables(r: &FlowRecord) -> bool {
    r.policy
        .as_ref()
        .and_then(|p| p.destination_rule.as_ref())
        .is_some_and(|d| d.tls == TlsMode::Disable)
}

/// The object a record's contradiction rests on, and the mode it declares: the server's
/// PeerAuthentication, or, for plaintext it does not disable itself, the client's rule.
pub fn contradicted(r: &FlowRecord) -> Option<(Option<PolicyRef>, &'static str)> {
    let declared = r.policy.as_ref()?;
    let peer_authentication = || (declared.object.clone(), declared.mode.as_str());
    Some(match r.contradiction? {
        Contradiction::StrictPlaintext => peer_authentication(),
        Contradiction::MtlsDisabled if declared.mode == MtlsMode::Disable => peer_authentication(),
        Contradiction::MtlsDisabled => match &declared.destination_rule {
            Some(rule) => (Some(rule.reference()), rule.tls.as_str()),
            None => peer_authentication(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        fingerprint::Encryption,
        flow::record::{tests::record, DestinationRuleRecord, PolicyRecord},
    };

    #[test]
    fn each_rule_and_what_never_contradicts() {
        let base = || {
            let mut r = (*record(1, Verdict::BypassPlaintext, SystemTime::now())).clone();
            r.direction = Direction::Ingress;
            r.encryption = Encryption::Plaintext;
            r.path = Path::Direct;
            r.owner.kind = OwnerKind::App;
            r.remote.meshed = true;
            r.policy = Some(PolicyRecord {
                object: None,
                mode: MtlsMode::Strict,
                port: 8081,
                destination_rule: None,
            });
            r
        };
        type Change = fn(&mut FlowRecord);
        let cases: [(&str, Change, Option<Contradiction>); 16] = [
            (
                "plaintext accepted by a STRICT server's app",
                |_| {},
                Some(Contradiction::StrictPlaintext),
            ),
            (
                "the sandbox's socket too",
                |r| r.owner.kind = OwnerKind::Sandbox,
                Some(Contradiction::StrictPlaintext),
            ),
            (
                "from an unmeshed client, judged plaintext",
                |r| {
                    r.verdict = Verdict::Plaintext;
                    r.remote.meshed = false;
                },
                Some(Contradiction::StrictPlaintext),
            ),
            (
                "the client's end: counted at the server's",
                |r| r.direction = Direction::Egress,
                None,
            ),
            (
                "the STRICT server's sidecar: it refuses plaintext",
                |r| r.owner.kind = OwnerKind::Proxy,
                None,
            ),
            (
                "encrypted",
                |r| {
                    r.encryption = Encryption::Tls;
                    r.verdict = Verdict::BypassTls;
                },
                None,
            ),
            (
                "expected plaintext (a probe)",
                |r| r.verdict = Verdict::Expected,
                None,
            ),
            (
                "inside one pod",
                |r| {
                    r.path = Path::InPod;
                    r.verdict = Verdict::InPod;
                },
                None,
            ),
            (
                "PERMISSIVE allows it",
                |r| r.policy.as_mut().unwrap().mode = MtlsMode::Permissive,
                None,
            ),
            (
                "nothing declared (not a sidecar's pod)",
                |r| r.policy = None,
                None,
            ),
            (
                "DISABLE: a meshed client's plaintext through the sidecar",
                |r| {
                    r.policy.as_mut().unwrap().mode = MtlsMode::Disable;
                    r.owner.kind = OwnerKind::Proxy;
                    r.verdict = Verdict::Plaintext;
                },
                Some(Contradiction::MtlsDisabled),
            ),
            (
                "a DestinationRule tells the meshed client's sidecar to send plaintext",
                |r| {
                    r.policy.as_mut().unwrap().mode = MtlsMode::Permissive;
                    r.policy.as_mut().unwrap().destination_rule = Some(rule(TlsMode::Disable));
                    r.owner.kind = OwnerKind::Proxy;
                    r.verdict = Verdict::Plaintext;
                },
                Some(Contradiction::MtlsDisabled),
            ),
            (
                "a DestinationRule that keeps mTLS",
                |r| {
                    r.policy.as_mut().unwrap().mode = MtlsMode::Permissive;
                    r.policy.as_mut().unwrap().destination_rule = Some(rule(TlsMode::IstioMutual));
                    r.owner.kind = OwnerKind::Proxy;
                },
                None,
            ),
            (
                "the rule's plaintext, at the client's end: counted at the server's",
                |r| {
                    r.policy.as_mut().unwrap().destination_rule = Some(rule(TlsMode::Disable));
                    r.owner.kind = OwnerKind::Proxy;
                    r.direction = Direction::Egress;
                },
                None,
            ),
            (
                "DISABLE, from an unmeshed client: no mesh traffic",
                |r| {
                    r.policy.as_mut().unwrap().mode = MtlsMode::Disable;
                    r.owner.kind = OwnerKind::Proxy;
                    r.remote.meshed = false;
                },
                None,
            ),
            (
                "no owner evidence: not claimed either way",
                |r| r.owner.kind = OwnerKind::Unknown,
                None,
            ),
        ];
        for (what, change, want) in cases {
            let mut r = base();
            change(&mut r);
            assert_eq!(contradiction(&r), want, "{what}");
        }
    }

    fn rule(tls: TlsMode) -> DestinationRuleRecord {
        DestinationRuleRecord {
            namespace: "shop".into(),
            name: "ratings".into(),
            host: "ratings.shop.svc.cluster.local".into(),
            port: 9080,
            tls,
        }
    }

    #[test]
    fn a_contradiction_names_the_object_it_rests_on() {
        let mut r = (*record(1, Verdict::Plaintext, SystemTime::now())).clone();
        let pa = PolicyRef {
            kind: crate::inventory::policy::PolicyKind::PeerAuthentication,
            namespace: "shop".into(),
            name: "default".into(),
        };
        let mut declared = PolicyRecord {
            object: Some(pa.clone()),
            mode: MtlsMode::Permissive,
            port: 9080,
            destination_rule: Some(rule(TlsMode::Disable)),
        };
        r.contradiction = Some(Contradiction::MtlsDisabled);
        r.policy = Some(declared.clone());
        let (object, mode) = contradicted(&r).unwrap();
        assert_eq!(
            (object.unwrap().to_string(), mode),
            ("DestinationRule shop/ratings".into(), "DISABLE")
        );
        declared.mode = MtlsMode::Disable;
        r.policy = Some(declared);
        assert_eq!(
            contradicted(&r),
            Some((Some(pa), "DISABLE")),
            "the server's own DISABLE first"
        );
        r.contradiction = None;
        assert_eq!(contradicted(&r), None);
    }
}
