//! The agent's memory of recent flows, for the API and CLI: the newest records, bounded, and
//! the flagged ones (`bypass-plaintext`, `bypass-tls`, `plaintext`) in a bounded store of their
//! own, so that a flood of ordinary flows cannot push an alarm out. One record per flow: a
//! flow's later record (closed) replaces its earlier one (classified).

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{cookie::CookieMap, flow::FlowRecord, verdict::Verdict};

/// Verdicts that are kept apart from the flood.
pub fn flagged(v: Verdict) -> bool {
    matches!(
        v,
        Verdict::BypassPlaintext | Verdict::BypassTls | Verdict::Plaintext
    )
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

    /// Stores record number `seq`, higher than any stored before.
    fn put(&mut self, seq: u64, record: &Arc<FlowRecord>) {
        if let Some(old) = self.seq_of.insert(record.cookie, seq) {
            if let Some(i) = self.index(old) {
                self.slots[i].2 = None;
            }
        }
        self.slots
            .push_back((seq, record.cookie, Some(Arc::clone(record))));
        while self.seq_of.len() > self.capacity || matches!(self.slots.front(), Some((_, _, None)))
        {
            if let Some((_, cookie, Some(_))) = self.slots.pop_front() {
                self.seq_of.remove(&cookie);
            }
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
    next: u64,
}

impl FlowStore {
    pub fn new(recent: usize, flagged: usize) -> Self {
        Self {
            recent: Ring::new(recent),
            flagged: Ring::new(flagged),
            next: 0,
        }
    }

    pub fn insert(&mut self, record: Arc<FlowRecord>) {
        self.next += 1;
        self.recent.put(self.next, &record);
        if flagged(record.verdict) {
            self.flagged.put(self.next, &record);
        }
    }

    pub fn len(&self) -> (usize, usize) {
        (self.recent.len(), self.flagged.len())
    }

    /// The record of flow `id` (its cookie in hex, as records show it).
    pub fn get(&self, id: &str) -> Option<Arc<FlowRecord>> {
        let cookie = u64::from_str_radix(id, 16).ok()?;
        self.recent
            .get(cookie)
            .or_else(|| self.flagged.get(cookie))
            .cloned()
    }

    /// Records matching `filter`, newest first, at most `filter.limit`: the two rings merged by
    /// number (a flagged record may be in both).
    pub fn query(&self, filter: &Filter, now: SystemTime) -> Vec<Arc<FlowRecord>> {
        let mut recent = self.recent.newest_first().peekable();
        let mut flagged = self.flagged.newest_first().peekable();
        let merged = std::iter::from_fn(|| {
            let newer_recent = match (recent.peek(), flagged.peek()) {
                (Some((a, _)), Some((b, _))) if a == b => {
                    flagged.next();
                    true
                }
                (Some((a, _)), Some((b, _))) => a > b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return None,
            };
            if newer_recent {
                recent.next()
            } else {
                flagged.next()
            }
        });
        merged
            .map(|(_, r)| r)
            .filter(|r| filter.matches(r, now))
            .take(filter.limit)
            .cloned()
            .collect()
    }
}

/// What `/v1/flows` and `meshguard flows` select on. Every field narrows; unset fields don't.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub verdicts: Vec<Verdict>,
    /// Either end in this namespace.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    /// Either end on this port.
    pub port: Option<u16>,
    /// Seen within this long.
    pub since: Option<Duration>,
    pub limit: usize,
}

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 100_000;

impl Default for Filter {
    fn default() -> Self {
        Self {
            verdicts: Vec::new(),
            namespace: None,
            pod: None,
            workload: None,
            port: None,
            since: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

const VERDICTS: [Verdict; 8] = [
    Verdict::Mtls,
    Verdict::BypassPlaintext,
    Verdict::BypassTls,
    Verdict::Plaintext,
    Verdict::Unmeshed,
    Verdict::Expected,
    Verdict::InPod,
    Verdict::Pending,
];

pub fn parse_verdict(s: &str) -> Result<Verdict, String> {
    VERDICTS
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| {
            let known: Vec<&str> = VERDICTS.iter().map(|v| v.as_str()).collect();
            format!("unknown verdict {s:?}; use one of {}", known.join(", "))
        })
}

impl Filter {
    /// From a URL query string, as the API receives it.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| format!("malformed query string: {e}"))?;
        Filter::from_params(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// From URL query parameters (`verdict=a,b&namespace=x&since=10m&limit=50`).
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut f = Filter::default();
        for (key, value) in params {
            let value = value.trim();
            match key {
                "verdict" => {
                    for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        f.verdicts.push(parse_verdict(v)?);
                    }
                }
                "namespace" => f.namespace = Some(value.to_string()),
                "pod" => f.pod = Some(value.to_string()),
                "workload" => f.workload = Some(value.to_string()),
                "port" => f.port = Some(value.parse().map_err(|_| format!("port {value:?} is not a port number (1-65535)"))?),
                "since" => {
                    let d = humantime::parse_duration(value).map_err(|e| format!("since {value:?} is not a duration like 10m or 1h30m: {e}"))?;
                    f.since = Some(d);
                }
                "limit" => {
                    f.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit {value:?} is not a number from 1 to {MAX_LIMIT}"))?;
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; use verdict, namespace, pod, workload, port, since, limit"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The query string that asks for this filter: [`Filter::from_query`] gives it back.
    pub fn to_query(&self) -> String {
        let mut q: Vec<(&str, String)> = Vec::new();
        if !self.verdicts.is_empty() {
            let verdicts: Vec<&str> = self.verdicts.iter().map(|v| v.as_str()).collect();
            q.push(("verdict", verdicts.join(",")));
        }
        for (key, value) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("workload", &self.workload),
        ] {
            if let Some(v) = value {
                q.push((key, v.clone()));
            }
        }
        if let Some(port) = self.port {
            q.push(("port", port.to_string()));
        }
        if let Some(since) = self.since {
            q.push(("since", humantime::format_duration(since).to_string()));
        }
        if self.limit != DEFAULT_LIMIT {
            q.push(("limit", self.limit.to_string()));
        }
        serde_urlencoded::to_string(&q).unwrap_or_default()
    }

    pub fn matches(&self, r: &FlowRecord, now: SystemTime) -> bool {
        let either = |f: &dyn Fn(&crate::flow::Endpoint) -> bool| f(&r.local) || f(&r.remote);
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
            && self.port.is_none_or(|p| either(&|e| e.port == p))
            && self.since.is_none_or(|d| {
                now.duration_since(r.last_seen.0)
                    .map_or(true, |age| age <= d)
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        flow::{Change, Endpoint, Process},
        verdict::{Encryption, Path},
    };

    fn endpoint(ns: &str, pod: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            namespace: Some(ns.into()),
            pod: Some(format!("{pod}-abc")),
            workload: Some(pod.into()),
            node: false,
            meshed: true,
        }
    }

    pub(crate) fn record(id: u64, verdict: Verdict, at: SystemTime) -> Arc<FlowRecord> {
        Arc::new(FlowRecord {
            cookie: id,
            id: crate::flow::FlowId(id),
            node: "n".into(),
            event: Change::Closed,
            first_seen: crate::flow::Timestamp(at),
            last_seen: crate::flow::Timestamp(at),
            state: "closed",
            direction: "egress",
            protocol: "tcp",
            local: endpoint("shop", "web", 40000),
            remote: endpoint("legacy", "catalog", 5000),
            process: Process {
                pid: None,
                comm: None,
                uid: None,
            },
            owner: crate::flow::OwnerRecord {
                kind: "app",
                container: None,
            },
            loopback: false,
            encryption: Encryption::Plaintext,
            tls: None,
            plaintext: None,
            redacted_sample: None,
            path: Path::Direct,
            redirect: None,
            bytes_sent: 0,
            bytes_received: 0,
            packets_sent: 0,
            packets_received: 0,
            verdict,
            reason: "r",
            detail: String::new(),
            corrected_from: None,
            midstream: false,
            recovered: false,
            first_report: true,
            evicted: false,
            netns_cookie: 0,
        })
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
            let f = Filter::from_params(params.iter().copied()).unwrap();
            assert_eq!(f.matches(&r, now), want, "{params:?}");
        }
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let cases = [
            (
                ("verdict", "bypass"),
                "unknown verdict \"bypass\"; use one of mtls, bypass-plaintext",
            ),
            (("port", "http"), "port \"http\" is not a port number"),
            (
                ("since", "yesterday"),
                "since \"yesterday\" is not a duration",
            ),
            (
                ("limit", "0"),
                "limit \"0\" is not a number from 1 to 100000",
            ),
            (("limit", "-5"), "limit \"-5\" is not a number"),
            (("colour", "red"), "unknown parameter \"colour\""),
        ];
        for (param, want) in cases {
            let e = Filter::from_params([param]).unwrap_err();
            assert!(e.starts_with(want), "{param:?}: {e}");
        }
    }

    #[test]
    fn a_filter_round_trips_through_its_query_string() {
        let cases = [
            ("", ""),
            ("limit=1000", ""),
            (
                "verdict=mtls, bypass-tls&namespace=shop&since=90m&port=80&limit=5",
                "verdict=mtls%2Cbypass-tls&namespace=shop&port=80&since=1h+30m&limit=5",
            ),
            ("pod=a%26b%3Dc&workload=", "pod=a%26b%3Dc&workload="),
            ("since=1y2M3d&verdict=", "since=1year+2months+3days"),
        ];
        for (query, canonical) in cases {
            let filter = Filter::from_query(query).unwrap();
            assert_eq!(filter.to_query(), canonical, "{query}");
            assert_eq!(Filter::from_query(canonical), Ok(filter), "{query}");
        }
    }

    #[test]
    fn a_flood_cannot_evict_the_flagged() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(100, 10);
        store.insert(record(0, Verdict::BypassPlaintext, now));
        for id in 1..=10_000 {
            store.insert(record(id, Verdict::Mtls, now));
        }
        assert_eq!(store.len(), (100, 1), "memory stays bounded");
        assert!(
            store.get(&format!("{:016x}", 0)).is_some(),
            "the alarm survived the flood"
        );
        let only = Filter {
            verdicts: vec![Verdict::BypassPlaintext],
            ..Filter::default()
        };
        assert_eq!(store.query(&only, now).len(), 1);
        let newest = store.query(
            &Filter {
                limit: 3,
                ..Filter::default()
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
        let mut store = FlowStore::new(10, 10);
        store.insert(record(7, Verdict::Pending, now));
        store.insert(record(8, Verdict::Mtls, now));
        store.insert(record(7, Verdict::BypassPlaintext, now));
        assert_eq!(store.len(), (2, 1));
        let all = store.query(&Filter::default(), now);
        assert_eq!(
            all[0].verdict,
            Verdict::BypassPlaintext,
            "the update is the newest"
        );
    }

    #[test]
    fn replacements_leave_no_lasting_holes() {
        let now = SystemTime::now();
        let mut store = FlowStore::new(50, 50);
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
        assert_eq!(store.len(), (50, 50));
        for ring in [&store.recent, &store.flagged] {
            assert!(ring.slots.len() <= 100, "{} slots", ring.slots.len());
        }
        let all = store.query(
            &Filter {
                limit: MAX_LIMIT,
                ..Filter::default()
            },
            now,
        );
        let cookies: Vec<u64> = all.iter().map(|r| r.cookie).collect();
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
}
