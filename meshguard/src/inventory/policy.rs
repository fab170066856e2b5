//! The mesh's declared intent, as Istio (and OpenShift Service Mesh) objects state it:
//! `PeerAuthentication`, what a workload's sidecar accepts, and `DestinationRule`, what its
//! clients' sidecars send. Read from the same `kubectl get ... -o json` documents (or API server
//! objects) as the pods, and composed for one workload and port the way Istio composes them, so
//! that what was declared can be held against what the kernel saw.
//!
//! Parsing is strict about what decides a mode (an unknown mode or port is an error naming the
//! object, never a guess) and lenient about the rest.

use std::{collections::BTreeMap, fmt, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::destination::Service;
use crate::wire::wire_enum;
use serde_json::Value;

/// Istio's default root namespace, where a policy without a selector is mesh-wide (the
/// verdict policy's `mesh_root_namespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

wire_enum! {
    /// The kinds of mesh policy objects meshguard reads, and the Services a rule's host
    /// names.
    pub enum PolicyKind ("policy kind") {
        PeerAuthentication = "PeerAuthentication",
        DestinationRule = "DestinationRule",
        Service = "Service",
    }
}

wire_enum! {
    /// `PeerAuthentication` mTLS modes. `Unset` inherits from the policy above.
    pub enum MtlsMode ("mTLS mode") {
        Unset = "UNSET",
        Disable = "DISABLE",
        Permissive = "PERMISSIVE",
        Strict = "STRICT",
    }
}

wire_enum! {
    /// `DestinationRule` client TLS modes.
    pub enum TlsMode ("TLS mode") {
        Disable = "DISABLE",
        Simple = "SIMPLE",
        Mutual = "MUTUAL",
        IstioMutual = "ISTIO_MUTUAL",
    }
}

/// Which object governs a decision: what a record names and `explain` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// A policy object that could not be read, named, with what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{} {object}: {what}", kind.as_str())]
pub struct PolicyError {
    pub kind: PolicyKind,
    /// `namespace/name`, or the item's position when it has no name.
    pub object: String,
    pub what: String,
}

/// What every policy object has: where it is, and when it was made (Istio lets the oldest of
/// two conflicting policies win).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`; `None` sorts after every known time.
    pub created: Option<SystemTime>,
}

impl Meta {
    pub(super) fn parse(item: &Value, kind: PolicyKind) -> Result<Self, PolicyError> {
        let meta = &item["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("default");
        let error = |object: String, what: String| PolicyError { kind, object, what };
        let Some(name) = meta["name"].as_str().filter(|n| !n.is_empty()) else {
            return Err(error(
                format!("{namespace}/<no name>"),
                "metadata.name is missing".into(),
            ));
        };
        let created = match &meta["creationTimestamp"] {
            Value::Null => None,
            Value::String(t) => Some(humantime::parse_rfc3339(t).map_err(|e| {
                error(
                    format!("{namespace}/{name}"),
                    format!("creationTimestamp {t:?}: {e}"),
                )
            })?),
            other => {
                return Err(error(
                    format!("{namespace}/{name}"),
                    format!("creationTimestamp {other} is not a time"),
                ))
            }
        };
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            created,
        })
    }

    /// Oldest first; a tie (or no time) by name, so that the choice never depends on order.
    pub(super) fn older_than(&self, other: &Meta) -> bool {
        let key = |m: &Meta| {
            (
                m.created.is_none(),
                m.created,
                m.namespace.clone(),
                m.name.clone(),
            )
        };
        key(self) < key(other)
    }

    /// What is wrong with the object this is of.
    pub(super) fn error(&self, kind: PolicyKind, what: String) -> PolicyError {
        PolicyError {
            kind,
            object: format!("{}/{}", self.namespace, self.name),
            what,
        }
    }

    pub(super) fn reference(&self, kind: PolicyKind) -> PolicyRef {
        PolicyRef {
            kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// A `PeerAuthentication`: the mTLS its workloads' sidecars accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub meta: Meta,
    /// `selector.matchLabels`; empty: every workload of the namespace (of the mesh, in the root
    /// namespace).
    pub selector: BTreeMap<String, String>,
    pub mode: MtlsMode,
    /// `portLevelMtls`, by the workload's port (not the Service's). Istio honours it only with
    /// a selector.
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// A `DestinationRule`: the TLS its clients' sidecars use towards a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    pub meta: Meta,
    /// `host`, as written: a short name is relative to the rule's namespace.
    pub host: String,
    /// `exportTo`; empty: every namespace.
    pub export_to: Vec<String>,
    /// `workloadSelector.matchLabels`: the clients it applies to; empty: all of them.
    pub workload_selector: BTreeMap<String, String>,
    /// `trafficPolicy.tls.mode`; `None`: Istio's automatic mTLS decides.
    pub tls: Option<TlsMode>,
    /// `trafficPolicy.portLevelSettings[].tls.mode`, by the Service's port.
    pub ports: BTreeMap<u16, TlsMode>,
}

/// Every mesh policy object known, and the Services that rules' hosts name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshPolicy {
    pub peer_authentications: Vec<PeerAuthentication>,
    pub destination_rules: Vec<DestinationRule>,
    pub services: Vec<Service>,
}

