//! The record of a flow as the agent publishes it (`--log-flows`, the API) and the CLI reads it
//! back: plain data, serialized and deserialized the same way on both sides. The judging stage
//! makes records ([`crate::judge::record_of`]); nothing here knows the agent's flow table.
//!
//! A record read from a newer agent may carry fields this one does not know: they are ignored
//! (and so are gone when it is written out again), while a word this one does not know (a new
//! verdict, say) fails the record. Fields older agents did not send read as their default.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use meshguard_ebpf::COMM_LEN;
use serde::{Deserialize, Serialize};

use crate::{
    enforce::{Action, Rule},
    fingerprint::{Encryption, PlaintextProtocol, TlsInfo},
    intent::Contradiction,
    inventory::{
        destination::ClientTls,
        policy::{MtlsMode, PolicyKind, PolicyRef, TlsMode},
    },
    verdict::{Direction, OwnerKind, Party, Path, Verdict},
    wire::wire_enum,
};

wire_enum! {
    /// What a published record reports.
    pub enum Change ("event") {
        /// The flow's evidence was whole (or waited for long enough) to judge it.
        Classified = "classified",
        /// Enforcement acted on an open flow after its first record: a TLS handshake record,
        /// then plaintext.
        Enforced = "enforced",
        Closed = "closed",
    }
}

wire_enum! {
    /// Whether the flow was still open when the record was made.
    pub enum State ("state") {
        Open = "open",
        Closed = "closed",
    }
}

wire_enum! {
    /// The flow's transport.
    pub enum Protocol ("protocol") {
        Tcp = "tcp",
        Udp = "udp",
    }
}

/// A verdict's reason code: the verdict engine's own words are `&'static str` and cost no
/// allocation in a record; one read back from JSON is owned.
pub type Reason = Cow<'static, str>;

/// A verdict an earlier record of the same flow gave, which later evidence changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corrected {
    pub verdict: Verdict,
    pub reason: Reason,
}

/// A flow as `--log-flows`, the API and the CLI show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The flow key (the socket cookie), shown in hex.
    pub id: FlowId,
    /// Shared by every record of the agent. Empty when read from an answer without one.
    #[serde(default)]
    pub node: Arc<str>,
    pub event: Change,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub state: State,
    pub direction: Direction,
    pub protocol: Protocol,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub process: Process,
    /// Whose cgroup created the socket: the evidence of who sent and received it.
    #[serde(default)]
    pub owner: OwnerRecord,
    /// Its packets crossed only the loopback device: both ends in one network namespace.
    #[serde(default)]
    pub loopback: bool,
    pub encryption: Encryption,
    pub tls: Option<TlsInfo>,
    pub plaintext: Option<PlaintextRecord>,
    /// With `--evidence redacted` only: the first sampled HTTP/1 head, header values redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_sample: Option<String>,
    pub path: Path,
    /// Where egress really went when netfilter sent it elsewhere than the socket's peer.
    pub redirect: Option<RedirectRecord>,
    /// What the mesh declares for the connection's server, a meshed pod: the mTLS its sidecar
    /// accepts on the port its client dialled, and the object that says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub verdict: Verdict,
    pub reason: Reason,
    /// One sentence for a person: what happened and why it got this verdict.
    pub detail: String,
    /// Set when this record's verdict differs from the flow's first record (evidence that came
    /// later changed it): an explicit, counted correction, never a silent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrected_from: Option<Corrected>,
    /// First seen mid-connection: its start predates the agent.
    pub midstream: bool,
    /// Reported from the kernel's flow map because its events were lost (see `reconcile`).
    #[serde(default)]
    pub recovered: bool,
    /// The flow's first record: metrics count the flow once, on it. The agent's own note, not
    /// on the wire (false in a record read back).
    #[serde(skip)]
    pub first_report: bool,
    /// The kernel evicted the flow's entry while it was open: counters stop where the agent
    /// last saw them.
    #[serde(default)]
    pub evicted: bool,
    pub netns_cookie: u64,
    /// How what the kernel saw contradicts what the mesh declares for the server (`policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contradiction: Option<Contradiction>,
    /// What enforcement did: `refused` (every payload packet dropped, from the first, and the
    /// connection reset) or, in `audit`, `would-refuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The refusal it met: `egress-bypass` or `strict-inbound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_rule: Option<Rule>,
}

