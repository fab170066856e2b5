//! Which `DestinationRule` tells a client's sidecar how to reach a server pod, as Istio finds
//! it: a rule names a host, a host is a Service, a Service selects pods and maps its ports to
//! theirs. So the Services are read beside the rules (from the same documents, or the API
//! server), and a connection seen between two pods is traced back to the rule that governs its
//! client's side.
//!
//! Istio's lookup, kept here: the client's namespace first (a rule whose `workloadSelector`
//! selects the client before one without), then the Service's namespace, then the mesh's root
//! namespace; the first namespace holding a rule for the host decides, its most specific host
//! match winning (an exact name over a wildcard, a longer wildcard over a shorter), the oldest
//! of equals; `exportTo` hides a rule from namespaces it does not name. A port's own setting
//! (`portLevelSettings`, by the Service's port) overrides the rule's.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    pod::PodInfo,
    policy::{
        match_labels, selects, DestinationRule, MeshPolicy, Meta, PolicyError, PolicyKind,
        PolicyRef, TlsMode,
    },
};

/// The cluster's DNS domain, which a Service's fully qualified name ends with.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A Service: what a rule's `host` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub meta: Meta,
    /// `spec.selector`; empty: it selects no pod (its endpoints are managed by hand).
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target: TargetPort,
}

/// `targetPort`: the pod's port, by number or by a container port's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One end of a connection, as the inventory knows its pod.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub named_ports: &'a BTreeMap<String, u16>,
}

/// The TLS a rule tells a client's sidecar to use towards a server, and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub rule: PolicyRef,
    /// The Service's fully qualified name, and its port the rule was looked up for.
    pub host: String,
    pub port: u16,
}

impl<'a> Workload<'a> {
    pub fn of(pod: &'a PodInfo) -> Self {
        Self {
            namespace: &pod.namespace,
            labels: &pod.labels,
            named_ports: &pod.named_ports,
        }
    }
}

impl Service {
    pub fn parse(item: &Value) -> Result<Self, PolicyError> {
        const KIND: PolicyKind = PolicyKind::Service;
        let meta = Meta::parse(item, KIND)?;
        let error = |what: String| meta.error(KIND, what);
        let spec = &item["spec"];
        let selector =
            match_labels(&spec["selector"]).map_err(|w| error(format!("selector: {w}")))?;
        let mut ports = Vec::new();
        match &spec["ports"] {
            Value::Null => {}
            Value::Array(list) => {
                for (i, p) in list.iter().enumerate() {
                    let number = |v: &Value| {
                        v.as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|n| *n != 0)
                    };
                    let port = number(&p["port"]).ok_or_else(|| {
                        error(format!("ports[{i}].port {} is not a port", p["port"]))
                    })?;
                    let target = match &p["targetPort"] {
                        Value::Null => TargetPort::Number(port),
                        Value::String(name) if !name.is_empty() => TargetPort::Name(name.clone()),
                        v => TargetPort::Number(number(v).ok_or_else(|| {
                            error(format!("ports[{i}].targetPort {v} is not a port"))
                        })?),
                    };
                    ports.push(ServicePort { port, target });
                }
            }
            other => return Err(error(format!("ports {other} is not a list"))),
        }
        Ok(Self {
            meta,
            selector,
            ports,
        })
    }

    pub fn fqdn(&self) -> String {
        format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            self.meta.name, self.meta.namespace
        )
    }

    /// The Service's port that reaches `pod` on `pod_port`, if it selects that pod.
    fn port_to(&self, pod: &Workload, pod_port: u16) -> Option<u16> {
        if self.meta.namespace != pod.namespace
            || self.selector.is_empty()
            || !selects(&self.selector, pod.labels)
        {
            return None;
        }
        self.ports
            .iter()
            .find(|p| match &p.target {
                TargetPort::Number(n) => *n == pod_port,
                TargetPort::Name(name) => pod.named_ports.get(name) == Some(&pod_port),
            })
            .map(|p| p.port)
    }
}

