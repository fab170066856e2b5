//! The verbs for people: `meshguard flows`, `explain`, `status`. Tables for people (colour only
//! on a terminal), JSON for scripts, in the habits of `hubble observe` and `kubectl`.

use std::{
    fmt::Write as _,
    io::{IsTerminal, Write},
};

use http_body_util::BodyExt as _;
use serde_json::Value;

use crate::{
    client::{Client, ClientError},
    display::{printable, printable_json},
    store::{parse_verdict, MAX_LIMIT},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Jsonl,
}

/// Why a verb failed, and so its exit code: 2 for bad usage, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Anything else that stopped the verb (the API server unreachable, no agent answering).
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The stderr line for a verb that failed.
pub fn error_line(e: &CliError) -> String {
    // It may quote the agent's error text, or a name from the cluster.
    format!("error: {}", printable(&e.to_string()))
}

/// The stderr line for an agent's warning to a follower.
fn warning_line(warning: &str) -> String {
    format!("warning: {}", printable(warning))
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            // The agent rejecting a query is bad usage too: its message says how to fix it.
            CliError::Agent(ClientError::Api { status, .. }) if status.as_u16() == 400 => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    pub verdicts: Vec<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    pub port: Option<u16>,
    pub since: Option<String>,
    pub last: Option<usize>,
}

impl FlowQuery {
    /// The API query string, after checking what can be checked here.
    pub fn to_query(&self) -> Result<String, CliError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        for v in &self.verdicts {
            parse_verdict(v).map_err(|e| CliError::Usage(format!("--verdict: {e}")))?;
        }
        if !self.verdicts.is_empty() {
            q.push(("verdict", self.verdicts.join(",")));
        }
        if let Some(since) = &self.since {
            humantime::parse_duration(since).map_err(|_| {
                CliError::Usage(format!(
                    "--since {since:?}: give a duration like 30s, 10m or 2h"
                ))
            })?;
            q.push(("since", since.clone()));
        }
        if let Some(n) = self.last {
            if n == 0 || n > MAX_LIMIT {
                return Err(CliError::Usage(format!(
                    "--last {n}: give a number from 1 to {MAX_LIMIT}"
                )));
            }
            q.push(("limit", n.to_string()));
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
        serde_urlencoded::to_string(&q).map_err(|e| CliError::Usage(e.to_string()))
    }
}

pub async fn flows(
    client: &Client,
    query: &FlowQuery,
    output: Output,
    follow: bool,
) -> Result<(), CliError> {
    let qs = query.to_query()?;
    let color = color();
    let mut out = std::io::stdout().lock();
    // Following without --last starts from now, like `hubble observe -f`.
    if !follow || query.last.is_some() {
        let body = client.get_json(&format!("/v1/flows?{qs}")).await?;
        let mut flows: Vec<Value> = body["flows"].as_array().cloned().unwrap_or_default();
        flows.reverse(); // oldest first, newest at the bottom, as a log reads
        match output {
            Output::Json if !follow => writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&flows).unwrap_or_default()
            )?,
            Output::Json | Output::Jsonl => {
                for f in &flows {
                    writeln!(out, "{f}")?;
                }
            }
            Output::Table | Output::Wide => {
                writeln!(out, "{}", header(output, false))?;
                for f in &flows {
                    writeln!(out, "{}", row(f, output, color, false))?;
                }
            }
        }
        out.flush()?;
    }
    if !follow {
        return Ok(());
    }
    if matches!(output, Output::Table | Output::Wide) && query.last.is_none() {
        writeln!(out, "{}", header(output, false))?;
        out.flush()?;
    }
    let mut body = client
        .send(&format!("/v1/flows/stream?{qs}"))
        .await?
        .into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Unreachable {
            addr: client.addr.to_string(),
            reason: e.to_string(),
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(w) = v["warning"].as_str() {
                eprintln!("{}", warning_line(w));
                continue;
            }
            match output {
                Output::Json | Output::Jsonl => writeln!(out, "{v}")?,
                Output::Table | Output::Wide => writeln!(out, "{}", row(&v, output, color, false))?,
            }
            out.flush()?;
        }
    }
    Ok(())
}

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
        "{:<17} {:<19} {:<40} {:<46} {:<10} {:>9}",
        "VERDICT", "REASON", "SOURCE", "DESTINATION", "ENCRYPTION", "BYTES"
    );
    if output == Output::Wide {
        let _ = write!(h, " {:<16} ", "ID");
        if !node_column {
            let _ = write!(h, "{:<16} ", "NODE");
        }
        let _ = write!(h, "{:<8} {:<24} TLS", "PATH", "PROCESS");
    }
    h
}

