//! What people read: the flows table, `explain` and `status`, from the agent's typed answers.
//! Every string that came from the agent (names from pods, SNI, ALPN, the agent's own
//! sentences) goes through [`printable`] on its way to the terminal: the table's cells one by
//! one (its colour codes are ours), `explain` and `status` whole lines at a time.

use std::{fmt::Write as _, io::IsTerminal, net::SocketAddr};

use crate::{
    api::types::{Evicted, Explanation, Status},
    cli::{display::printable, Output},
    flow::record::FlowRecord,
    loss::LossSource,
    verdict::Verdict,
};

/// Colour only for a person at a terminal who has not asked for none.
pub(crate) fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The table's header. `node_column` puts NODE second (answers merged from several nodes);
/// otherwise only `wide` shows it, near the end.
pub(crate) fn header(output: Output, node_column: bool) -> String {
    let mut h = format!("{:<19} ", "TIME");
    if node_column {
        let _ = write!(h, "{:<16} ", "NODE");
    }
    let _ = write!(
        h,
        "{:<17} {:<19} {:<6} {:<40} {:<46} {:<10} {:>9}",
        "VERDICT", "REASON", "END", "SOURCE", "DESTINATION", "ENCRYPTION", "BYTES"
    );
    if output == Output::Wide {
        let _ = write!(h, " {:<16} ", "ID");
        if !node_column {
            let _ = write!(h, "{:<16} ", "NODE");
        }
        let _ = write!(h, "{:<8} {:<24} {:<28} TLS", "PATH", "PROCESS", "NAT");
    }
    h
}

/// `2026-11-28T22:31:36.912Z` as `Nov 28 22:31:36.912`.
fn short_time(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc3339
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .filter(|m| (1..=12).contains(m));
    match (month, rfc3339.get(8..10), rfc3339.get(11..23)) {
        (Some(m), Some(day), Some(time)) => format!("{} {day} {time}", MONTHS[m - 1]),
        _ => rfc3339.to_string(),
    }
}

