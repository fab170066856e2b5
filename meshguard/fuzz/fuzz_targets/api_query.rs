//! API query strings come from any client of the agent: each gets a filter or an error that
//! says what was wrong; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::store::Filter;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    match Filter::from_query(query) {
        Ok(filter) => assert!(filter.limit >= 1),
        Err(e) => assert!(!e.is_empty()),
    }
});
