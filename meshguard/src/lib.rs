//! meshguard: did every pod-to-pod byte really go through the mesh, encrypted?
//!
//! The agent's pieces, in the order data flows through them: the kernel side is loaded and
//! attached by [`kernel`] once [`prereq`] has checked the node; [`event`] decodes what it
//! reports; [`flow`] keeps the table of flows ([`flow::table`]), putting payload samples back
//! together and reading them with [`fingerprint`]; [`inventory`] says who is behind an address,
//! which container owns a socket's cgroup, and what they intend; [`judge`] resolves a flow's
//! owner, holds it back until its evidence is whole and makes its [`flow::record`]; [`verdict`]
//! decides; [`agent`] runs it all, publishing records to [`store`] and the [`api`].
//!
//! The people's side: [`cli`] (`meshguard flows|explain|status`), which reads the API through
//! the types it shares with the server ([`api::types`], [`flow::record`]).

pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cookie;
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
pub mod verdict;
pub mod wire;