fn paint(verdict: Verdict, color: bool) -> String {
    let text = format!("{:<17}", verdict.as_str());
    if !color {
        return text;
    }
    let code = match verdict {
        Verdict::BypassPlaintext | Verdict::BypassTls => "1;31",
        Verdict::Plaintext => "33",
        Verdict::Mtls => "32",
        Verdict::Pending => "2",
        _ => return text,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// Shown where a record has nothing to say (no process known, no TLS seen).
const NONE: &str = "-";

/// What netfilter's NAT did at this end: the client's egress sent elsewhere than its peer
/// (`to ADDRESS:PORT`, its sidecar), or the server's socket reached by a connection dialled to
/// another port (`dialled PORT`, a sidecar's inbound capture) or address (`dialled ADDRESS:PORT`,
/// its outbound capture).
fn nat(f: &FlowRecord) -> String {
    match (&f.redirect, f.local.dialled) {
        (Some(r), _) => format!("to {}", SocketAddr::new(r.ip, r.port)),
        (None, Some(d)) if d.ip() == f.local.ip => format!("dialled {}", d.port()),
        (None, Some(d)) => format!("dialled {d}"),
        (None, None) => NONE.into(),
    }
}

/// One flow as a table row, in the columns of [`header`]. The destination's port is the one its
/// client dialled (the capture port is in `-o wide`).
pub(crate) fn row(f: &FlowRecord, output: Output, color: bool, node_column: bool) -> String {
    let (src, dst) = f.source_and_destination();
    let node = printable(&f.node);
    let mut line = format!("{:<19} ", short_time(&f.last_seen.to_string()));
    if node_column {
        let _ = write!(line, "{node:<16} ");
    }
    let _ = write!(
        line,
        "{} {:<19} {:<6} {:<40} {:<46} {:<10} {:>9}",
        paint(f.verdict, color),
        printable(&f.reason),
        // Which socket made the record: a connection between two watched pods is two records
        // (like `hubble observe`'s observation point).
        f.direction.end(),
        printable(&src.name()),
        printable(&format!("{}:{}", dst.name(), dst.shown_port())),
        f.encryption,
        f.bytes_sent + f.bytes_received,
    );
    if output == Output::Wide {
        let process = match (&f.process.comm, f.process.uid) {
            (Some(c), Some(u)) => format!("{c} uid={u}"),
            (None, Some(u)) => format!("uid={u}"),
            _ => NONE.into(),
        };
        let tls = match &f.tls {
            Some(t) => format!(
                "{} {} {}",
                t.version.map_or_else(|| NONE.into(), |v| v.name()),
                t.sni.as_deref().unwrap_or(NONE),
                t.alpn.join(",")
            ),
            None => NONE.into(),
        };
        let _ = write!(line, " {:<16} ", f.id.to_string());
        if !node_column {
            let _ = write!(line, "{node:<16} ");
        }
        let _ = write!(
            line,
            "{:<8} {:<24} {:<28} {}",
            f.path,
            printable(&process),
            nat(f),
            printable(&tls)
        );
    }
    line
}

/// Text for a person, a line at a time, each made [`printable`] whole.
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn line(&mut self, text: impl AsRef<str>) {
        self.0.push_str(&printable(text.as_ref()));
        self.0.push('\n');
    }
}

/// What `meshguard explain` prints of the agent's `/v1/flows/{id}` answer.
pub(crate) fn explain_text(id: &str, v: &Explanation) -> String {
    let f = &v.flow;
    let mut out = Lines::default();
    out.line(format!("Flow {id} on node {}", f.node));
    out.line(format!(
        "  first seen {}, last seen {}, {}",
        f.first_seen, f.last_seen, f.state
    ));
    out.line("Evidence:");
    for line in &v.evidence {
        out.line(format!("  {line}"));
    }
    out.0
}

/// What `meshguard status` prints of the agent's `/v1/status` answer.
pub(crate) fn status_text(s: &Status) -> String {
    let mut out = Lines::default();
    let degraded = s.degraded.join(", ");
    out.line(format!("Node:        {} (kernel {})", s.node, s.kernel));
    out.line(format!(
        "Agent:       meshguard {}, up since {}",
        s.version, s.started_at
    ));
    out.line(format!(
        "Health:      {}",
        if degraded.is_empty() {
            "ok".to_string()
        } else {
            format!("DEGRADED: {degraded}")
        }
    ));
    out.line(format!("Programs:    {}", s.programs_attached.join(", ")));
    let inv = &s.inventory;
    let age = inv
        .age_seconds
        .map_or("never loaded".to_string(), |a| format!("updated {a}s ago"));
    out.line(format!(
        "Inventory:   {} pods from {}, {age}",
        inv.pods, inv.source
    ));
    let containers = s.container_cgroups;
    out.line(format!(
        "Owners:      {}",
        if containers > 0 {
            format!("{containers} container cgroups found: each socket is traced to its container")
        } else {
            "no container cgroups found (--cgroup-root): the proxy is recognised by uid and process name only".to_string()
        }
    ));
    let (entries, capacity) = (s.flow_map.entries, s.flow_map.capacity);
    out.line(format!(
        "Flow map:    {entries} of {capacity} entries ({:.1}% full)",
        100.0 * entries as f64 / capacity.max(1) as f64
    ));
    out.line(format!(
        "Flows:       {} tracked, {} stored (apart: {} bypasses, {} other flagged)",
        s.flows_tracked, s.flows_stored, s.bypass_stored, s.flagged_stored
    ));
    out.line(format!("Evicted:     {}", store_evicted(&s.store_evicted)));
    out.line(format!(
        "Kernel side: {}",
        if s.adopted {
            "adopted from an earlier agent (pinned programs kept counting meanwhile)"
        } else {
            "attached by this agent"
        }
    ));
    if s.flows_recovered > 0 {
        out.line(format!(
            "Recovered:   {} flows reported from the kernel's flow map after their events were lost",
            s.flows_recovered
        ));
    }
    if s.enforcement.is_empty() {
        out.line("Enforcement: no pod with a sidecar on this node");
    } else {
        out.line(format!(
            "Enforcement: {} container cgroups audited or enforced; by namespace (when the agent stops: {})",
            s.enforced_cgroups, s.enforcement_on_exit
        ));
        for ns in &s.enforcement {
            let overrides = if ns.overrides.is_empty() {
                String::new()
            } else {
                format!("; pods of their own: {}", ns.overrides.join(", "))
            };
            out.line(format!(
                "  {:<24} {:<8} ({}, {} pods with a sidecar){overrides}",
                ns.namespace, ns.mode, ns.source, ns.pods
            ));
        }
    }
    if let Some(e) = &s.enforcement_error {
        out.line(format!("  NOT ENFORCED AS PLANNED: {e}"));
    }
    let lost: Vec<String> = s
        .events_lost
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(source, &n)| loss_in_words(source, n))
        .collect();
    if lost.is_empty() {
        out.line("Losses:      none");
    } else {
        out.line("Losses:");
        for line in lost {
            out.line(format!("  {line}"));
        }
    }
    out.0
}

