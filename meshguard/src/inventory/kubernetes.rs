//! `--inventory kubernetes`: this node's pods from the API server (in-cluster configuration,
//! or a kubeconfig outside a cluster), watched with a field selector on `spec.nodeName`,
//! namespaces for OpenShift's per-namespace proxy uid, the mesh's PeerAuthentication and
//! DestinationRule objects (`security.istio.io` and `networking.istio.io`, `v1beta1`, which
//! every Istio and OpenShift Service Mesh still in support serves), and the Services that
//! rules' hosts name. Each watch relists after
//! any gap and backs off on errors; an object that does not parse keeps its last good version.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as ServiceObject};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde_json::Value;
use tracing::{info, warn};

use crate::enforce::Mode;

use super::{
    destination::Service,
    namespace_mode, namespace_proxy_uid,
    policy::{DestinationRule, MeshPolicy, PeerAuthentication},
    Inventory, ParsedPod, PodInfo, Shared,
};

pub const SOURCE: &str = "kubernetes";

/// What a watch said, reduced to what the store needs (and to plain JSON, so that the objects
/// go through the same parser as a pod list file).
#[derive(Debug)]
pub enum Change {
    /// A relist begins: objects until `Ready` replace everything.
    Relist,
    Upsert(Value),
    Delete(Value),
    Ready,
}

/// This node's pods, the namespaces' proxy uids and the mesh's policy objects, as the
/// watches last said.
#[derive(Default)]
pub struct Store {
    pods: Objects<PodInfo>,
    namespaces: BTreeMap<String, u32>,
    enforcement: BTreeMap<String, Mode>,
    peer_authentications: Objects<PeerAuthentication>,
    destination_rules: Objects<DestinationRule>,
    services: Objects<Service>,
}

/// The objects of one watch, by `namespace/name`: a relist replaces them once it is complete,
/// and an object that does not parse keeps its last good version.
pub struct Objects<T> {
    now: BTreeMap<String, T>,
    relisting: Option<BTreeMap<String, T>>,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Self {
            now: BTreeMap::new(),
            relisting: None,
        }
    }
}

impl<T: Clone> Objects<T> {
    /// Applies one watch change; returns whether the inventory should be republished.
    fn change<E: std::fmt::Display>(
        &mut self,
        change: Change,
        kind: &str,
        parse: impl Fn(&Value) -> Result<T, E>,
    ) -> bool {
        match change {
            Change::Relist => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Change::Ready => {
                if let Some(objects) = self.relisting.take() {
                    self.now = objects;
                }
                true
            }
            Change::Upsert(v) => {
                let key = key(&v);
                let object = match parse(&v) {
                    Ok(object) => Some(object),
                    Err(e) => {
                        let kept = self.now.get(&key).cloned();
                        warn!(kind, error = %e, kept_previous = kept.is_some(), "malformed object from the API server");
                        kept
                    }
                };
                if let Some(object) = object {
                    self.relisting
                        .as_mut()
                        .unwrap_or(&mut self.now)
                        .insert(key, object);
                }
                self.relisting.is_none()
            }
            Change::Delete(v) => {
                self.now.remove(&key(&v));
                self.relisting.is_none()
            }
        }
    }

    fn all(&self) -> Vec<T> {
        self.now.values().cloned().collect()
    }
}

fn key(v: &Value) -> String {
    let meta = &v["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or("<no name>")
    )
}

impl Store {
    /// Applies one pod watch change; returns whether the inventory should be republished.
    pub fn pod_change(&mut self, change: Change) -> bool {
        self.pods.change(change, "pod", |v| {
            PodInfo::parse(v).map(|ParsedPod { pod, warnings }| {
                for w in &warnings {
                    warn!(warning = %w, "pod from the API server kept without the part that did not parse");
                }
                pod
            })
        })
    }

