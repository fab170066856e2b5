//! The agent as Prometheus and the kubelet meet it: `/metrics`, `/healthz`, `/readyz`, and a
//! real Prometheus server scraping the agent while the testbed's scenarios run.

use std::{
    collections::BTreeSet,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use meshguard_tests::{
    privileged, run,
    testbed::{scenarios, Node},
    Agent, Cgroup, TempDir,
};
use serde_json::Value;

fn get(url: &str) -> (u16, String) {
    let out =
        run(Command::new("curl").args(["-s", "-m", "5", "-w", "\n%{http_code}", url])).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn health_and_metrics_endpoints() {
    if !privileged() {
        return;
    }
    let cgroup = Cgroup::new("metrics-endpoints").unwrap();
    let agent = Agent::start(&cgroup, &[]).unwrap();
    let addr = agent
        .metrics_addr()
        .expect("the agent logs where it serves metrics");
    assert_eq!(get(&format!("http://{addr}/healthz")).0, 200);
    assert_eq!(
        get(&format!("http://{addr}/readyz")),
        (200, "attached\n".to_string())
    );
    let (code, text) = get(&format!("http://{addr}/metrics"));
    assert_eq!(code, 200);
    for line in [
        "meshguard_programs_attached 5",
        "meshguard_degraded 0",
        "meshguard_map_capacity{map=\"flows\"} 131072",
        "meshguard_events_lost_total{source=\"ringbuf_full\"} 0",
        "meshguard_build_info{version=",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert_eq!(get(&format!("http://{addr}/nope")).0, 404);
}

/// Prometheus's answer to an instant query, as (labels, value) rows.
fn query(prometheus: &str, promql: &str) -> Vec<(Value, f64)> {
    try_query(prometheus, promql).unwrap()
}

/// `None` while Prometheus does not answer yet.
fn try_query(prometheus: &str, promql: &str) -> Option<Vec<(Value, f64)>> {
    let url = format!("http://{prometheus}/api/v1/query");
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-G", &url, "--data-urlencode"])
        .arg(format!("query={promql}"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    assert_eq!(v["status"], "success", "{v}");
    let rows = v["data"]["result"].as_array().unwrap().iter();
    Some(
        rows.map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect(),
    )
}

#[test]
fn prometheus_sees_the_bypasses_by_workload_pair() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("prometheus").unwrap();
    let cgroup = Cgroup::new("metrics-prometheus").unwrap();
    let node = Node::up("mgprom", [245, 8], scenarios::pods()).unwrap();
    let inventory = format!("file:{}", node.dir.join("pods.json").display());
    let agent = Agent::start(&cgroup, &["--inventory", &inventory]).unwrap();
    let target = agent.metrics_addr().unwrap();

    // A real Prometheus, scraping the agent every second, on a loopback port of its own.
    let listen = "127.0.0.1:19464";
    std::fs::write(
        dir.path.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: meshguard\n  static_configs:\n  - targets: ['{target}']\n"),
    )
    .unwrap();
    let _prometheus = cgroup
        .start(
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path.join("data").display()
                ))
                .arg(format!("--web.listen-address={listen}")),
        )
        .unwrap();
    let up = || {
        try_query(listen, "up{job=\"meshguard\"}")
            .is_some_and(|rows| rows.first().is_some_and(|(_, v)| *v == 1.0))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !up() {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the agent"
        );
        thread::sleep(Duration::from_millis(250));
    }
    let bypasses =
        "sum by (src_workload, dst_workload) (meshguard_flows_total{verdict=\"bypass-plaintext\"})";
    assert!(
        query(listen, bypasses).is_empty(),
        "no bypass before the scenarios run"
    );

    for scenario in scenarios::all() {
        scenario.run(&node).unwrap();
    }
    // Every bypass-plaintext end the scenarios state, as a (source, destination) workload pair.
    let mut want = BTreeSet::new();
    for s in scenarios::all() {
        if s.expect.iter().any(|e| e.verdict == "bypass-plaintext") {
            let client = match s.client {
                scenarios::Party::Pod(name) => name.to_string(),
                _ => "node".to_string(),
            };
            want.insert((client, s.server.to_string()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: BTreeSet<(String, String)> = query(listen, bypasses)
            .into_iter()
            .map(|(m, _)| {
                (
                    m["src_workload"].as_str().unwrap().to_string(),
                    m["dst_workload"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus sees {got:?}, the scenarios' bypasses are {want:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}
