//! API query strings come from any client of the agent: each gets a query or an error that
//! says what was wrong, in one printable line; never a panic. A query's canonical query string
//! asks for that same query, and its limit is one the store serves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::{
    api::types::{FlowQuery, MAX_LIMIT},
    cli::display::has_unsafe,
};

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    match FlowQuery::from_query(query) {
        Ok(filter) => {
            assert!((1..=MAX_LIMIT).contains(&filter.limit), "{filter:?}");
            let canonical = filter.to_query();
            assert_eq!(
                FlowQuery::from_query(&canonical).as_ref(),
                Ok(&filter),
                "{query:?} as {canonical:?}"
            );
        }
        Err(e) => assert!(!e.is_empty() && !has_unsafe(&e), "{query:?}: {e:?}"),
    }
});
