//! PeerAuthentication, DestinationRule and Service objects come from a file or the API server:
//! any document gets policies, errors naming the objects, or an error; never a panic. Whatever a
//! workload's labels and port, the composed mode is a real one (never UNSET), and the object
//! said to govern it is one that was read; so is the rule a client's sidecar is said to follow,
//! found for a host that is a Service that was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

use meshguard::inventory::{
    destination::Workload,
    parse_pods,
    policy::{MtlsMode, DEFAULT_ROOT_NAMESPACE},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_pods(text) else {
        return;
    };
    let policy = &parsed.policy.policy;
    for pa in &policy.peer_authentications {
        for port in pa.ports.keys().copied().chain([80]) {
            let got = policy.peer_mtls(DEFAULT_ROOT_NAMESPACE, &pa.meta.namespace, &pa.selector, port);
            assert_ne!(got.mode, MtlsMode::Unset);
            if let Some(by) = &got.governed_by {
                assert!(
                    policy
                        .peer_authentications
                        .iter()
                        .any(|p| p.meta.namespace == by.namespace && p.meta.name == by.name),
                    "{by} was not read"
                );
            }
        }
    }
    // Each Service's selected workload, reached on each of its target ports, from a client in
    // every namespace a rule is in.
    let no_ports = BTreeMap::new();
    for service in &policy.services {
        let server = Workload {
            namespace: &service.meta.namespace,
            labels: &service.selector,
            named_ports: &no_ports,
        };
        for rule in &policy.destination_rules {
            let client = Workload {
                namespace: &rule.meta.namespace,
                labels: &rule.workload_selector,
                named_ports: &no_ports,
            };
            for port in service.ports.iter().map(|p| p.port).chain([80]) {
                let Some(got) = policy.client_tls(DEFAULT_ROOT_NAMESPACE, &client, &server, port)
                else {
                    continue;
                };
                assert!(
                    policy
                        .destination_rules
                        .iter()
                        .any(|r| r.meta.namespace == got.rule.namespace && r.meta.name == got.rule.name),
                    "{} was not read",
                    got.rule
                );
                assert!(policy.services.iter().any(|s| s.fqdn() == got.host));
            }
        }
    }
});