impl DestinationRule {
    /// How closely the rule's host names `fqdn`: `None` not at all; an exact name outranks
    /// every wildcard, and a longer wildcard a shorter one. A short name is the rule's
    /// namespace's Service.
    fn host_match(&self, fqdn: &str) -> Option<usize> {
        let host = if self.host.contains('.') || self.host.starts_with('*') {
            self.host.clone()
        } else {
            format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.host, self.meta.namespace)
        };
        if host == fqdn {
            return Some(usize::MAX);
        }
        let suffix = host.strip_prefix('*')?;
        fqdn.ends_with(suffix).then_some(suffix.len())
    }

    /// Whether `exportTo` lets a client in `namespace` see the rule.
    fn visible_in(&self, namespace: &str) -> bool {
        self.export_to.is_empty()
            || self.export_to.iter().any(|to| {
                to == "*" || to == namespace || (to == "." && self.meta.namespace == namespace)
            })
    }
}

impl MeshPolicy {
    /// The TLS that a DestinationRule sets for `client`'s sidecar towards `server`'s `port`
    /// (the pod's port), if one does; `None` where no rule sets a TLS mode (Istio's automatic
    /// mTLS decides). Where several Services reach that port, one whose rule turns TLS off is
    /// named first: that is the rule that can explain plaintext.
    pub fn client_tls(
        &self,
        root: &str,
        client: &Workload,
        server: &Workload,
        port: u16,
    ) -> Option<ClientTls> {
        let mut found: Vec<ClientTls> = self
            .services
            .iter()
            .filter_map(|service| {
                let service_port = service.port_to(server, port)?;
                let host = service.fqdn();
                let rule = self.rule_for(root, client, &service.meta.namespace, &host)?;
                let mode = rule.ports.get(&service_port).copied().or(rule.tls)?;
                Some(ClientTls {
                    mode,
                    rule: rule.meta.reference(PolicyKind::DestinationRule),
                    host,
                    port: service_port,
                })
            })
            .collect();
        found.sort_by_key(|t| (t.mode != TlsMode::Disable, t.host.clone()));
        found.into_iter().next()
    }

    /// The rule a client's sidecar applies to `host`, a Service in `service_namespace`.
    fn rule_for(
        &self,
        root: &str,
        client: &Workload,
        service_namespace: &str,
        host: &str,
    ) -> Option<&DestinationRule> {
        let mut order = vec![client.namespace, service_namespace, root];
        order.dedup();
        order.into_iter().find_map(|namespace| {
            self.destination_rules
                .iter()
                .filter(|r| r.meta.namespace == namespace && r.visible_in(client.namespace))
                // A workload selector only selects clients in the rule's own namespace.
                .filter(|r| {
                    r.workload_selector.is_empty()
                        || (namespace == client.namespace
                            && selects(&r.workload_selector, client.labels))
                })
                .filter_map(|r| Some((r, r.host_match(host)?)))
                .reduce(|a, b| {
                    let rank =
                        |(r, m): &(&DestinationRule, usize)| (!r.workload_selector.is_empty(), *m);
                    if rank(&b) > rank(&a)
                        || (rank(&b) == rank(&a) && b.0.meta.older_than(&a.0.meta))
                    {
                        b
                    } else {
                        a
                    }
                })
                .map(|(r, _)| r)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::inventory::policy::tests::{labels, policy, T0, T1};

    /// A Service as the API server returns it.
    fn service(namespace: &str, name: &str, selector: Value, ports: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "resourceVersion": "811",
                "uid": "5d8e0c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"
            },
            "spec": {
                "clusterIP": "10.96.14.2",
                "clusterIPs": ["10.96.14.2"],
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": ports,
                "selector": selector,
                "sessionAffinity": "None",
                "type": "ClusterIP"
            },
            "status": { "loadBalancer": {} }
        })
    }