    pub fn namespace(&mut self, v: &Value) -> bool {
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mode = namespace_mode(v).unwrap_or_else(|what| {
            warn!(namespace = %name, %what, "enforcement mode not understood; the policy's default holds");
            None
        });
        let mode_changed = match mode {
            Some(mode) => self.enforcement.insert(name.clone(), mode) != Some(mode),
            None => self.enforcement.remove(&name).is_some(),
        };
        let uid_changed = match namespace_proxy_uid(v) {
            Some(uid) => self.namespaces.insert(name, uid) != Some(uid),
            None => self.namespaces.remove(&name).is_some(),
        };
        mode_changed || uid_changed
    }

    pub fn peer_authentication(&mut self, change: Change) -> bool {
        self.peer_authentications
            .change(change, "PeerAuthentication", PeerAuthentication::parse)
    }

    pub fn destination_rule(&mut self, change: Change) -> bool {
        self.destination_rules
            .change(change, "DestinationRule", DestinationRule::parse)
    }

    pub fn service(&mut self, change: Change) -> bool {
        self.services.change(change, "Service", Service::parse)
    }

    pub fn inventory(&self) -> Inventory {
        Inventory::with_namespaces(SOURCE, self.pods.all(), &self.namespaces)
            .with_policy(MeshPolicy {
                peer_authentications: self.peer_authentications.all(),
                destination_rules: self.destination_rules.all(),
                services: self.services.all(),
            })
            .with_enforcement(self.enforcement.clone())
    }
}

/// A mesh policy kind as the API server serves it.
fn policy_api(client: &Client, group: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, "v1beta1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Connects and starts the watches; fails only if no API configuration can be found at all.
pub async fn start(node_name: &str, shared: Shared) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("--inventory kubernetes: no in-cluster configuration or kubeconfig found")?;
    let store = Arc::new(std::sync::Mutex::new(Store::default()));
    let pods: Api<Pod> = Api::all(client.clone());
    let by_node = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    info!(
        node = node_name,
        "watching this node's pods on the API server"
    );
    tokio::spawn(watch(
        pods,
        "pods",
        by_node,
        Arc::clone(&store),
        Arc::clone(&shared),
        |store, change| store.pod_change(change),
    ));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    tokio::spawn(watch(
        namespaces,
        "namespaces",
        watcher::Config::default(),
        Arc::clone(&store),
        Arc::clone(&shared),
        |store, change| match change {
            Change::Upsert(v) => store.namespace(&v),
            _ => false,
        },
    ));
    // Without Istio's CRDs these watches fail and retry with backoff, saying so: pods are
    // still judged, with no declared intent.
    tokio::spawn(watch(
        policy_api(
            &client,
            "security.istio.io",
            "PeerAuthentication",
            "peerauthentications",
        ),
        "peerauthentications",
        watcher::Config::default(),
        Arc::clone(&store),
        Arc::clone(&shared),
        Store::peer_authentication,
    ));
    tokio::spawn(watch(
        policy_api(
            &client,
            "networking.istio.io",
            "DestinationRule",
            "destinationrules",
        ),
        "destinationrules",
        watcher::Config::default(),
        Arc::clone(&store),
        Arc::clone(&shared),
        Store::destination_rule,
    ));
    let services: Api<ServiceObject> = Api::all(client);
    tokio::spawn(watch(
        services,
        "services",
        watcher::Config::default(),
        store,
        shared,
        Store::service,
    ));
    Ok(())
}