impl FlowRecord {
    /// Whether this record is the one that first says what enforcement did to its flow: its
    /// first, or the `enforced` one that came after it.
    pub fn reports_action(&self) -> bool {
        self.action.is_some() && (self.first_report || self.event == Change::Enforced)
    }

    /// The flow key: the socket cookie, or a UDP socket's per-peer key.
    pub fn cookie(&self) -> u64 {
        self.id.0
    }

    /// The ends as source and destination: the socket's own end is the source of what it
    /// connected (egress), the destination of what it accepted (ingress).
    pub fn source_and_destination(&self) -> (&Endpoint, &Endpoint) {
        match self.direction {
            Direction::Egress => (&self.local, &self.remote),
            Direction::Ingress => (&self.remote, &self.local),
        }
    }
}

/// A process name as the kernel keeps it (`comm`, at most 15 bytes): kept inline, so that a
/// record costs no allocation for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; COMM_LEN],
    len: u8,
}

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut bytes = [0; COMM_LEN];
        // Whole characters only, so that `as_str` is always valid UTF-8.
        let mut len = name.len().min(COMM_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Comm {
    /// Cut to what the kernel keeps, as [`Comm::new`] does.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Comm::new(&Cow::<str>::deserialize(d)?))
    }
}

/// A flow's id: its socket cookie, shown as 16 hex digits. Kept as the number, so that a record
/// costs no string for it until it is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowId(pub u64);

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for FlowId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        u64::from_str_radix(s, 16)
            .map(FlowId)
            .map_err(|_| format!("{s:?} is not a flow id (hexadecimal)"))
    }
}

impl Serialize for FlowId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FlowId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Cow::<str>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A time as records show it (RFC 3339, milliseconds, UTC), formatted only when shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_millis(self.0).fmt(f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// One end of a flow: its address, and who is there as the inventory said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The socket's own port (or its peer's).
    pub port: u16,
    /// The server end of a connection netfilter redirected to this socket (a sidecar's
    /// capture, `port` being the capture port): the address its client dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialled: Option<SocketAddr>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    /// `true` for the node itself (host network).
    pub node: bool,
    pub meshed: bool,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, who: Party) -> Self {
        let (namespace, pod, workload, meshed) = match who {
            Party::Pod {
                namespace,
                pod,
                workload,
                meshed,
            } => (
                Some(namespace.to_string()),
                Some(pod.to_string()),
                Some(workload.to_string()),
                meshed,
            ),
            Party::Node | Party::Unknown => (None, None, None, false),
        };
        Endpoint {
            ip: addr.ip(),
            port: addr.port(),
            dialled: None,
            namespace,
            pod,
            workload,
            node: who == Party::Node,
            meshed,
        }
    }

    /// The port to show at this end: the one its client dialled where a capture redirected
    /// the connection to another port of the same address (what a person knows the service
    /// by), else the socket's own.
    pub fn shown_port(&self) -> u16 {
        self.dialled
            .filter(|d| d.ip() == self.ip)
            .map_or(self.port, |d| d.port())
    }

    /// Whether this end's port, or the port its client dialled, is `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.port == port || self.dialled.is_some_and(|d| d.port() == port)
    }

    /// Who is at this end: a pod (the agent names its namespace, pod and workload together),
    /// the node, or nobody the inventory knows.
    pub fn party(&self) -> Party<'_> {
        match (&self.namespace, &self.pod, &self.workload) {
            (Some(namespace), Some(pod), Some(workload)) => Party::Pod {
                namespace,
                pod,
                workload,
                meshed: self.meshed,
            },
            _ if self.node => Party::Node,
            _ => Party::Unknown,
        }
    }

    /// How a table names it (see [`Party::name`]).
    pub fn name(&self) -> String {
        self.party().name(self.ip)
    }

    /// Its metric labels, namespace and workload (see [`Party::labels`]).
    pub fn workload_labels(&self) -> (&str, &str) {
        self.party().labels()
    }
}

