//! Cgroup directory names and pod status container ids are read straight off the node and
//! the API server: any text gets an owner or none, never a panic, and what is found is
//! normalized (lowercase, a container's id whole).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::inventory::{cgroups::parse_cgroup_name, CgroupIndex, CgroupOwner, ContainerId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        match parse_cgroup_name(line) {
            Some(CgroupOwner::Container(id)) => {
                assert!(id.is_full());
                assert_eq!(id.as_str(), id.as_str().to_ascii_lowercase());
            }
            Some(CgroupOwner::Pod { uid }) => assert_eq!(uid, uid.to_ascii_lowercase()),
            None => {}
        }
        if let Ok(id) = ContainerId::from_status(line) {
            assert_eq!(ContainerId::from_hex(id.as_str()), Ok(id));
        }
    }
    // Each line a path below the root, its number the cgroup id.
    let index = CgroupIndex::from_entries(text.lines().zip(0u64..));
    assert!(index.len() <= text.lines().count());
    assert!(index.containers() <= index.len());
});