async fn watch<K>(
    api: Api<K>,
    kind: &'static str,
    config: watcher::Config,
    store: Arc<std::sync::Mutex<Store>>,
    shared: Shared,
    apply: fn(&mut Store, Change) -> bool,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize
        + Send
        + 'static,
{
    let mut events = watcher(api, config)
        .default_backoff()
        .map_err(|e| e.to_string())
        .boxed();
    // Said once per distinct error, and once when the watch works again: a kind the API server
    // does not serve (no Istio) fails the same way at every retry.
    let mut failing: Option<String> = None;
    while let Some(event) = events.next().await {
        if event.is_ok() {
            if let Some(error) = failing.take() {
                info!(kind, %error, "API watch works again");
            }
        }
        let change = match event {
            Ok(watcher::Event::Init) => Change::Relist,
            Ok(watcher::Event::InitDone) => Change::Ready,
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                Change::Upsert(serde_json::to_value(o).unwrap_or_default())
            }
            Ok(watcher::Event::Delete(o)) => {
                Change::Delete(serde_json::to_value(o).unwrap_or_default())
            }
            Err(error) => {
                if failing.as_ref() != Some(&error) {
                    warn!(kind, %error, "API watch failed; retrying with backoff, keeping the last good inventory");
                    failing = Some(error);
                }
                continue;
            }
        };
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        if apply(&mut store, change) {
            *shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(store.inventory());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{destination::Workload, policy::DEFAULT_ROOT_NAMESPACE};

    fn fixture() -> Value {
        serde_json::from_str(include_str!("../../tests/fixtures/istio-pod.json")).unwrap()
    }

    /// The fixture's pod, as the inventory knows it.
    fn fixture_pod(inv: &Inventory) -> PodInfo {
        inv.lookup("10.244.0.23".parse().unwrap())
            .pod()
            .cloned()
            .unwrap()
    }

    #[test]
    fn a_real_injected_pod() {
        let ParsedPod { pod, warnings } = PodInfo::parse(&fixture()).unwrap();
        assert_eq!(warnings, []);
        assert_eq!(pod.workload.name, "reviews-v1");
        assert_eq!(pod.mesh, super::super::MeshMode::Sidecar);
        assert_eq!(pod.probe_ports.iter().copied().collect::<Vec<_>>(), [15021]);
    }

    #[test]
    fn watch_changes() {
        let mut store = Store::default();
        let pod = fixture();
        assert!(store.pod_change(Change::Upsert(pod.clone())));
        assert_eq!(store.inventory().len(), 1);

        // A relist replaces everything only once it is complete.
        assert!(!store.pod_change(Change::Relist));
        assert!(!store.pod_change(Change::Upsert(
            serde_json::json!({"kind": "Pod", "metadata": {"name": "other", "namespace": "x"}})
        )));
        assert_eq!(store.inventory().len(), 1, "unchanged while relisting");
        assert!(store.pod_change(Change::Ready));
        let inv = store.inventory();
        assert_eq!(inv.len(), 1);
        assert!(
            inv.lookup("10.244.0.23".parse().unwrap()).pod().is_none(),
            "the relist dropped it"
        );

        // A malformed update keeps the last good version.
        assert!(store.pod_change(Change::Upsert(pod.clone())));
        let mut broken = pod.clone();
        broken["status"]["podIP"] = serde_json::json!("not-an-ip");
        broken["status"]["podIPs"] = serde_json::json!([]);
        store.pod_change(Change::Upsert(broken));
        assert!(store
            .inventory()
            .lookup("10.244.0.23".parse().unwrap())
            .pod()
            .is_some());

        assert!(store.pod_change(Change::Delete(pod)));
        assert!(store
            .inventory()
            .lookup("10.244.0.23".parse().unwrap())
            .pod()
            .is_none());
    }

    /// A PeerAuthentication as the API server's watch returns it.
    fn peer_authentication(mode: &str) -> Value {
        serde_json::json!({
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": "default",
                "namespace": "bookinfo",
                "uid": "6c1f2b7e-0f55-4a8e-9d51-2f0e3f1c9a77",
                "resourceVersion": "481516",
                "generation": 2,
                "creationTimestamp": "2026-11-02T09:14:03Z",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}"
                },
                "managedFields": [{
                    "manager": "kubectl-client-side-apply",
                    "operation": "Update",
                    "apiVersion": "security.istio.io/v1beta1",
                    "time": "2026-11-02T09:14:03Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {".": {}, "f:mtls": {".": {}, "f:mode": {}}}}
                }]
            },
            "spec": {"mtls": {"mode": mode}}
        })
    }

    #[test]
    fn policy_watch_changes() {
        let mut store = Store::default();
        store.pod_change(Change::Upsert(fixture()));
        let mode = |store: &Store| {
            let inv = store.inventory();
            let pod = fixture_pod(&inv);
            inv.policy
                .peer_mtls(DEFAULT_ROOT_NAMESPACE, &pod.namespace, &pod.labels, 9080)
                .mode
                .as_str()
        };
        assert_eq!(mode(&store), "PERMISSIVE", "Istio's default");
        assert!(store.peer_authentication(Change::Upsert(peer_authentication("STRICT"))));
        assert_eq!(mode(&store), "STRICT");
        // A malformed update keeps the last good version.
        store.peer_authentication(Change::Upsert(peer_authentication("STRICTER")));
        assert_eq!(mode(&store), "STRICT");
        // A relist replaces them only once it is complete.
        assert!(!store.peer_authentication(Change::Relist));
        assert!(!store.peer_authentication(Change::Upsert(peer_authentication("DISABLE"))));
        assert_eq!(mode(&store), "STRICT", "unchanged while relisting");
        assert!(store.peer_authentication(Change::Ready));
        assert_eq!(mode(&store), "DISABLE");
        assert!(store.peer_authentication(Change::Delete(peer_authentication("DISABLE"))));
        assert_eq!(mode(&store), "PERMISSIVE");
        // DestinationRules go through their own watch into the same inventory.
        let dr = serde_json::json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"host": "reviews", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}});
        assert!(store.destination_rule(Change::Upsert(dr)));
        // Its host, a Service, through the Services' watch (the typed object, as it arrives).
        let rule = |store: &Store| {
            let inv = store.inventory();
            let pod = fixture_pod(&inv);
            let end = Workload {
                namespace: &pod.namespace,
                labels: &pod.labels,
                named_ports: &pod.named_ports,
            };
            inv.policy
                .client_tls(DEFAULT_ROOT_NAMESPACE, &end, &end, 9080)
                .map(|t| (t.mode.as_str(), t.rule.name))
        };
        assert_eq!(rule(&store), None, "no Service: the host names nothing");
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "bookinfo", "resourceVersion": "12"},
            "spec": {"selector": {"app": "reviews"}, "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}}))
        .unwrap();
        assert!(store.service(Change::Upsert(serde_json::to_value(service).unwrap())));
        assert_eq!(rule(&store), Some(("DISABLE", "reviews".to_string())));
    }

    #[test]
    fn openshift_namespaces_set_the_proxy_uid() {
        let mut store = Store::default();
        let mut pod = fixture();
        // OpenShift's injector leaves runAsUser unset: the namespace's range decides.
        pod["spec"]["containers"][1]["securityContext"]["runAsUser"] = Value::Null;
        store.pod_change(Change::Upsert(pod));
        let ns = serde_json::json!({"kind": "Namespace", "metadata": {"name": "bookinfo", "annotations": {"openshift.io/sa.scc.uid-range": "1000650000/10000"}}});
        assert!(store.namespace(&ns));
        assert_eq!(fixture_pod(&store.inventory()).proxy_uid, 1000650001);
    }

    /// A namespace's enforcement label, as `kubectl label` changes it: each change
    /// republishes the inventory; a word not understood leaves the namespace without a mode.
    #[test]
    fn namespace_labels_set_the_enforcement_mode() {
        let mut store = Store::default();
        let ns = |labels: Value| serde_json::json!({"kind": "Namespace", "metadata": {"name": "bookinfo", "labels": labels}});
        let mode = |store: &Store| store.inventory().enforcement.get("bookinfo").copied();
        assert!(store.namespace(&ns(serde_json::json!({"meshguard.io/enforce": "audit"}))));
        assert_eq!(mode(&store), Some(Mode::Audit));
        assert!(
            !store.namespace(&ns(serde_json::json!({"meshguard.io/enforce": "audit"}))),
            "unchanged"
        );
        assert!(store.namespace(&ns(serde_json::json!({"meshguard.io/enforce": "enforce"}))));
        assert_eq!(mode(&store), Some(Mode::Enforce));
        assert!(store.namespace(&ns(
            serde_json::json!({"meshguard.io/enforce": "enforcing"})
        )));
        assert_eq!(mode(&store), None);
        assert!(store.namespace(&ns(serde_json::json!({"meshguard.io/enforce": "off"}))));
        assert!(store.namespace(&ns(serde_json::json!({}))));
        assert_eq!(mode(&store), None);
    }
}