/// How a person names one end of a flow.
fn who(e: &Value) -> String {
    match (e["namespace"].as_str(), e["pod"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ if e["node"] == true => format!("node ({})", e["ip"].as_str().unwrap_or("?")),
        _ => e["ip"].as_str().unwrap_or("?").to_string(),
    }
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

fn paint(verdict: &str, color: bool) -> String {
    let text = format!("{verdict:<17}");
    if !color {
        return text;
    }
    let code = match verdict {
        "bypass-plaintext" | "bypass-tls" => "1;31",
        "plaintext" => "33",
        "mtls" => "32",
        "pending" => "2",
        _ => return text,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// One flow as a table row, in the columns of [`header`].
pub(crate) fn row(f: &Value, output: Output, color: bool, node_column: bool) -> String {
    let f = &printable_json(f);
    let (src, dst) = if f["direction"] == "egress" {
        (&f["local"], &f["remote"])
    } else {
        (&f["remote"], &f["local"])
    };
    let bytes = f["bytes_sent"].as_u64().unwrap_or(0) + f["bytes_received"].as_u64().unwrap_or(0);
    let node = f["node"].as_str().unwrap_or("?");
    let mut line = format!("{:<19} ", short_time(f["last_seen"].as_str().unwrap_or("")));
    if node_column {
        let _ = write!(line, "{node:<16} ");
    }
    let _ = write!(
        line,
        "{} {:<19} {:<40} {:<46} {:<10} {:>9}",
        paint(f["verdict"].as_str().unwrap_or("?"), color),
        f["reason"].as_str().unwrap_or("?"),
        who(src),
        format!("{}:{}", who(dst), dst["port"]),
        f["encryption"].as_str().unwrap_or("?"),
        bytes,
    );
    if output == Output::Wide {
        let process = match (f["process"]["comm"].as_str(), f["process"]["uid"].as_u64()) {
            (Some(c), Some(u)) => format!("{c} uid={u}"),
            (None, Some(u)) => format!("uid={u}"),
            _ => "-".into(),
        };
        let tls = match f["tls"].as_object() {
            Some(t) => format!(
                "{} {} {}",
                t.get("version").and_then(Value::as_str).unwrap_or("-"),
                t.get("sni").and_then(Value::as_str).unwrap_or("-"),
                t.get("alpn")
                    .and_then(Value::as_array)
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            ),
            None => "-".into(),
        };
        let _ = write!(line, " {:<16} ", f["id"].as_str().unwrap_or("?"));
        if !node_column {
            let _ = write!(line, "{node:<16} ");
        }
        let _ = write!(
            line,
            "{:<8} {:<24} {tls}",
            f["path"].as_str().unwrap_or("?"),
            process
        );
    }
    line
}

pub async fn explain(client: &Client, id: &str) -> Result<(), CliError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CliError::Usage(format!(
            "{id:?} is not a flow id: ids are hexadecimal, as `meshguard flows -o wide` shows them"
        )));
    }
    let v = client.get_json(&format!("/v1/flows/{id}")).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(explain_text(id, &v).as_bytes())?;
    Ok(())
}

/// What `meshguard explain` prints of the agent's `/v1/flows/{id}` answer.
pub(crate) fn explain_text(id: &str, v: &Value) -> String {
    let v = &printable_json(v);
    let f = &v["flow"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Flow {id} on node {}",
        f["node"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "  first seen {}, last seen {}, {}",
        f["first_seen"].as_str().unwrap_or("?"),
        f["last_seen"].as_str().unwrap_or("?"),
        f["state"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "Evidence:");
    for line in v["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let _ = writeln!(out, "  {line}");
    }
    out
}

pub async fn status(client: &Client, output: Output) -> Result<(), CliError> {
    let s = client.get_json("/v1/status").await?;
    let mut out = std::io::stdout().lock();
    if matches!(output, Output::Json | Output::Jsonl) {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&s).unwrap_or_default()
        )?;
        return Ok(());
    }
    out.write_all(status_text(&s).as_bytes())?;
    Ok(())
}

/// What `meshguard status` prints of the agent's `/v1/status` answer.
pub(crate) fn status_text(s: &Value) -> String {
    let s = &printable_json(s);
    let mut out = String::new();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let degraded = list(&s["degraded"]);
    let _ = writeln!(
        out,
        "Node:        {} (kernel {})",
        s["node"].as_str().unwrap_or("?"),
        s["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "Agent:       meshguard {}, up since {}",
        s["version"].as_str().unwrap_or("?"),
        s["started_at"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "Health:      {}",
        if degraded.is_empty() {
            "ok".to_string()
        } else {
            format!("DEGRADED: {degraded}")
        }
    );
    let _ = writeln!(out, "Programs:    {}", list(&s["programs_attached"]));
    let inv = &s["inventory"];
    let age = inv["age_seconds"]
        .as_u64()
        .map_or("never loaded".to_string(), |a| format!("updated {a}s ago"));
    let _ = writeln!(
        out,
        "Inventory:   {} pods from {}, {age}",
        inv["pods"],
        inv["source"].as_str().unwrap_or("?")
    );
    let containers = s["container_cgroups"].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "Owners:      {}",
        if containers > 0 {
            format!("{containers} container cgroups found: each socket is traced to its container")
        } else {
            "no container cgroups found (--cgroup-root): the proxy is recognised by uid and process name only".to_string()
        }
    );
    let capacity = s["flow_map"]["capacity"].as_u64().unwrap_or(0);
    let entries = s["flow_map"]["entries"].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "Flow map:    {entries} of {capacity} entries ({:.1}% full)",
        100.0 * entries as f64 / capacity.max(1) as f64
    );
    let _ = writeln!(
        out,
        "Flows:       {} tracked, {} stored (apart: {} bypasses, {} other flagged)",
        s["flows_tracked"],
        s["flows_stored"],
        s["bypass_stored"].as_u64().unwrap_or(0),
        s["flagged_stored"]
    );
    let _ = writeln!(out, "Evicted:     {}", store_evicted(&s["store_evicted"]));
    let _ = writeln!(
        out,
        "Kernel side: {}",
        if s["adopted"] == true {
            "adopted from an earlier agent (pinned programs kept counting meanwhile)"
        } else {
            "attached by this agent"
        }
    );
    let recovered = s["flows_recovered"].as_u64().unwrap_or(0);
    if recovered > 0 {
        let _ = writeln!(
            out,
            "Recovered:   {recovered} flows reported from the kernel's flow map after their events were lost"
        );
    }
    let lost: Vec<String> = s["events_lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, n)| Some(loss_in_words(k, n.as_u64().filter(|&n| n > 0)?)))
        .collect();
    if lost.is_empty() {
        let _ = writeln!(out, "Losses:      none");
    } else {
        let _ = writeln!(out, "Losses:");
        for line in lost {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// What the stores evicted, as a person on call reads it: bypasses first, since an evicted
/// bypass is an alarm no query will show.
fn store_evicted(v: &Value) -> String {
    let n = |store: &str| v[store].as_u64().unwrap_or(0);
    let (bypass, flagged, recent) = (n("bypass"), n("flagged"), n("recent"));
    if bypass + flagged + recent == 0 {
        return "none".to_string();
    }
    let mut out = format!("{recent} recent, {flagged} flagged, {bypass} bypasses");
    if bypass > 0 {
        out += " (bypasses aged out of the agent's store: raise --store-bypass, and rely on the metrics and alerts for the count)";
    }
    out
}

/// One loss counter of `/v1/status` as a person on call reads it: what was lost, what it costs.
fn loss_in_words(source: &str, n: u64) -> String {
    match source {
        "ringbuf_full" => format!(
            "{n} kernel events dropped by a full ring buffer (their flows are recovered from the flow map; raise --ringbuf-bytes if this grows)"
        ),
        "flow_map_full" => format!("{n} flows not tracked: the kernel's flow map refused them"),
        "flow_evicted" => format!(
            "{n} flows evicted from the kernel's flow map while open: their byte counts stop early (raise --flow-map-size)"
        ),
        "flow_evicted_unseen" => format!(
            "{n} flows evicted before the agent saw them: only their addresses are known, no verdict"
        ),
        "undecodable" => format!(
            "{n} kernel events unreadable (an agent and programs of different versions?)"
        ),
        "agent_table_evicted" => format!(
            "{n} open flows dropped from the agent's table to make room (raise --max-flows)"
        ),
        other => format!("{n} {}", other.replace('_', " ")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::display::has_unsafe;

    #[test]
    fn queries() {
        let q = FlowQuery {
            verdicts: vec!["bypass-plaintext".into(), "plaintext".into()],
            namespace: Some("shop".into()),
            since: Some("10m".into()),
            last: Some(20),
            ..FlowQuery::default()
        };
        assert_eq!(
            q.to_query().unwrap(),
            "verdict=bypass-plaintext%2Cplaintext&since=10m&limit=20&namespace=shop"
        );
        let bad = [
            (
                FlowQuery {
                    verdicts: vec!["bypass".into()],
                    ..FlowQuery::default()
                },
                "--verdict: unknown verdict \"bypass\"",
            ),
            (
                FlowQuery {
                    since: Some("soon".into()),
                    ..FlowQuery::default()
                },
                "--since \"soon\": give a duration",
            ),
            (
                FlowQuery {
                    last: Some(0),
                    ..FlowQuery::default()
                },
                "--last 0: give a number from 1",
            ),
        ];
        for (q, want) in bad {
            let e = q.to_query().unwrap_err();
            assert!(e.to_string().starts_with(want), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn evictions_in_words() {
        let cases = [
            (serde_json::json!({}), "none"),
            (
                serde_json::json!({"recent": 0, "flagged": 0, "bypass": 0}),
                "none",
            ),
            (
                serde_json::json!({"recent": 900, "flagged": 12, "bypass": 0}),
                "900 recent, 12 flagged, 0 bypasses",
            ),
            (
                serde_json::json!({"recent": 900, "flagged": 0, "bypass": 3}),
                "900 recent, 0 flagged, 3 bypasses (bypasses aged out",
            ),
        ];
        for (v, want) in cases {
            assert!(
                store_evicted(&v).starts_with(want),
                "{v}: {}",
                store_evicted(&v)
            );
        }
    }

    #[test]
    fn table_rows() {
        let f: Value = serde_json::json!({
            "last_seen": "2026-11-28T22:31:36.912Z", "verdict": "bypass-plaintext", "reason": "excluded-port",
            "direction": "ingress", "encryption": "plaintext", "bytes_sent": 100, "bytes_received": 50,
            "local": {"ip": "10.0.0.2", "port": 5000, "namespace": "legacy", "pod": "catalog-1", "node": false},
            "remote": {"ip": "10.0.0.1", "port": 40000, "namespace": null, "pod": null, "node": true},
        });
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
        assert!(line.trim_end().ends_with("150"), "{line}");
        assert!(!line.contains('\x1b'), "no colour off a terminal");
        assert!(row(&f, Output::Table, true, false).contains("\x1b[1;31m"));
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
    pub(crate) fn poisoned_record() -> crate::flow::FlowRecord {
        use crate::{
            fingerprint::{TlsInfo, TlsVersion},
            flow::{Comm, PlaintextRecord},
            verdict::{Encryption, Verdict},
        };
        let p = |s: &str| format!("{s}{POISON}");
        let mut r = (*crate::store::tests::record(
            0xabc,
            Verdict::BypassPlaintext,
            std::time::SystemTime::now(),
        ))
        .clone();
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
            protocol: "http/1",
            method: Some("GET"),
            path: Some(p("/orders")),
        });
        r.redacted_sample = Some(p("GET /orders HTTP/1.x\nCookie: <redacted>"));
        r.detail = p("sent in plaintext");
        r
    }

    /// `r` as the agent serves it for `explain` (evidence lines included), with [`POISON`] in
    /// every other string too.
    pub(crate) fn poisoned_answer(r: &crate::flow::FlowRecord) -> Value {
        poisoned(&serde_json::json!({ "flow": r, "evidence": crate::api::evidence(r) }))
    }

    /// A `/v1/status` answer with [`POISON`] in every string, and a loss counter named by it.
    pub(crate) fn poisoned_status() -> Value {
        let mut s = serde_json::to_value(crate::state::Status::default()).unwrap();
        s["programs_attached"] = serde_json::json!(["flow_lifecycle"]);
        s["degraded"] = serde_json::json!(["no BTF"]);
        s["events_lost"] = serde_json::json!({ POISON: 3, "ringbuf_full": 1 });
        poisoned(&s)
    }

    #[test]
    fn no_control_character_reaches_the_terminal() {
        let answer = poisoned_answer(&poisoned_record());
        let flow = &answer["flow"];
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
        tls.encryption = crate::verdict::Encryption::Tls;
        tls.plaintext = None;
        for (r, shown) in [(plain, "GET /orders\\x1b"), (tls, "SNI api.shop\\x1b")] {
            let text = explain_text("abc", &poisoned_answer(&r));
            assert!(text.lines().all(|l| !has_unsafe(l)), "{text:?}");
            assert!(text.contains(shown), "{shown} in {text}");
        }
    }

    #[test]
    fn agent_errors_are_shown_escaped() {
        let e = CliError::Agent(ClientError::Api {
            addr: "http://node-1:9465".into(),
            status: hyper::StatusCode::NOT_FOUND,
            message: format!("no flow with id \"x{POISON}\""),
        });
        let line = error_line(&e);
        assert!(!has_unsafe(&line), "{line:?}");
        assert!(line.starts_with("error: the agent at http://node-1:9465 answered 404"));
        assert!(!has_unsafe(&warning_line(POISON)));
    }
}