/// A socket's owner as a record shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub kind: OwnerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// What a record read from an agent that did not say: no cgroup evidence.
impl Default for OwnerRecord {
    fn default() -> Self {
        Self {
            kind: OwnerKind::Unknown,
            container: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    pub uid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextRecord {
    pub protocol: PlaintextProtocol,
    /// An HTTP request's method (the fingerprint's own words: no allocation in the agent).
    pub method: Option<Cow<'static, str>>,
    /// An HTTP request's path, without query string, fragment, path parameters or userinfo.
    pub path: Option<String>,
}

/// What the mesh declares for a connection between meshed workloads: the mTLS its server's
/// sidecar accepts, and the TLS a DestinationRule tells its client's sidecar to use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The PeerAuthentication that sets the mode; absent where none does (Istio's default).
    #[serde(flatten)]
    pub object: Option<PolicyRef>,
    pub mode: MtlsMode,
    /// The server's port it applies to: the one its client dialled.
    pub port: u16,
    /// The rule that sets the client's sidecar's TLS, where the client has a sidecar and a
    /// rule sets a mode (else Istio's automatic mTLS decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<DestinationRuleRecord>,
}

/// A DestinationRule as it governs one connection's client side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRuleRecord {
    pub namespace: String,
    pub name: String,
    /// The Service the rule was found for, by its fully qualified name, and its port.
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
}

impl From<ClientTls> for DestinationRuleRecord {
    fn from(t: ClientTls) -> Self {
        Self {
            namespace: t.rule.namespace,
            name: t.rule.name,
            host: t.host,
            port: t.port,
            tls: t.mode,
        }
    }
}

impl DestinationRuleRecord {
    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::DestinationRule,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectRecord {
    pub ip: IpAddr,
    pub port: u16,
    /// Interface index in the flow's network namespace (1 is loopback).
    pub ifindex: u32,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn endpoint(ns: &str, pod: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            dialled: None,
            namespace: Some(ns.into()),
            pod: Some(format!("{pod}-abc")),
            workload: Some(pod.into()),
            node: false,
            meshed: true,
        }
    }

    /// A closed plaintext flow from shop/web-abc:40000 to legacy/catalog-abc:5000.
    pub(crate) fn record(id: u64, verdict: Verdict, at: SystemTime) -> Arc<FlowRecord> {
        Arc::new(FlowRecord {
            id: FlowId(id),
            node: "n".into(),
            event: Change::Closed,
            first_seen: Timestamp(at),
            last_seen: Timestamp(at),
            state: State::Closed,
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            local: endpoint("shop", "web", 40000),
            remote: endpoint("legacy", "catalog", 5000),
            process: Process {
                pid: None,
                comm: None,
                uid: None,
            },
            owner: OwnerRecord {
                kind: OwnerKind::App,
                container: None,
            },
            loopback: false,
            encryption: Encryption::Plaintext,
            tls: None,
            plaintext: None,
            redacted_sample: None,
            path: Path::Direct,
            redirect: None,
            policy: None,
            bytes_sent: 0,
            bytes_received: 0,
            packets_sent: 0,
            packets_received: 0,
            verdict,
            reason: "r".into(),
            detail: String::new(),
            corrected_from: None,
            midstream: false,
            recovered: false,
            first_report: true,
            evicted: false,
            netns_cookie: 0,
            contradiction: None,
            action: None,
            action_rule: None,
        })
    }

    #[test]
    fn comm_keeps_whole_characters() {
        assert_eq!(Comm::new("wrk:worker_0").to_string(), "wrk:worker_0");
        // 18 bytes of two-byte characters: the first 8 fit in 16.
        assert_eq!(Comm::new("ééééééééé").as_str(), "éééééééé");
        assert_eq!(
            serde_json::to_string(&Comm::new("curl")).unwrap(),
            "\"curl\""
        );
    }

