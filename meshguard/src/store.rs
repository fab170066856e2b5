//! The agent's memory of recent flows, for the API and CLI: the newest records, bounded; apart
//! from them the bypasses (`bypass-plaintext`, `bypass-tls`) in a bounded store of their own;
//! and the other flagged records (`plaintext`) in a third. A flood of ordinary flows cannot
//! push an alarm out, and neither can a flood of `plaintext` from an unmeshed pod, which costs
//! an attacker nothing: only newer bypasses evict a bypass. What each store evicts is counted.
//! One record per flow: a flow's later record (closed) replaces its earlier one (classified).

use std::{collections::VecDeque, sync::Arc, time::SystemTime};

use crate::{
    api::types::{Evicted, FlowQuery},
    cookie::CookieMap,
    flow::record::{Endpoint, FlowRecord},
    verdict::Verdict,
};

/// The stores kept apart from the flood, by what they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// `bypass-plaintext`, `bypass-tls`: the alarms.
    Bypass,
    /// `plaintext`: flagged, but cheap to produce in bulk.
    Flagged,
}

/// Which store, besides the recent one, keeps a record of this verdict: every flagged one.
pub fn kept(v: Verdict) -> Option<Kept> {
    if v.is_bypass() {
        Some(Kept::Bypass)
    } else if v.is_flagged() {
        Some(Kept::Flagged)
    } else {
        None
    }
}

/// Records held, by store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub recent: usize,
    pub flagged: usize,
    pub bypass: usize,
}

/// One bounded set of records in arrival order, each with its number (`seq`, increasing). A
/// flow's later record empties the slot of its earlier one; holes leave as they reach the
/// front, and there are never more of them than flows (a flow has two records at most: when
/// classified and when closed).
struct Ring {
    /// (seq, cookie, record): the cookie beside the record, so that evicting the oldest does
    /// not have to read the record itself, long gone from the CPU's caches.
    slots: VecDeque<(u64, u64, Option<Arc<FlowRecord>>)>,
    /// Each flow's live record, by cookie.
    seq_of: CookieMap<u64>,
    capacity: usize,
}

impl Ring {
    /// Sized up front: growing while records pour in would copy the whole ring, more than once.
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            slots: VecDeque::with_capacity(capacity + capacity / 4),
            seq_of: CookieMap::with_capacity_and_hasher(capacity + 1, Default::default()),
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.seq_of.len()
    }

    fn index(&self, seq: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&seq, |(s, _, _)| *s).ok()
    }

    fn get(&self, cookie: u64) -> Option<&Arc<FlowRecord>> {
        let i = self.index(*self.seq_of.get(&cookie)?)?;
        self.slots[i].2.as_ref()
    }

    /// Stores record number `seq`, higher than any stored before; returns how many records it
    /// evicted to make room.
    fn put(&mut self, seq: u64, record: &Arc<FlowRecord>) -> u64 {
        if let Some(old) = self.seq_of.insert(record.cookie(), seq) {
            if let Some(i) = self.index(old) {
                self.slots[i].2 = None;
            }
        }
        self.slots
            .push_back((seq, record.cookie(), Some(Arc::clone(record))));
        let mut evicted = 0;
        while self.seq_of.len() > self.capacity || matches!(self.slots.front(), Some((_, _, None)))
        {
            if let Some((_, cookie, Some(_))) = self.slots.pop_front() {
                self.seq_of.remove(&cookie);
                evicted += 1;
            }
        }
        evicted
    }

    /// Forgets flow `cookie`'s record (its later one went to another ring). Its slot stays a
    /// hole; holes no later record of theirs will fill are swept once they are as many as
    /// the ring's capacity, so that they cannot pile up behind an old live record.
    fn remove(&mut self, cookie: u64) {
        let Some(seq) = self.seq_of.remove(&cookie) else {
            return;
        };
        if let Some(i) = self.index(seq) {
            self.slots[i].2 = None;
        }
        if self.slots.len() > 2 * self.capacity {
            self.slots.retain(|(_, _, r)| r.is_some());
        }
    }

    /// Records, newest first, with their numbers.
    fn newest_first(&self) -> impl Iterator<Item = (u64, &Arc<FlowRecord>)> {
        self.slots
            .iter()
            .rev()
            .filter_map(|(seq, _, r)| Some((*seq, r.as_ref()?)))
    }
}

