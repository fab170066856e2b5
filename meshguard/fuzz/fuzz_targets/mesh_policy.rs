//! PeerAuthentication and DestinationRule objects come from a file or the API server: any
//! document gets policies, errors naming the objects, or an error; never a panic. Whatever a
//! workload's labels and port, the composed mode is a real one (never UNSET), and the object
//! said to govern it is one that was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::inventory::{
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
});