/// The mTLS a workload's sidecar accepts on one port, and the object that says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMtls {
    /// Never `Unset`: Istio's own default, PERMISSIVE, when nothing says otherwise.
    pub mode: MtlsMode,
    /// `None`: no policy sets a mode (Istio's default).
    pub governed_by: Option<PolicyRef>,
}

impl MeshPolicy {
    /// What a workload's sidecar accepts on `port` (its own port, as the client dialled it),
    /// composed as Istio composes it: the most specific level that sets a mode wins (workload
    /// over namespace over mesh-wide, in the mesh's `root` namespace; of two at one level, the
    /// oldest); `UNSET` inherits; a workload policy's port setting overrides its mode for that
    /// port.
    pub fn peer_mtls(
        &self,
        root: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> PeerMtls {
        let oldest = |level: &dyn Fn(&PeerAuthentication) -> bool| {
            self.peer_authentications
                .iter()
                .filter(|p| level(p))
                .reduce(|a, b| if b.meta.older_than(&a.meta) { b } else { a })
        };
        let mesh = oldest(&|p| p.meta.namespace == root && p.selector.is_empty());
        let namespace_wide = oldest(&|p| {
            p.meta.namespace == namespace && namespace != root && p.selector.is_empty()
        });
        // A selector in the root namespace is ignored by Istio.
        let workload = oldest(&|p| {
            p.meta.namespace == namespace
                && namespace != root
                && !p.selector.is_empty()
                && selects(&p.selector, labels)
        });

        let mut out = PeerMtls {
            mode: MtlsMode::Permissive,
            governed_by: None,
        };
        for policy in [mesh, namespace_wide, workload].into_iter().flatten() {
            if policy.mode != MtlsMode::Unset {
                out.mode = policy.mode;
                out.governed_by = Some(policy.meta.reference(PolicyKind::PeerAuthentication));
            }
        }
        if let Some(policy) = workload {
            match policy.ports.get(&port) {
                Some(MtlsMode::Unset) | None => {}
                Some(mode) => {
                    out.mode = *mode;
                    out.governed_by = Some(policy.meta.reference(PolicyKind::PeerAuthentication));
                }
            }
        }
        out
    }
}

/// Whether a `matchLabels` selector selects an object with these labels.
pub(super) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What a document held of mesh policy.
#[derive(Debug, Default)]
pub struct ParsedPolicy {
    pub policy: MeshPolicy,
    pub errors: Vec<PolicyError>,
}

impl ParsedPolicy {
    /// Reads one item of a list, if it is a mesh policy object (`false` if it is not one).
    pub fn add(&mut self, item: &Value, position: usize) -> bool {
        let Some(kind) = item["kind"]
            .as_str()
            .and_then(|k| k.parse::<PolicyKind>().ok())
        else {
            return false;
        };
        let parsed = match kind {
            PolicyKind::PeerAuthentication => {
                PeerAuthentication::parse(item).map(|p| self.policy.peer_authentications.push(p))
            }
            PolicyKind::DestinationRule => {
                DestinationRule::parse(item).map(|d| self.policy.destination_rules.push(d))
            }
            PolicyKind::Service => Service::parse(item).map(|s| self.policy.services.push(s)),
        };
        if let Err(mut e) = parsed {
            if e.object.ends_with("<no name>") {
                e.object = format!("{} (item {position})", e.object);
            }
            self.errors.push(e);
        }
        true
    }

