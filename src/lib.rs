//! ferry: replicates a message broker's data directory from a leader to followers.
//!
//! The protocol is a sans-IO core (`frame`, `session`) driven by thin I/O shells
//! (`engine`). See `docs/ARCHITECTURE.md` for the code map and the invariants
//! that hold between the modules.

pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod cluster_admin;
pub mod cluster_secret;
pub mod engine;
pub mod follower;
pub mod fork_chain;
pub mod frame;
pub mod http;
pub mod index;
pub mod kept_open;
pub mod lag;
pub mod leader;
pub mod leader_record;
pub mod lineage;
pub mod log_repeats;
pub mod notify;
pub mod paths;
pub(crate) mod promote;
pub mod schedstat;
pub mod session;
pub mod status;
pub mod threads;
pub mod watch;