    /// A DestinationRule as the API server returns it.
    fn rule(namespace: &str, name: &str, created: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": created,
                "generation": 1,
                "resourceVersion": "977",
                "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
            },
            "spec": spec
        })
    }

    /// One row a case: the rules beside the Services, a client, the server pod's port, and
    /// the mode and rule that govern the client's side (or none).
    #[test]
    fn the_rule_a_client_s_sidecar_applies() {
        let services = [
            service(
                "shop",
                "ratings",
                json!({"app": "ratings"}),
                json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                       {"name": "grpc", "port": 7070, "protocol": "TCP"}]),
            ),
            // Selects nothing: its endpoints are written by hand.
            service("shop", "manual", json!(null), json!([{"port": 9080}])),
        ];
        let disable = json!({"mode": "DISABLE"});
        let short = rule(
            "shop",
            "ratings",
            T0,
            json!({"host": "ratings", "trafficPolicy": {"tls": disable}}),
        );
        let fqdn_mutual_newer = rule(
            "shop",
            "ratings-newer",
            T1,
            json!({"host": "ratings.shop.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        );
        let wildcard = rule(
            "shop",
            "all",
            T0,
            json!({"host": "*.shop.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        );
        let by_port = rule(
            "shop",
            "ratings-ports",
            T0,
            json!({"host": "ratings", "trafficPolicy": {"portLevelSettings": [
                {"port": {"number": 7070}, "tls": disable}]}}),
        );
        let no_tls = rule(
            "shop",
            "ratings-lb",
            T0,
            json!({"host": "ratings", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}),
        );
        let in_client_ns = rule(
            "legacy",
            "ratings-from-legacy",
            T0,
            json!({"host": "ratings.shop.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}),
        );
        let mesh_wide = rule(
            "istio-system",
            "default",
            T0,
            json!({"host": "*.cluster.local", "trafficPolicy": {"tls": disable}}),
        );
        let private = rule(
            "shop",
            "ratings-private",
            T0,
            json!({"host": "ratings", "exportTo": ["."], "trafficPolicy": {"tls": disable}}),
        );
        let for_web = rule(
            "shop",
            "ratings-for-web",
            T1,
            json!({"host": "ratings", "workloadSelector": {"matchLabels": {"app": "web"}},
                   "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        );

        let web = labels(&[("app", "web")]);
        let other = labels(&[("app", "batch")]);
        let ratings = labels(&[("app", "ratings")]);
        let named = [("http".to_string(), 9080)].into();
        let none = BTreeMap::new();
        let server = Workload {
            namespace: "shop",
            labels: &ratings,
            named_ports: &named,
        };
        type Row<'a> = (
            &'a str,
            Vec<&'a Value>,
            (&'a str, &'a BTreeMap<String, String>),
            u16,
            Option<(&'a str, &'a str)>,
        );
        let rows: Vec<Row> = vec![
            ("no rule", vec![], ("shop", &web), 9080, None),
            (
                "a short name: the rule's namespace",
                vec![&short],
                ("shop", &web),
                9080,
                Some(("DISABLE", "ratings")),
            ),
            (
                "a named target port resolved",
                vec![&short],
                ("shop", &other),
                9080,
                Some(("DISABLE", "ratings")),
            ),
            (
                "a pod port no Service reaches",
                vec![&short],
                ("shop", &web),
                9999,
                None,
            ),
            (
                "targetPort absent: the port itself",
                vec![&by_port],
                ("shop", &web),
                7070,
                Some(("DISABLE", "ratings-ports")),
            ),
            (
                "a port setting for another port",
                vec![&by_port],
                ("shop", &web),
                9080,
                None,
            ),
            (
                "a rule that sets no TLS: automatic mTLS",
                vec![&no_tls],
                ("shop", &web),
                9080,
                None,
            ),
            (
                "of two for one host, the oldest",
                vec![&fqdn_mutual_newer, &short],
                ("shop", &web),
                9080,
                Some(("DISABLE", "ratings")),
            ),
            (
                "an exact host over a wildcard",
                vec![&wildcard, &fqdn_mutual_newer],
                ("shop", &web),
                9080,
                Some(("ISTIO_MUTUAL", "ratings-newer")),
            ),
            (
                "a wildcard alone",
                vec![&wildcard],
                ("shop", &web),
                9080,
                Some(("ISTIO_MUTUAL", "all")),
            ),
            (
                "the client's namespace first",
                vec![&short, &in_client_ns],
                ("legacy", &other),
                9080,
                Some(("SIMPLE", "ratings-from-legacy")),
            ),
            (
                "the Service's namespace next",
                vec![&short, &mesh_wide],
                ("legacy", &other),
                9080,
                Some(("DISABLE", "ratings")),
            ),
            (
                "the root namespace last",
                vec![&mesh_wide],
                ("legacy", &other),
                9080,
                Some(("DISABLE", "default")),
            ),
            (
                "exportTo '.' hides it from other namespaces",
                vec![&private],
                ("legacy", &other),
                9080,
                None,
            ),
            (
                "exportTo '.' within its namespace",
                vec![&private],
                ("shop", &web),
                9080,
                Some(("DISABLE", "ratings-private")),
            ),
            (
                "a selector that selects the client wins",
                vec![&short, &for_web],
                ("shop", &web),
                9080,
                Some(("ISTIO_MUTUAL", "ratings-for-web")),
            ),
            (
                "a selector that does not",
                vec![&short, &for_web],
                ("shop", &other),
                9080,
                Some(("DISABLE", "ratings")),
            ),
            (
                "a selector seen from another namespace",
                vec![&for_web],
                ("legacy", &web),
                9080,
                None,
            ),
        ];
        for (what, rules, (namespace, client_labels), port, want) in rows {
            let mut items: Vec<Value> = services.to_vec();
            items.extend(rules.into_iter().cloned());
            let client = Workload {
                namespace,
                labels: client_labels,
                named_ports: &none,
            };
            let got = policy(&items).client_tls("istio-system", &client, &server, port);
            let got = got
                .as_ref()
                .map(|t| (t.mode.as_str(), t.rule.name.as_str()));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_rule_that_turns_tls_off_is_named_first() {
        let svc = |name| {
            service(
                "shop",
                name,
                json!({"app": "ratings"}),
                json!([{"port": 9080}]),
            )
        };
        let mutual = rule(
            "shop",
            "a-mutual",
            T0,
            json!({"host": "a", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        );
        let off = rule(
            "shop",
            "b-off",
            T0,
            json!({"host": "b", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
        );
        let p = policy(&[svc("a"), svc("b"), mutual, off]);
        let (ratings, client) = (labels(&[("app", "ratings")]), BTreeMap::new());
        let no_ports = BTreeMap::new();
        let at = |labels| Workload {
            namespace: "shop",
            labels,
            named_ports: &no_ports,
        };
        let got = p
            .client_tls("istio-system", &at(&client), &at(&ratings), 9080)
            .unwrap();
        assert_eq!(
            (got.mode, got.rule.name.as_str(), got.host.as_str()),
            (TlsMode::Disable, "b-off", "b.shop.svc.cluster.local")
        );
    }

    #[test]
    fn malformed_services_are_named() {
        let cases = [
            (json!([{"port": 0}]), "ports[0].port 0 is not a port"),
            (
                json!([{"port": 80, "targetPort": 70000}]),
                "ports[0].targetPort 70000 is not a port",
            ),
            (
                json!([{"port": 80, "targetPort": true}]),
                "ports[0].targetPort true is not a port",
            ),
            (json!({"port": 80}), "is not a list"),
        ];
        for (ports, want) in cases {
            let e =
                Service::parse(&service("shop", "bad", json!({"app": "x"}), ports)).unwrap_err();
            assert_eq!(e.object, "shop/bad");
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = Service::parse(&service("shop", "bad", json!({"app": 1}), json!([]))).unwrap_err();
        assert!(
            e.to_string().starts_with("Service shop/bad: selector:"),
            "{e}"
        );
    }
}
