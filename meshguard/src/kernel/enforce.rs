//! The enforcement maps, as the agent writes them: each [`Plan`] as a change from the last one
//! written, and the agent's word for how long the kernel may act on them (`ENFORCE_UNTIL`).

use std::net::IpAddr;

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData};
use meshguard_ebpf::{names, AllowKey, Enforce, ALLOW_FIXED_BITS};

use super::{Kernel, KernelError};
use crate::enforce::{Allowed, Plan};

/// The three maps of a generation that has them.
pub(super) struct EnforceMaps {
    containers: HashMap<MapData, u64, Enforce>,
    allowed: LpmTrie<MapData, AllowKey, u8>,
    until: Array<MapData, u64>,
    /// What the maps hold; `None`: not known (an adopted generation's), so the next plan
    /// replaces whatever is there.
    written: Option<Plan>,
}

impl EnforceMaps {
    pub(super) fn new(
        containers: Map,
        allowed: Map,
        until: Map,
        known_empty: bool,
    ) -> Result<Self, KernelError> {
        let typed = |name: &'static str, e| KernelError::Map { name, source: e };
        Ok(Self {
            containers: HashMap::try_from(containers).map_err(|e| typed(names::ENFORCE, e))?,
            allowed: LpmTrie::try_from(allowed).map_err(|e| typed(names::ALLOWED, e))?,
            until: Array::try_from(until).map_err(|e| typed(names::ENFORCE_UNTIL, e))?,
            written: known_empty.then(Plan::default),
        })
    }
}

/// The trie key of an allowed peer.
fn key(a: &Allowed) -> Key<AllowKey> {
    let (family, addr) = match a.net.addr() {
        IpAddr::V4(v4) => (2u8, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (10u8, [word(0), word(4), word(8), word(12)])
        }
    };
    Key::new(
        ALLOW_FIXED_BITS + u32::from(a.net.prefix_len()),
        AllowKey {
            scope: AllowKey::scope(a.scope),
            direction: a.direction,
            family,
            port: a.port.to_be(),
            addr,
        },
    )
}

impl Kernel {
    /// Writes a plan: what changed since the last one, entries removed before others are
    /// added (so a container is never enforced by a stale entry). Without the maps (a
    /// generation from before them), says so.
    pub fn enforce(&mut self, plan: &Plan) -> Result<(), String> {
        let Some(maps) = &mut self.enforcement else {
            return if plan.is_empty() {
                Ok(())
            } else {
                Err("these kernel programs predate enforcement; restart the agent with --uninstall-pins to replace them".into())
            };
        };
        let written = match maps.written.take() {
            Some(written) => written,
            None => {
                // Unknown content: clear it all.
                let keys: Vec<u64> = maps.containers.keys().filter_map(Result::ok).collect();
                for k in keys {
                    let _ = maps.containers.remove(&k);
                }
                let keys: Vec<Key<AllowKey>> = maps.allowed.keys().filter_map(Result::ok).collect();
                for k in keys {
                    let _ = maps.allowed.remove(&k);
                }
                Plan::default()
            }
        };
        let mut errors = Vec::new();
        for id in written.containers.keys() {
            if !plan.containers.contains_key(id) {
                let _ = maps.containers.remove(id);
            }
        }
        for a in written.allowed.difference(&plan.allowed) {
            let _ = maps.allowed.remove(&key(a));
        }
        for a in plan.allowed.difference(&written.allowed) {
            if let Err(e) = maps.allowed.insert(&key(a), 1, 0) {
                errors.push(format!("allowed {}:{}: {e}", a.net, a.port));
            }
        }
        for (id, rule) in &plan.containers {
            if written.containers.get(id) != Some(rule) {
                if let Err(e) = maps.containers.insert(id, rule, 0) {
                    errors.push(format!("cgroup {id}: {e}"));
                }
            }
        }
        // What failed is retried with the next plan.
        maps.written = errors.is_empty().then(|| plan.clone());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Until when (`CLOCK_MONOTONIC` ns, as `bpf_ktime_get_ns`) the kernel may act on the
    /// maps: renewed while the agent runs, 0 to stop now, `u64::MAX` to keep them after it.
    pub fn vouch(&mut self, until_ns: u64) {
        if let Some(maps) = &mut self.enforcement {
            let _ = maps.until.set(0, until_ns, 0);
        }
    }
}