/// What the stores evicted, as a person on call reads it: bypasses first, since an evicted
/// bypass is an alarm no query will show.
fn store_evicted(e: &Evicted) -> String {
    let (bypass, flagged, recent) = (e.bypass, e.flagged, e.recent);
    if bypass + flagged + recent == 0 {
        return "none".to_string();
    }
    let mut out = format!("{recent} recent, {flagged} flagged, {bypass} bypasses");
    if bypass > 0 {
        out += " (bypasses aged out of the agent's store: raise --store-bypass, and rely on the metrics and alerts for the count)";
    }
    out
}

/// One loss counter of `/v1/status` as a person on call reads it: what was lost, what it costs
/// (a source this meshguard does not know, from a newer agent, in its own words).
fn loss_in_words(source: &str, n: u64) -> String {
    match source.parse::<LossSource>() {
        Ok(known) => known.in_words(n),
        Err(_) => format!("{n} {}", source.replace('_', " ")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{sync::Arc, time::SystemTime};

    use serde_json::Value;

    use super::*;
    use crate::{
        cli::display::has_unsafe,
        fingerprint::{Encryption, PlaintextProtocol, TlsInfo, TlsVersion},
        flow::record::{tests::record, Comm, Endpoint, PlaintextRecord, RedirectRecord, Timestamp},
        verdict::{Direction, Party},
    };

    #[test]
    fn evictions_in_words() {
        let cases = [
            (Evicted::default(), "none"),
            (
                Evicted {
                    recent: 0,
                    flagged: 0,
                    bypass: 0,
                },
                "none",
            ),
            (
                Evicted {
                    recent: 900,
                    flagged: 12,
                    bypass: 0,
                },
                "900 recent, 12 flagged, 0 bypasses",
            ),
            (
                Evicted {
                    recent: 900,
                    flagged: 0,
                    bypass: 3,
                },
                "900 recent, 0 flagged, 3 bypasses (bypasses aged out",
            ),
        ];
        for (v, want) in cases {
            assert!(
                store_evicted(&v).starts_with(want),
                "{v:?}: {}",
                store_evicted(&v)
            );
        }
    }

    #[test]
    fn table_rows() {
        let at = humantime::parse_rfc3339("2026-11-28T22:31:36.912Z").unwrap();
        let mut f = (*record(1, Verdict::BypassPlaintext, at)).clone();
        f.last_seen = Timestamp(at);
        f.reason = "excluded-port".into();
        f.direction = Direction::Ingress;
        f.encryption = Encryption::Plaintext;
        (f.bytes_sent, f.bytes_received) = (100, 50);
        f.local = Endpoint::new(
            "10.0.0.2:5000".parse().unwrap(),
            Party::Pod {
                namespace: "legacy",
                pod: "catalog-1",
                workload: "catalog",
                meshed: false,
            },
        );
        f.remote = Endpoint::new("10.0.0.1:40000".parse().unwrap(), Party::Node);
        let line = row(&f, Output::Table, false, false);
        assert!(
            line.starts_with("Nov 28 22:31:36.912 bypass-plaintext  excluded-port"),
            "{line}"
        );
        assert!(
            line.contains("node (10.0.0.1)"),
            "ingress: the source is the remote end: {line}"
        );
        assert!(line.contains("legacy/catalog-1:5000"), "{line}");
        assert!(
            line.contains(" server "),
            "the server's socket made it: {line}"
        );
        assert!(line.trim_end().ends_with("150"), "{line}");
        assert!(!line.contains('\x1b'), "no colour off a terminal");
        assert!(row(&f, Output::Table, true, false).contains("\x1b[1;31m"));
        assert!(row(&f, Output::Wide, false, false).contains(" - "));

        // Accepted by a sidecar's inbound capture: the port dialled is shown, the capture
        // port in -o wide.
        f.local.port = 15006;
        f.local.dialled = Some("10.0.0.2:5000".parse().unwrap());
        let line = row(&f, Output::Table, false, false);
        assert!(line.contains("legacy/catalog-1:5000 "), "{line}");
        assert!(!line.contains("15006"), "{line}");
        assert!(row(&f, Output::Wide, false, false).contains(" dialled 5000 "));
        // Its outbound capture: the address dialled was another pod's, not this socket's.
        f.local.dialled = Some("10.0.0.9:8080".parse().unwrap());
        let line = row(&f, Output::Wide, false, false);
        assert!(line.contains("legacy/catalog-1:15006 "), "{line}");
        assert!(line.contains(" dialled 10.0.0.9:8080 "), "{line}");

        // The client's socket, redirected into its sidecar.
        f.direction = Direction::Egress;
        f.local.dialled = None;
        f.redirect = Some(RedirectRecord {
            ip: "127.0.0.1".parse().unwrap(),
            port: 15001,
            ifindex: 1,
        });
        let line = row(&f, Output::Wide, false, false);
        assert!(line.contains(" client "), "{line}");
        assert!(line.contains("node (10.0.0.1):40000 "), "{line}");
        assert!(line.contains(" to 127.0.0.1:15001 "), "{line}");
    }

    /// What a pod can put in any name it controls to clear the screen and go back over a line.
    pub(crate) const POISON: &str = "\x1b[2J\r";

    /// `v` with [`POISON`] at the end of every string in it.
    pub(crate) fn poisoned(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(format!("{s}{POISON}")),
            Value::Array(a) => Value::Array(a.iter().map(poisoned).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), poisoned(v))).collect())
            }
            other => other.clone(),
        }
    }

    /// A record with [`POISON`] in every string the agent took from a pod or the wire.
    pub(crate) fn poisoned_record() -> FlowRecord {
        let p = |s: &str| format!("{s}{POISON}");
        let mut r = (*record(0xabc, Verdict::BypassPlaintext, SystemTime::now())).clone();
        r.node = p("node-1").into();
        for end in [&mut r.local, &mut r.remote] {
            end.namespace = Some(p("shop"));
            end.pod = Some(p("web-1"));
            end.workload = Some(p("web"));
        }
        r.process.comm = Some(Comm::new(&p("curl")));
        r.process.pid = Some(7);
        r.process.uid = Some(1000);
        r.owner.container = Some(p("0123abcd"));
        r.encryption = Encryption::Plaintext;
        r.tls = Some(TlsInfo {
            version: Some(TlsVersion(0x0304)),
            sni: Some(p("api.shop")),
            alpn: vec![p("h2"), p("http/1.1")],
            handshake: None,
            complete: true,
            then_tls: Some(false),
        });
        r.plaintext = Some(PlaintextRecord {
            protocol: PlaintextProtocol::Http1,
            method: Some("GET".into()),
            path: Some(p("/orders")),
        });
        r.redacted_sample = Some(p("GET /orders HTTP/1.x\nCookie: <redacted>"));
        r.detail = p("sent in plaintext");
        r
    }

    /// `r` as the agent serves it for `explain` (evidence lines included), with [`POISON`] in
    /// every other string too (the evidence lines, the reason, the method).
    pub(crate) fn poisoned_answer(r: &FlowRecord) -> Explanation {
        let Explanation { flow, mut evidence } = Explanation::of(Arc::new(r.clone()));
        for line in &mut evidence {
            line.push_str(POISON);
        }
        let mut flow = (*flow).clone();
        flow.reason = format!("{}{POISON}", flow.reason).into();
        if let Some(p) = &mut flow.plaintext {
            p.method = p.method.as_ref().map(|m| format!("{m}{POISON}").into());
        }
        Explanation {
            flow: Arc::new(flow),
            evidence,
        }
    }

    /// A `/v1/status` answer with [`POISON`] in every string, and a loss counter named by it.
    pub(crate) fn poisoned_status() -> Status {
        let mut s = serde_json::to_value(Status::default()).unwrap();
        s["programs_attached"] = serde_json::json!(["flow_lifecycle"]);
        s["degraded"] = serde_json::json!(["no BTF"]);
        s["events_lost"] = serde_json::json!({ POISON: 3, "ringbuf_full": 1 });
        s["enforcement"] = serde_json::json!([{"namespace": "shop", "mode": "audit",
            "source": "namespace", "pods": 1, "overrides": ["web-1=enforce"]}]);
        serde_json::from_value(poisoned(&s)).unwrap()
    }

    #[test]
    fn status_says_each_namespace_s_enforcement() {
        let mut s = Status {
            enforced_cgroups: 3,
            enforcement_on_exit: "refuse nothing (fail-open)".into(),
            ..Status::default()
        };
        let text = status_text(&s);
        assert!(
            text.contains("Enforcement: no pod with a sidecar on this node"),
            "{text}"
        );
        s.enforcement = vec![crate::api::types::NamespaceEnforcement {
            namespace: "shop".into(),
            mode: "enforce".into(),
            source: "namespace".into(),
            pods: 2,
            overrides: vec!["web-1=audit".into()],
        }];
        s.enforcement_error = Some("cgroup 12: no space".into());
        let text = status_text(&s);
        for needle in [
            "Enforcement: 3 container cgroups audited or enforced; by namespace (when the agent stops: refuse nothing (fail-open))",
            "  shop                     enforce  (namespace, 2 pods with a sidecar); pods of their own: web-1=audit",
            "  NOT ENFORCED AS PLANNED: cgroup 12: no space",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }

    #[test]
    fn no_control_character_reaches_the_terminal() {
        let answer = poisoned_answer(&poisoned_record());
        let flow = &answer.flow;
        for output in [Output::Table, Output::Wide] {
            for node_column in [false, true] {
                let line = row(flow, output, false, node_column);
                assert!(!has_unsafe(&line), "{output:?}: {line:?}");
                assert!(line.contains("web-1\\x1b[2J\\x0d"), "{line:?}");
            }
        }
        let wide = row(flow, Output::Wide, false, false);
        for shown in ["api.shop\\x1b", "h2\\x1b", "curl\\x1b"] {
            assert!(wide.contains(shown), "{shown} in {wide:?}");
        }
        let explained = explain_text("abc", &answer);
        let status = status_text(&poisoned_status());
        for (what, text) in [("explain", &explained), ("status", &status)] {
            for line in text.lines() {
                assert!(!has_unsafe(line), "{what}: {line:?}");
            }
            assert!(text.lines().count() > 5, "{what}: {text}");
        }
        for shown in [
            "ALPN h2\\x1b[2J\\x0d",
            "curl\\x1b",
            "container 0123abcd\\x1b",
        ] {
            assert!(explained.contains(shown), "{shown} in {explained}");
        }
        assert!(status.contains("3 \\x1b[2J\\x0d"), "{status}");

        // The payload line of a plaintext request, and of TLS.
        let mut plain = poisoned_record();
        plain.tls = None;
        let mut tls = poisoned_record();
        tls.encryption = Encryption::Tls;
        tls.plaintext = None;
        for (r, shown) in [(plain, "GET /orders\\x1b"), (tls, "SNI api.shop\\x1b")] {
            let text = explain_text("abc", &poisoned_answer(&r));
            assert!(text.lines().all(|l| !has_unsafe(l)), "{text:?}");
            assert!(text.contains(shown), "{shown} in {text}");
        }
    }
}
