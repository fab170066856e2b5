//! meshguard: did every pod-to-pod byte really go through the mesh, encrypted?
//!
//! The agent's pieces, in the order data flows through them: the kernel side is loaded and
//! attached by [`kernel`] once [`prereq`] has checked the node; [`event`] decodes what it
//! reports; [`flow`] keeps the table of flows, putting payload samples back together and
//! reading them with [`fingerprint`]; [`inventory`] says who is behind an address, which
//! container owns a socket's cgroup, and what they intend; [`judge`] resolves a flow's owner and
//! holds it back until its evidence is whole; [`verdict`] decides; [`agent`] runs it all.

pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
#[cfg(feature = "kubernetes")]
pub mod cluster;
pub mod config;
pub mod cookie;
pub mod display;
pub mod event;
pub mod fingerprint;
pub mod flow;
pub mod http;
pub mod inventory;
pub mod judge;
pub mod kernel;
pub mod loss;
pub mod metrics;
pub mod serve;
pub mod state;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;
pub mod verdict;
