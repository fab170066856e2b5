//! Pod lists come from a file or the API server: any document gets pods, errors naming the
//! objects, or an error; never a panic. Every container id a pod reports finds its pod. And
//! enforcement's plan, with each container in a cgroup of its own, never enforces a proxy's
//! container or a pod without a sidecar, and each mode comes from the pod, its namespace or
//! the default.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::{
    enforce::{self, Mode},
    inventory::{parse_pods, CgroupIndex, CgroupOwner, Inventory, MeshMode},
    verdict::Policy,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = parse_pods(text) {
        let inventory = Inventory::with_namespaces("fuzz", parsed.pods.clone(), &parsed.namespaces)
            .with_policy(parsed.policy.policy.clone())
            .with_enforcement(parsed.enforcement.clone());
        let _ = inventory.lookup("10.0.0.1".parse().unwrap());
        let mut paths = Vec::new();
        for pod in &parsed.pods {
            let _ = inventory.pod_by_uid(&pod.uid);
            for id in pod.containers.iter().filter_map(|c| c.id.as_ref()) {
                paths.push(format!("cri-containerd-{}.scope", id.as_str()));
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
        let cgroups =
            CgroupIndex::from_entries(paths.iter().enumerate().map(|(i, p)| (p.as_str(), i as u64 + 1)));
        let policy = Policy {
            enforcement: Mode::Audit,
            ..Policy::default()
        };
        let plan = enforce::plan(&inventory, &cgroups, &policy);
        for id in plan.containers.keys() {
            let entry = cgroups.get(*id).expect("a cgroup of the index");
            let CgroupOwner::Container(container) = &entry.owner else {
                panic!("cgroup {id} is not a container's");
            };
            let (pod, container) = inventory.container(container).expect("a known container");
            assert!(!container.proxy, "the proxy of {}/{} enforced", pod.namespace, pod.name);
            assert_eq!(pod.mesh, MeshMode::Sidecar);
            let (mode, _) = enforce::pod_mode(pod, &inventory, policy.enforcement);
            assert_ne!(mode, Mode::Off);
        }
    }
});