    /// Every field set, in each of its forms that JSON shows differently.
    fn full_records() -> Vec<FlowRecord> {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_912_296_912);
        let mut full = (*record(0x4a1f, Verdict::BypassTls, at)).clone();
        full.node = "kind-worker".into();
        full.event = Change::Classified;
        full.state = State::Open;
        full.direction = Direction::Ingress;
        full.protocol = Protocol::Udp;
        full.remote = Endpoint::new("10.0.0.1:53".parse().unwrap(), Party::Node);
        full.process = Process {
            pid: Some(4411),
            comm: Some(Comm::new("wrk:worker_0")),
            uid: Some(1337),
        };
        full.owner = OwnerRecord {
            kind: OwnerKind::Proxy,
            container: Some("istio-proxy".into()),
        };
        full.loopback = true;
        full.encryption = Encryption::Tls;
        full.tls = Some(TlsInfo {
            version: Some(crate::fingerprint::TlsVersion(0x0304)),
            sni: Some("api.shop.svc".into()),
            alpn: vec!["istio".into(), "h2".into()],
            ..TlsInfo::default()
        });
        full.plaintext = Some(PlaintextRecord {
            protocol: PlaintextProtocol::Http1,
            method: Some("GET".into()),
            path: Some("/orders".into()),
        });
        full.redacted_sample = Some("GET /orders HTTP/1.x\nCookie: <redacted>".into());
        full.path = Path::InPod;
        full.redirect = Some(RedirectRecord {
            ip: "127.0.0.1".parse().unwrap(),
            port: 15001,
            ifindex: 1,
        });
        full.bytes_sent = 1873;
        full.reason = "app-tls".into();
        full.detail = "a sentence \"quoted\"\n".into();
        full.corrected_from = Some(Corrected {
            verdict: Verdict::Pending,
            reason: "no-payload".into(),
        });
        full.midstream = true;
        full.recovered = true;
        full.evicted = true;
        full.netns_cookie = 4097;
        let mut odd = full.clone();
        odd.tls = Some(TlsInfo {
            version: Some(crate::fingerprint::TlsVersion(0x0a0a)),
            ..TlsInfo::default()
        });
        odd.plaintext = Some(PlaintextRecord {
            protocol: PlaintextProtocol::H2c,
            method: None,
            path: None,
        });
        vec![(*record(1, Verdict::Mtls, at)).clone(), full, odd]
    }

    #[test]
    fn a_record_reads_back_as_the_agent_wrote_it() {
        for r in full_records() {
            let json = serde_json::to_string(&r).unwrap();
            let back: FlowRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
            assert_eq!(back.cookie(), r.cookie());
            assert_eq!(
                back.source_and_destination().0,
                r.source_and_destination().0
            );
        }
    }

    #[test]
    fn an_older_agent_s_record_reads_with_defaults_and_a_newer_one_s_extra_fields_are_ignored() {
        let mut v =
            serde_json::to_value(&*record(7, Verdict::Mtls, SystemTime::UNIX_EPOCH)).unwrap();
        let fields = v.as_object_mut().unwrap();
        for added_later in ["node", "owner", "loopback", "recovered", "evicted"] {
            fields.remove(added_later);
        }
        fields.insert("from_the_future".into(), serde_json::json!({"x": 1}));
        let r: FlowRecord = serde_json::from_value(v).unwrap();
        assert_eq!(&*r.node, "");
        assert_eq!(r.owner, OwnerRecord::default());
        assert!(!r.loopback && !r.recovered && !r.evicted);

        let mut v =
            serde_json::to_value(&*record(7, Verdict::Mtls, SystemTime::UNIX_EPOCH)).unwrap();
        v["verdict"] = "bypass-quantum".into();
        let e = serde_json::from_value::<FlowRecord>(v).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unknown verdict \"bypass-quantum\""),
            "{e}"
        );
    }

    #[test]
    fn ends_are_named_one_way() {
        let pod = endpoint("shop", "web", 80);
        assert_eq!(pod.name(), "shop/web-abc");
        assert_eq!(pod.workload_labels(), ("shop", "web"));
        let addr: SocketAddr = "10.0.0.1:10250".parse().unwrap();
        let node = Endpoint::new(addr, Party::Node);
        assert_eq!(node.name(), "node (10.0.0.1)");
        assert_eq!(node.party().in_sentence(node.ip), "the node (10.0.0.1)");
        assert_eq!(node.workload_labels(), ("", "node"));
        let nobody = Endpoint::new(addr, Party::Unknown);
        assert_eq!(nobody.name(), "10.0.0.1");
        assert_eq!(nobody.workload_labels(), ("", "unknown"));
        assert_eq!(nobody.party().described(), "not in the inventory");
    }
}
