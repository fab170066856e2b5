//! Enforcement's decisions as Kubernetes Events on the pod they concern (`--inventory
//! kubernetes`): what `kubectl describe pod` and `kubectl get events` show on-call first.
//! Published off the event path through a bounded queue (a full queue drops, and says so);
//! the API server's own series (kube's recorder patches a repeated event's count) and a limit
//! per pod and reason keep a retry loop from flooding it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    enforce::{Action, Rule},
    flow::record::FlowRecord,
};

/// The same pod and reason are published at most this often; the API server counts repeats
/// within it as one series anyway.
const SAME_EVENT_EVERY: Duration = Duration::from_secs(60);
/// Decisions queued for the API server at most.
const QUEUE: usize = 256;

/// What one Event says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub namespace: String,
    pub pod: String,
    pub action: Action,
    pub rule: Rule,
    /// The verdict's reason.
    pub reason: String,
    pub detail: String,
}

impl Decision {
    /// The decision a record reports, if it says what enforcement did and names its pod.
    pub fn of(record: &FlowRecord) -> Option<Self> {
        let (action, rule) = (record.action?, record.action_rule?);
        let end = &record.local;
        Some(Self {
            namespace: end.namespace.as_deref()?.to_string(),
            pod: end.pod.as_deref()?.to_string(),
            action,
            rule,
            reason: record.reason.to_string(),
            detail: record.detail.clone(),
        })
    }

    /// As the Events API takes it: a PascalCase reason, the action, a note of at most 1 kB.
    pub fn event(&self) -> Event {
        let (type_, reason) = match self.action {
            Action::Refused => (EventType::Warning, "BypassRefused"),
            Action::WouldRefuse => (EventType::Normal, "BypassWouldBeRefused"),
        };
        let mut note = format!(
            "{} ({}, {}): {}",
            match self.action {
                Action::Refused => "meshguard refused plaintext past the sidecar",
                Action::WouldRefuse => "meshguard (audit) would refuse plaintext past the sidecar",
            },
            self.rule,
            self.reason,
            self.detail
        );
        if note.len() > 1024 {
            let mut cut = 1021;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Enforce".into(),
            secondary: None,
        }
    }

    fn regarding(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.pod.clone()),
            ..ObjectReference::default()
        }
    }
}

/// Which decisions are published: one per pod, action and reason per [`SAME_EVENT_EVERY`].
#[derive(Default)]
pub struct Limit {
    last: HashMap<(String, String, Action, String), Instant>,
}

impl Limit {
    pub fn admit(&mut self, d: &Decision, now: Instant) -> bool {
        let key = (
            d.namespace.clone(),
            d.pod.clone(),
            d.action,
            d.reason.clone(),
        );
        match self.last.get(&key) {
            Some(t) if now.duration_since(*t) < SAME_EVENT_EVERY => false,
            _ => {
                self.last
                    .retain(|_, t| now.duration_since(*t) < SAME_EVENT_EVERY);
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// The queue to the task that publishes.
pub struct Events {
    queue: mpsc::Sender<Decision>,
    limit: Limit,
    dropped: bool,
}

impl Events {
    /// Starts the publishing task on the current runtime, as `node`'s agent.
    pub fn start(client: Client, node: &str) -> Self {
        let (queue, mut decisions) = mpsc::channel::<Decision>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "meshguard".into(),
                instance: Some(node.to_string()),
            },
        );
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(d) = decisions.recv().await {
                match recorder.publish(&d.event(), &d.regarding()).await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "cannot publish enforcement events; they stay in the records, logs and metrics");
                    }
                    Err(_) => {}
                }
            }
        });
        Self {
            queue,
            limit: Limit::default(),
            dropped: false,
        }
    }

    /// Queues a record's decision, if it has one; never waits.
    pub fn send(&mut self, record: &FlowRecord) {
        let Some(d) = Decision::of(record) else {
            return;
        };
        if !self.limit.admit(&d, Instant::now()) {
            return;
        }
        if self.queue.try_send(d).is_err() && !self.dropped {
            self.dropped = true;
            warn!("enforcement events queue full: some are not published (records, logs and metrics have them all)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{flow::record::tests::record, verdict::Verdict};

    fn decision(pod: &str, reason: &str) -> Decision {
        Decision {
            namespace: "shop".into(),
            pod: pod.into(),
            action: Action::Refused,
            rule: Rule::EgressBypass,
            reason: reason.into(),
            detail: "x".repeat(2000),
        }
    }

    #[test]
    fn an_event_says_what_was_refused_on_the_pod() {
        let mut r = (*record(1, Verdict::BypassPlaintext, SystemTime::now())).clone();
        assert_eq!(Decision::of(&r), None, "no action, no event");
        r.action = Some(Action::WouldRefuse);
        r.action_rule = Some(Rule::StrictInbound);
        let d = Decision::of(&r).expect("a decision on a known pod");
        assert_eq!(
            (d.namespace.as_str(), d.action, d.rule),
            (
                r.local.namespace.as_deref().unwrap(),
                Action::WouldRefuse,
                Rule::StrictInbound
            )
        );
        let e = decision("web-1", "excluded-port").event();
        assert_eq!(
            (e.type_, e.reason.as_str(), e.action.as_str()),
            (EventType::Warning, "BypassRefused", "Enforce")
        );
        let note = e.note.unwrap();
        assert!(
            note.starts_with(
                "meshguard refused plaintext past the sidecar (egress-bypass, excluded-port): x"
            ),
            "{note}"
        );
        assert_eq!(note.len(), 1024, "the Events API's limit");
        assert_eq!(
            decision("web-1", "x").regarding().name.as_deref(),
            Some("web-1")
        );
    }

    #[test]
    fn one_event_per_pod_and_reason_a_minute() {
        let mut limit = Limit::default();
        let t0 = Instant::now();
        assert!(limit.admit(&decision("web-1", "excluded-port"), t0));
        assert!(!limit.admit(
            &decision("web-1", "excluded-port"),
            t0 + Duration::from_secs(5)
        ));
        assert!(
            limit.admit(&decision("web-1", "no-capture"), t0),
            "another reason"
        );
        assert!(
            limit.admit(&decision("web-2", "excluded-port"), t0),
            "another pod"
        );
        assert!(limit.admit(&decision("web-1", "excluded-port"), t0 + SAME_EVENT_EVERY));
    }
}