    /// Keeps, for each object that could not be read now, the version an earlier document
    /// gave (by kind, namespace and name): a broken edit does not switch a policy off.
    pub fn keep_last_good(&mut self, previous: &MeshPolicy) {
        for e in &self.errors {
            let same = |m: &Meta| format!("{}/{}", m.namespace, m.name) == e.object;
            match e.kind {
                PolicyKind::PeerAuthentication => self.policy.peer_authentications.extend(
                    previous
                        .peer_authentications
                        .iter()
                        .filter(|p| same(&p.meta))
                        .cloned(),
                ),
                PolicyKind::DestinationRule => self.policy.destination_rules.extend(
                    previous
                        .destination_rules
                        .iter()
                        .filter(|d| same(&d.meta))
                        .cloned(),
                ),
                PolicyKind::Service => self
                    .policy
                    .services
                    .extend(previous.services.iter().filter(|d| same(&d.meta)).cloned()),
            }
        }
    }
}

impl PeerAuthentication {
    pub fn parse(item: &Value) -> Result<Self, PolicyError> {
        const KIND: PolicyKind = PolicyKind::PeerAuthentication;
        let meta = Meta::parse(item, KIND)?;
        let error = |what: String| meta.error(KIND, what);
        let spec = &item["spec"];
        let selector = match_labels(&spec["selector"]["matchLabels"])
            .map_err(|w| error(format!("selector.matchLabels: {w}")))?;
        let mode = mtls_mode(&spec["mtls"]).map_err(|w| error(format!("mtls.mode: {w}")))?;
        let mut ports = BTreeMap::new();
        match &spec["portLevelMtls"] {
            Value::Null => {}
            Value::Object(levels) => {
                for (port, mtls) in levels {
                    let number =
                        port_number(port).map_err(|w| error(format!("portLevelMtls: {w}")))?;
                    let mode = mtls_mode(mtls)
                        .map_err(|w| error(format!("portLevelMtls {port}: mode: {w}")))?;
                    ports.insert(number, mode);
                }
            }
            other => {
                return Err(error(format!(
                    "portLevelMtls {other} is not a map of ports"
                )))
            }
        }
        Ok(Self {
            meta,
            selector,
            mode,
            ports,
        })
    }
}

impl DestinationRule {
    pub fn parse(item: &Value) -> Result<Self, PolicyError> {
        const KIND: PolicyKind = PolicyKind::DestinationRule;
        let meta = Meta::parse(item, KIND)?;
        let error = |what: String| meta.error(KIND, what);
        let spec = &item["spec"];
        let Some(host) = spec["host"].as_str().filter(|h| !h.is_empty()) else {
            return Err(error("host is missing".into()));
        };
        let export_to = match &spec["exportTo"] {
            Value::Null => Vec::new(),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| error("exportTo holds something other than names".into()))?,
            other => return Err(error(format!("exportTo {other} is not a list"))),
        };
        let workload_selector = match_labels(&spec["workloadSelector"]["matchLabels"])
            .map_err(|w| error(format!("workloadSelector.matchLabels: {w}")))?;
        let traffic = &spec["trafficPolicy"];
        let tls =
            tls_mode(&traffic["tls"]).map_err(|w| error(format!("trafficPolicy.tls.mode: {w}")))?;
        let mut ports = BTreeMap::new();
        match &traffic["portLevelSettings"] {
            Value::Null => {}
            Value::Array(settings) => {
                for (i, setting) in settings.iter().enumerate() {
                    let number = setting["port"]["number"]
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| *n != 0)
                        .ok_or_else(|| {
                            error(format!(
                                "trafficPolicy.portLevelSettings[{i}].port.number {} is not a port",
                                setting["port"]["number"]
                            ))
                        })?;
                    if let Some(mode) = tls_mode(&setting["tls"]).map_err(|w| {
                        error(format!(
                            "trafficPolicy.portLevelSettings[{i}].tls.mode: {w}"
                        ))
                    })? {
                        ports.insert(number, mode);
                    }
                }
            }
            other => {
                return Err(error(format!(
                    "trafficPolicy.portLevelSettings {other} is not a list"
                )))
            }
        }
        Ok(Self {
            meta,
            host: host.to_string(),
            export_to,
            workload_selector,
            tls,
            ports,
        })
    }
}

