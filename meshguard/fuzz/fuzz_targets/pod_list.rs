//! Pod lists come from a file or the API server: any document gets pods, errors naming the
//! objects, or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::inventory::{parse_pods, Inventory};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = parse_pods(text) {
        let inventory = Inventory::with_namespaces("fuzz", parsed.pods, &parsed.namespaces);
        let _ = inventory.lookup("10.0.0.1".parse().unwrap());
    }
});
