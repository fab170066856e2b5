//! meshguard: did every pod-to-pod byte really go through the mesh, encrypted?
//!
//! The agent is one pipeline; its stages, in the order data flows through them:
//!
//! 1. [`kernel`] checks the node ([`kernel::prereq`]), loads and attaches the embedded programs
//!    from one table, pins and adopts them, checks they stay attached, and reads their maps
//!    ([`kernel::sys`]: the bpf(2) calls aya lacks; [`kernel::btf`]: one struct offset;
//!    [`clock`]: the kernel's clock).
//! 2. [`event`] decodes each ring-buffer event: the one place the kernel's layout is read.
//! 3. [`flow`] holds the flows as the agent knows them ([`flow::table`]), putting their payload
//!    samples back together and reading them with [`fingerprint`].
//! 4. [`judge`] resolves each flow's owner from its socket's cgroup through the [`inventory`],
//!    holds the flow back until its evidence is whole, asks [`verdict`] for the decision, and
//!    makes the [`flow::record`] that is published, with what the mesh declares for its server
//!    and any [`intent`] contradiction.
//! 5. Publishing: [`state`] holds what the endpoints read: [`metrics`], the [`store`] of
//!    records, the live stream and the status.
//!
//! [`agent`] runs it: its pipeline owns every stage, and its endpoints ([`http`] for metrics
//! and health, [`api`] for queries) run on a runtime of their own, bounded by [`serve`].
//! [`config`] is its configuration, one struct per subsystem. [`loss`] and [`wire`] name the
//! vocabularies that travel (loss sources; verdicts, directions and other words).
//!
//! The people's side, [`cli`] (`meshguard flows|explain|status`), reads the API through the
//! types it shares with the server ([`api::types`], [`flow::record`]), never the agent's
//! internals.

pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cookie;
pub mod enforce;
pub mod event;
pub mod fingerprint;
pub mod flow;
pub mod http;
pub mod intent;
pub mod inventory;
pub mod judge;
pub mod kernel;
pub mod loss;
pub mod metrics;
pub mod serve;
pub mod state;
pub mod store;
pub mod verdict;
pub mod wire;