pub struct FlowStore {
    recent: Ring,
    flagged: Ring,
    bypass: Ring,
    next: u64,
    evicted: Evicted,
}

impl FlowStore {
    pub fn new(recent: usize, flagged: usize, bypass: usize) -> Self {
        Self {
            recent: Ring::new(recent),
            flagged: Ring::new(flagged),
            bypass: Ring::new(bypass),
            next: 0,
            evicted: Evicted::default(),
        }
    }

    /// Stores a record; returns what it evicted, by store (for the metrics).
    pub fn insert(&mut self, record: Arc<FlowRecord>) -> Evicted {
        self.next += 1;
        let mut evicted = Evicted {
            recent: self.recent.put(self.next, &record),
            ..Evicted::default()
        };
        // A flow's record lives in one kept ring at most: a corrected verdict moves it. One
        // corrected to a verdict that is not kept stays where it was, the alarm it raised.
        match kept(record.verdict) {
            Some(Kept::Bypass) => {
                evicted.bypass = self.bypass.put(self.next, &record);
                self.flagged.remove(record.cookie());
            }
            Some(Kept::Flagged) => {
                evicted.flagged = self.flagged.put(self.next, &record);
                self.bypass.remove(record.cookie());
            }
            None => {}
        }
        self.evicted.recent += evicted.recent;
        self.evicted.flagged += evicted.flagged;
        self.evicted.bypass += evicted.bypass;
        evicted
    }

    pub fn len(&self) -> Stored {
        Stored {
            recent: self.recent.len(),
            flagged: self.flagged.len(),
            bypass: self.bypass.len(),
        }
    }

    /// Evicted since start, by store.
    pub fn evicted(&self) -> Evicted {
        self.evicted
    }

    /// The record of flow `id` (its cookie in hex, as records show it).
    pub fn get(&self, id: &str) -> Option<Arc<FlowRecord>> {
        let cookie = u64::from_str_radix(id, 16).ok()?;
        self.recent
            .get(cookie)
            .or_else(|| self.bypass.get(cookie))
            .or_else(|| self.flagged.get(cookie))
            .cloned()
    }

    /// Records matching `filter`, newest first, at most `filter.limit`: the rings merged by
    /// number (a kept record is also in the recent ring until it ages out of it).
    pub fn query(&self, filter: &FlowQuery, now: SystemTime) -> Vec<Arc<FlowRecord>> {
        newest_first([
            self.recent.newest_first(),
            self.bypass.newest_first(),
            self.flagged.newest_first(),
        ])
        .filter(|r| filter.matches(r, now))
        .take(filter.limit)
        .cloned()
        .collect()
    }
}

/// Rings' records (each newest first) merged newest first, a record in several once.
fn newest_first<'a, const N: usize>(
    rings: [impl Iterator<Item = (u64, &'a Arc<FlowRecord>)>; N],
) -> impl Iterator<Item = &'a Arc<FlowRecord>> {
    let mut rings = rings.map(Iterator::peekable);
    std::iter::from_fn(move || {
        let newest = rings
            .iter_mut()
            .filter_map(|r| r.peek().map(|(seq, _)| *seq))
            .max()?;
        let mut record = None;
        for ring in &mut rings {
            if let Some((_, r)) = ring.next_if(|(seq, _)| *seq == newest) {
                record = Some(r);
            }
        }
        record
    })
}

