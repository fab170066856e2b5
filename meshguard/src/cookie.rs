//! Maps keyed by socket cookie, the agent's hottest keys (every event, every record). Cookies
//! are assigned by the kernel, never chosen by a peer, so they need no DoS-resistant hash:
//! one multiplication spreads these sequential numbers over the table instead of SipHash.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

pub type CookieMap<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

#[derive(Default)]
pub struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing; the high bits, which hashbrown uses for its control bytes, mix
        // in every bit of the cookie.
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys come here (`write_u64`); anything else still hashes, just slower.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
