//! Where the inventory comes from (`--inventory`): a `kubectl get pods -o json` file, reloaded
//! when it changes; the Kubernetes API; or nothing. A source in trouble (missing file, garbage,
//! an API error) is logged and the last good inventory stays in force; the agent never stops
//! for it.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{parse_pods, Inventory, Parsed, PodInfo, Shared};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Kubernetes,
    None,
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Source::None),
            "kubernetes" => Ok(Source::Kubernetes),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Source::File(PathBuf::from(path))),
                _ => Err(format!(
                    "{s:?} is not an inventory source: use file:PATH (a `kubectl get pods -o json` \
                     document), kubernetes, or none"
                )),
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "file:{}", p.display()),
            Source::Kubernetes => f.write_str("kubernetes"),
            Source::None => f.write_str("none"),
        }
    }
}

/// How often the file source looks for a change.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Replaces the shared inventory from a file whenever the file changes.
pub async fn watch_file(path: PathBuf, shared: Shared) {
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut last_error: Option<String> = None;
    loop {
        match std::fs::metadata(&path) {
            Ok(meta) => {
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                if seen != Some(stamp) {
                    seen = Some(stamp);
                    last_error = None;
                    reload(&path, &shared);
                }
            }
            Err(e) => {
                let error = e.to_string();
                if last_error.as_ref() != Some(&error) {
                    warn!(path = %path.display(), %error, kept = current(&shared).len(), "inventory file unreadable; keeping the last good inventory");
                    last_error = Some(error);
                }
                seen = None;
            }
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}

fn current(shared: &Shared) -> Arc<Inventory> {
    Arc::clone(&shared.read().unwrap_or_else(|e| e.into_inner()))
}

/// Loads the file once. Malformed pods keep their last good version; a file that is not a pod
/// list at all keeps the whole last good inventory.
pub fn reload(path: &Path, shared: &Shared) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "inventory file unreadable; keeping the last good inventory");
            return;
        }
    };
    let Parsed {
        mut pods,
        namespaces,
        enforcement,
        errors,
        warnings,
        mut policy,
    } = match parse_pods(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            warn!(path = %path.display(), error = %e, kept = current(shared).len(), "inventory file is not a pod list; keeping the last good inventory");
            return;
        }
    };
    for w in &warnings {
        warn!(path = %path.display(), warning = %w, "pod in the inventory kept without the part that did not parse");
    }
    let previous = current(shared);
    for e in &errors {
        let kept = previous
            .pods
            .iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == e.object);
        warn!(path = %path.display(), error = %e, kept_previous = kept.is_some(), "malformed pod in the inventory");
        if let Some(p) = kept {
            pods.push(PodInfo::clone(p));
        }
    }
    for e in &policy.errors {
        warn!(path = %path.display(), error = %e, "malformed mesh policy object in the inventory; its last good version kept");
    }
    policy.keep_last_good(&previous.policy);
    let policy = policy.policy;
    let source = Source::File(path.to_path_buf()).to_string();
    info!(
        source,
        pods = pods.len(),
        peer_authentications = policy.peer_authentications.len(),
        destination_rules = policy.destination_rules.len(),
        "inventory loaded"
    );
    *shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(
        Inventory::with_namespaces(&source, pods, &namespaces)
            .with_policy(policy)
            .with_enforcement(enforcement),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::policy::{MtlsMode, DEFAULT_ROOT_NAMESPACE};

    #[test]
    fn sources() {
        assert_eq!("none".parse(), Ok(Source::None));
        assert_eq!("kubernetes".parse(), Ok(Source::Kubernetes));
        assert_eq!(
            "file:/tmp/pods.json".parse(),
            Ok(Source::File("/tmp/pods.json".into()))
        );
        for bad in ["file:", "k8s", "", "/tmp/pods.json"] {
            let e = bad.parse::<Source>().unwrap_err();
            assert!(e.contains("use file:PATH"), "{bad}: {e}");
        }
    }

    #[test]
    fn garbage_keeps_the_last_good_inventory() {
        let dir = std::env::temp_dir().join(format!("meshguard-inv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pods.json");
        let shared: Shared = Arc::new(std::sync::RwLock::new(Arc::new(Inventory::empty("none"))));
        let good = r#"{"kind":"List","items":[
            {"kind":"Pod","metadata":{"name":"a","namespace":"n"},"status":{"podIP":"10.0.0.1"}},
            {"kind":"Pod","metadata":{"name":"b","namespace":"n"},"status":{"podIP":"10.0.0.2"}}]}"#;
        std::fs::write(&path, good).unwrap();
        reload(&path, &shared);
        assert_eq!(current(&shared).len(), 2);

        // One pod turns malformed: it keeps its last good version, the other is updated.
        let one_bad = r#"{"kind":"List","items":[
            {"kind":"Pod","metadata":{"name":"a","namespace":"n"},"status":{"podIP":"10.0.0.9"}},
            {"kind":"Pod","metadata":{"name":"b","namespace":"n"},"status":{"podIP":"nope"}}]}"#;
        std::fs::write(&path, one_bad).unwrap();
        reload(&path, &shared);
        let inv = current(&shared);
        assert_eq!(inv.len(), 2);
        assert!(
            inv.lookup("10.0.0.2".parse().unwrap()).pod().is_some(),
            "b kept as it was"
        );
        assert!(
            inv.lookup("10.0.0.9".parse().unwrap()).pod().is_some(),
            "a updated"
        );

        // Mesh policy beside the pods; a broken edit of it keeps its last good version.
        let with_policy = |mode: &str| {
            format!(
                r#"{{"kind":"List","items":[
                {{"kind":"Pod","metadata":{{"name":"a","namespace":"n"}},"status":{{"podIP":"10.0.0.1"}}}},
                {{"kind":"PeerAuthentication","metadata":{{"name":"default","namespace":"n"}},
                  "spec":{{"mtls":{{"mode":"{mode}"}}}}}}]}}"#
            )
        };
        let mode = |shared: &Shared| {
            current(shared)
                .policy
                .peer_mtls(DEFAULT_ROOT_NAMESPACE, "n", &Default::default(), 80)
                .mode
        };
        std::fs::write(&path, with_policy("STRICT")).unwrap();
        reload(&path, &shared);
        assert_eq!(
            (current(&shared).len(), mode(&shared)),
            (1, MtlsMode::Strict)
        );
        std::fs::write(&path, with_policy("STRICTEST")).unwrap();
        reload(&path, &shared);
        assert_eq!(mode(&shared), MtlsMode::Strict, "the last good version");
        std::fs::write(&path, with_policy("DISABLE")).unwrap();
        reload(&path, &shared);
        assert_eq!(mode(&shared), MtlsMode::Disable);

        // Garbage, then a missing file: the inventory stays.
        std::fs::write(&path, "{not json").unwrap();
        reload(&path, &shared);
        assert_eq!(current(&shared).len(), 1);
        std::fs::remove_file(&path).unwrap();
        reload(&path, &shared);
        assert_eq!(current(&shared).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