/// A `matchLabels` map; absent is empty.
pub(super) fn match_labels(v: &Value) -> Result<BTreeMap<String, String>, String> {
    match v {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(labels) => labels
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_string())),
                None => Err(format!("label {k:?} has a value that is not a string: {v}")),
            })
            .collect(),
        other => Err(format!("{other} is not a map of labels")),
    }
}

/// The `mode` of a `mtls` object; absent (or no object) is `UNSET`.
fn mtls_mode(mtls: &Value) -> Result<MtlsMode, String> {
    match &mtls["mode"] {
        Value::Null => Ok(MtlsMode::Unset),
        Value::String(word) => word.parse(),
        other => Err(format!("{other} is not a mode")),
    }
}

/// The `mode` of a `tls` object; absent is none.
fn tls_mode(tls: &Value) -> Result<Option<TlsMode>, String> {
    match &tls["mode"] {
        Value::Null => Ok(None),
        Value::String(word) => word.parse().map(Some),
        other => Err(format!("{other} is not a mode")),
    }
}

/// A port number written as a map key.
fn port_number(key: &str) -> Result<u16, String> {
    key.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{key:?} is not a port"))
}

#[cfg(test)]
pub(super) mod tests {
    use serde_json::json;

    use super::*;

    /// A PeerAuthentication as the API server returns it.
    fn pa(namespace: &str, name: &str, created: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": created,
                "generation": 1,
                "resourceVersion": "4242",
                "uid": "0b5c1f9e-7d4a-4c55-9a3e-0c1d2e3f4a5b"
            },
            "spec": spec
        })
    }

    pub(in crate::inventory) fn policy(items: &[Value]) -> MeshPolicy {
        let mut parsed = ParsedPolicy::default();
        for (i, item) in items.iter().enumerate() {
            assert!(parsed.add(item, i));
        }
        assert_eq!(parsed.errors, []);
        parsed.policy
    }

    pub(in crate::inventory) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(in crate::inventory) const T0: &str = "2026-01-01T00:00:00Z";
    pub(in crate::inventory) const T1: &str = "2026-02-01T00:00:00Z";

    /// Mesh, namespace, workload and port, one row a case: (objects, namespace, labels, port)
    /// to (mode, governing object).
    #[test]
    fn inheritance_mesh_namespace_workload_port() {
        let mesh_strict = pa(
            "istio-system",
            "default",
            T0,
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let ns_permissive = pa(
            "shop",
            "default",
            T0,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        let ns_unset = pa("shop", "unset", T0, json!({"mtls": {"mode": "UNSET"}}));
        let ns_empty_spec = pa("shop", "empty", T0, json!({}));
        let finance_strict = pa(
            "shop",
            "finance",
            T0,
            json!({"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "STRICT"},
                   "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}}}),
        );
        let finance_inherit = pa(
            "shop",
            "finance-inherit",
            T0,
            json!({"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "UNSET"},
                   "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        );
        let root_selector = pa(
            "istio-system",
            "selected",
            T0,
            json!({"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "DISABLE"}}),
        );
        let ns_disable_newer = pa("shop", "newer", T1, json!({"mtls": {"mode": "DISABLE"}}));
        let finance = labels(&[("app", "finance"), ("version", "v1")]);
        let other = labels(&[("app", "web")]);
        let at = |name: &str, ns: &str| {
            Some(PolicyRef {
                kind: PolicyKind::PeerAuthentication,
                namespace: ns.into(),
                name: name.into(),
            })
        };
        use MtlsMode::*;
        type Labels = BTreeMap<String, String>;
        type Case<'a> = (
            &'a str,
            Vec<&'a Value>,
            &'a Labels,
            u16,
            MtlsMode,
            Option<PolicyRef>,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing: Istio's default",
                vec![],
                &finance,
                80,
                Permissive,
                None,
            ),
            (
                "mesh-wide",
                vec![&mesh_strict],
                &other,
                80,
                Strict,
                at("default", "istio-system"),
            ),
            (
                "namespace over mesh",
                vec![&mesh_strict, &ns_permissive],
                &other,
                80,
                Permissive,
                at("default", "shop"),
            ),
            (
                "namespace UNSET inherits the mesh",
                vec![&mesh_strict, &ns_unset],
                &other,
                80,
                Strict,
                at("default", "istio-system"),
            ),
            (
                "no mtls at all is UNSET",
                vec![&mesh_strict, &ns_empty_spec],
                &other,
                80,
                Strict,
                at("default", "istio-system"),
            ),
            (
                "workload over namespace",
                vec![&ns_permissive, &finance_strict],
                &finance,
                80,
                Strict,
                at("finance", "shop"),
            ),
            (
                "a selector that does not match",
                vec![&ns_permissive, &finance_strict],
                &other,
                80,
                Permissive,
                at("default", "shop"),
            ),
            (
                "port over workload",
                vec![&ns_permissive, &finance_strict],
                &finance,
                8080,
                Disable,
                at("finance", "shop"),
            ),
            (
                "port UNSET inherits the workload",
                vec![&ns_permissive, &finance_strict],
                &finance,
                9090,
                Strict,
                at("finance", "shop"),
            ),
            (
                "workload UNSET inherits, its port overrides",
                vec![&mesh_strict, &finance_inherit],
                &finance,
                8080,
                Permissive,
                at("finance-inherit", "shop"),
            ),
            (
                "workload UNSET inherits the mesh",
                vec![&mesh_strict, &finance_inherit],
                &finance,
                80,
                Strict,
                at("default", "istio-system"),
            ),
            (
                "a selector in the root namespace is ignored",
                vec![&mesh_strict, &root_selector],
                &finance,
                80,
                Strict,
                at("default", "istio-system"),
            ),
            (
                "of two namespace-wide, the oldest",
                vec![&ns_disable_newer, &ns_permissive],
                &other,
                80,
                Permissive,
                at("default", "shop"),
            ),
            (
                "of two workload policies, the oldest",
                vec![&finance_inherit, &finance_strict],
                &finance,
                80,
                Strict,
                at("finance", "shop"),
            ),
        ];
        for (what, objects, labels, port, mode, governed_by) in cases {
            let objects: Vec<Value> = objects.into_iter().cloned().collect();
            let got = policy(&objects).peer_mtls(DEFAULT_ROOT_NAMESPACE, "shop", labels, port);
            assert_eq!(got, PeerMtls { mode, governed_by }, "{what}");
        }
        // The root namespace's own workloads: only mesh-wide policy applies to them.
        let got = policy(&[mesh_strict.clone(), root_selector.clone()]).peer_mtls(
            DEFAULT_ROOT_NAMESPACE,
            "istio-system",
            &finance,
            80,
        );
        assert_eq!(got.mode, Strict);
        // Another mesh's root (OpenShift Service Mesh's control plane namespace): a policy
        // without a selector there is mesh-wide, and one in istio-system is not.
        let cp = pa(
            "mesh-cp",
            "default",
            T0,
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let mesh = policy(&[cp, mesh_strict.clone()]);
        let mode = |root: &str| mesh.peer_mtls(root, "shop", &other, 80);
        assert_eq!(
            (mode("mesh-cp").mode, mode("mesh-cp").governed_by),
            (Strict, at("default", "mesh-cp"))
        );
        let elsewhere = mesh.peer_mtls("mesh-cp", "istio-system", &other, 80);
        assert_eq!(
            elsewhere.governed_by,
            at("default", "istio-system"),
            "a namespace-wide policy there"
        );
    }

    #[test]
    fn a_destination_rule_in_its_published_shape() {
        let dr = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews-plain", "namespace": "shop", "creationTimestamp": T0},
            "spec": {
                "host": "reviews",
                "exportTo": ["."],
                "trafficPolicy": {
                    "tls": {"mode": "DISABLE"},
                    "portLevelSettings": [
                        {"port": {"number": 9443}, "tls": {"mode": "ISTIO_MUTUAL"}},
                        {"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}
                    ]
                },
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}]
            }
        });
        let p = policy(&[dr]);
        let d = &p.destination_rules[0];
        assert_eq!(d.host, "reviews");
        assert_eq!(d.export_to, ["."]);
        assert_eq!(d.tls, Some(TlsMode::Disable));
        assert_eq!(d.ports, BTreeMap::from([(9443, TlsMode::IstioMutual)]));
    }

    #[test]
    fn malformed_objects_are_named_and_the_last_good_version_kept() {
        let good = pa("shop", "default", T0, json!({"mtls": {"mode": "STRICT"}}));
        let cases = [
            (json!({"mtls": {"mode": "strict"}}), "PeerAuthentication shop/default: mtls.mode: unknown mTLS mode \"strict\"; use one of UNSET, DISABLE, PERMISSIVE, STRICT"),
            (json!({"mtls": {"mode": 3}}), "PeerAuthentication shop/default: mtls.mode: 3 is not a mode"),
            (json!({"portLevelMtls": {"http": {"mode": "DISABLE"}}}), "PeerAuthentication shop/default: portLevelMtls: \"http\" is not a port"),
            (json!({"portLevelMtls": {"70000": {"mode": "DISABLE"}}}), "PeerAuthentication shop/default: portLevelMtls: \"70000\" is not a port"),
            (json!({"portLevelMtls": [8080]}), "PeerAuthentication shop/default: portLevelMtls [8080] is not a map of ports"),
            (json!({"selector": {"matchLabels": {"app": 7}}}), "PeerAuthentication shop/default: selector.matchLabels: label \"app\" has a value that is not a string: 7"),
        ];
        let previous = policy(&[good]);
        for (spec, message) in cases {
            let mut parsed = ParsedPolicy::default();
            assert!(parsed.add(&pa("shop", "default", T0, spec), 0));
            let errors: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
            assert_eq!(errors, [message]);
            parsed.keep_last_good(&previous);
            assert_eq!(parsed.policy, previous, "{message}");
        }
        // No name, no host; and things that are not policy at all.
        let mut parsed = ParsedPolicy::default();
        assert!(parsed.add(
            &json!({"kind": "PeerAuthentication", "metadata": {"namespace": "shop"}}),
            3
        ));
        assert!(parsed.add(&json!({"kind": "DestinationRule", "metadata": {"name": "d", "namespace": "shop"}, "spec": {}}), 4));
        assert!(!parsed.add(&json!({"kind": "Pod"}), 5));
        let errors: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "PeerAuthentication shop/<no name> (item 3): metadata.name is missing",
                "DestinationRule shop/d: host is missing",
            ]
        );
    }
}
