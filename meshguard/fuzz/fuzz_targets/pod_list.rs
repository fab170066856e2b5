//! Pod lists come from a file or the API server: any document gets pods, errors naming the
//! objects, or an error; never a panic. Every container id a pod reports finds its pod.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::inventory::{parse_pods, Inventory};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = parse_pods(text) {
        let inventory = Inventory::with_namespaces("fuzz", parsed.pods.clone(), &parsed.namespaces);
        let _ = inventory.lookup("10.0.0.1".parse().unwrap());
        for pod in &parsed.pods {
            let _ = inventory.pod_by_uid(&pod.uid);
            for id in pod.containers.iter().filter_map(|c| c.id.as_ref()) {
                // Another pod may claim the same id: then it names none.
                if let Some((p, c)) = inventory.container(id) {
                    let found = c.id.as_ref().map_or("", |f| f.as_str());
                    assert!(
                        found.starts_with(id.as_str()) || id.as_str().starts_with(found),
                        "{id} found {found} in {}/{}",
                        p.namespace,
                        p.name
                    );
                }
            }
        }
    }
});