/// Matching records against a query of the API: the store's part of it (the query itself is
/// the API's, shared with the client).
impl FlowQuery {
    pub fn matches(&self, r: &FlowRecord, now: SystemTime) -> bool {
        let either = |f: &dyn Fn(&Endpoint) -> bool| f(&r.local) || f(&r.remote);
        (self.verdicts.is_empty() || self.verdicts.contains(&r.verdict))
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| either(&|e| e.namespace.as_deref() == Some(ns)))
            && self
                .pod
                .as_ref()
                .is_none_or(|p| either(&|e| e.pod.as_deref() == Some(p)))
            && self
                .workload
                .as_ref()
                .is_none_or(|w| either(&|e| e.workload.as_deref() == Some(w)))
            && self.port.is_none_or(|p| either(&|e| e.has_port(p)))
            && self.since.is_none_or(|d| {
                now.duration_since(r.last_seen.0)
                    .map_or(true, |age| age <= d)
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{api::types::MAX_LIMIT, flow::record::tests::record};

    fn stored(recent: usize, flagged: usize, bypass: usize) -> Stored {
        Stored {
            recent,
            flagged,
            bypass,
        }
    }

    #[test]
    fn filters() {
        let now = SystemTime::now();
        let r = record(1, Verdict::BypassPlaintext, now - Duration::from_secs(120));
        let cases: [(&[(&str, &str)], bool); 12] = [
            (&[], true),
            (&[("verdict", "bypass-plaintext")], true),
            (&[("verdict", "mtls,bypass-plaintext")], true),
            (&[("verdict", "mtls")], false),
            (&[("namespace", "legacy")], true),
            (&[("namespace", "kube-system")], false),
            (&[("pod", "web-abc")], true),
            (&[("workload", "catalog")], true),
            (&[("port", "5000")], true),
            (&[("port", "443")], false),
            (&[("since", "10m")], true),
            (&[("since", "1m")], false),
        ];
        for (params, want) in cases {
            let f = FlowQuery::from_params(params.iter().copied()).unwrap();
            assert_eq!(f.matches(&r, now), want, "{params:?}");
        }
        // A server socket reached through an inbound capture matches both of its ports.
        let mut captured = (*r).clone();
        captured.local.port = 15006;
        captured.local.dialled = Some("127.0.0.1:9080".parse().unwrap());
        for (port, want) in [("9080", true), ("15006", true), ("40000", false)] {
            let f = FlowQuery::from_params([("port", port)]).unwrap();
            assert_eq!(f.matches(&captured, now), want, "port {port}");
        }
    }

    #[test]
    fn a_flood_cannot_evict_the_flagged() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(100, 10, 10);
        store.insert(record(0, Verdict::BypassPlaintext, now));
        for id in 1..=10_000 {
            store.insert(record(id, Verdict::Mtls, now));
        }
        assert_eq!(store.len(), stored(100, 0, 1), "memory stays bounded");
        assert!(
            store.get(&format!("{:016x}", 0)).is_some(),
            "the alarm survived the flood"
        );
        let only = FlowQuery {
            verdicts: vec![Verdict::BypassPlaintext],
            ..FlowQuery::default()
        };
        assert_eq!(store.query(&only, now).len(), 1);
        let newest = store.query(
            &FlowQuery {
                limit: 3,
                ..FlowQuery::default()
            },
            now,
        );
        let ids: Vec<String> = newest.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                format!("{:016x}", 10_000),
                format!("{:016x}", 9_999),
                format!("{:016x}", 9_998)
            ]
        );
    }

    #[test]
    fn a_later_record_replaces_the_earlier_one() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(10, 10, 10);
        store.insert(record(7, Verdict::Pending, now));
        store.insert(record(8, Verdict::Mtls, now));
        store.insert(record(7, Verdict::BypassPlaintext, now));
        assert_eq!(store.len(), stored(2, 0, 1));
        let all = store.query(&FlowQuery::default(), now);
        assert_eq!(
            all[0].verdict,
            Verdict::BypassPlaintext,
            "the update is the newest"
        );
    }

    #[test]
    fn replacements_leave_no_lasting_holes() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(50, 50, 50);
        for cookie in 0..1000 {
            // Each flow as the agent publishes it: classified, then closed; a third flagged.
            let last = if cookie % 3 == 0 {
                Verdict::BypassPlaintext
            } else {
                Verdict::Mtls
            };
            store.insert(record(cookie, Verdict::Pending, now));
            store.insert(record(cookie, last, now));
        }
        assert_eq!(store.len(), stored(50, 0, 50));
        for ring in [&store.recent, &store.bypass] {
            assert!(ring.slots.len() <= 100, "{} slots", ring.slots.len());
        }
        let all = store.query(
            &FlowQuery {
                limit: MAX_LIMIT,
                ..FlowQuery::default()
            },
            now,
        );
        let cookies: Vec<u64> = all.iter().map(|r| r.cookie()).collect();
        let mut newest_first_once = cookies.clone();
        newest_first_once.sort_unstable_by(|a, b| b.cmp(a));
        newest_first_once.dedup();
        assert_eq!(cookies, newest_first_once, "newest first, each flow once");
        assert_eq!(
            cookies.len(),
            50 + 50 - 17,
            "the recent 50 and the older flagged"
        );
        assert!(all.iter().all(|r| r.verdict != Verdict::Pending));
    }

    #[test]
    fn a_flood_of_plaintext_cannot_evict_a_bypass() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(100, 100, 100);
        for id in 0..10 {
            let v = [Verdict::BypassPlaintext, Verdict::BypassTls][id as usize % 2];
            store.insert(record(id, v, now));
        }
        for id in 10..100_010 {
            let v = [Verdict::Plaintext, Verdict::Unmeshed][id as usize % 2];
            store.insert(record(id, v, now));
        }
        let bypasses = FlowQuery {
            verdicts: vec![Verdict::BypassPlaintext, Verdict::BypassTls],
            ..FlowQuery::default()
        };
        assert_eq!(
            store.query(&bypasses, now).len(),
            10,
            "every alarm survived"
        );
        for id in 0..10 {
            assert!(store.get(&format!("{id:016x}")).is_some(), "flow {id}");
        }
        assert_eq!(store.len(), stored(100, 100, 10));
        assert_eq!(
            store.evicted(),
            Evicted {
                recent: 100_010 - 100,
                flagged: 50_000 - 100,
                bypass: 0,
            }
        );
    }

    #[test]
    fn a_flood_of_bypasses_evicts_the_oldest_bypasses() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(10, 10, 5);
        let mut evicted = Evicted::default();
        for id in 0..12 {
            let e = store.insert(record(id, Verdict::BypassTls, now));
            evicted.recent += e.recent;
            evicted.bypass += e.bypass;
        }
        let want = Evicted {
            recent: 2,
            flagged: 0,
            bypass: 7,
        };
        assert_eq!(store.evicted(), want);
        assert_eq!(evicted, want, "what each insert evicted adds up");
        assert!(
            store.get(&format!("{:016x}", 1)).is_none(),
            "aged out of both"
        );
        let all = store.query(&FlowQuery::default(), now);
        let cookies: Vec<u64> = all.iter().map(|r| r.cookie()).collect();
        assert_eq!(cookies, (2..12).rev().collect::<Vec<_>>());
    }

    #[test]
    fn a_corrected_verdict_moves_between_stores() {
        let now = SystemTime::now();
        // (first verdict, corrected verdict, what each kept store holds after)
        let cases = [
            (
                Verdict::Plaintext,
                Verdict::BypassPlaintext,
                stored(1, 0, 1),
            ),
            (Verdict::BypassTls, Verdict::Plaintext, stored(1, 1, 0)),
            (Verdict::BypassTls, Verdict::Mtls, stored(1, 0, 1)),
            (Verdict::Pending, Verdict::Mtls, stored(1, 0, 0)),
        ];
        for (first, then, want) in cases {
            let mut store = FlowStore::new(10, 10, 10);
            store.insert(record(1, first, now));
            store.insert(record(1, then, now));
            assert_eq!(store.len(), want, "{first:?} -> {then:?}");
            assert_eq!(
                store.evicted(),
                Evicted::default(),
                "a replacement is no eviction"
            );
            let got = store.get(&format!("{:016x}", 1)).unwrap();
            assert_eq!(got.verdict, then, "the later record is the flow's");
        }
    }

    #[test]
    fn moved_records_leave_no_lasting_holes() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(10, 10, 4);
        store.insert(record(0, Verdict::BypassPlaintext, now));
        for cookie in 1..1000 {
            store.insert(record(cookie, Verdict::BypassTls, now));
            store.insert(record(cookie, Verdict::Plaintext, now));
        }
        assert_eq!(store.len().bypass, 1, "only the first stayed a bypass");
        assert!(
            store.bypass.slots.len() <= 9,
            "{} slots",
            store.bypass.slots.len()
        );
        assert!(store.get(&format!("{:016x}", 0)).is_some());
    }
}
