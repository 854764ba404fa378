//! berth: Berth's CNI 1.1 plugin.
//!
//! Synchronous and small: it parses the CNI environment and config, plumbs a veth pair with
//! netlink, and asks berth-agent (framed protobuf over the agent's unix socket) for an address and
//! an endpoint. It never loads eBPF itself. Logs go to stderr (and an optional file), never stdout.
pub mod client;
pub mod config;
pub mod error;
pub use berth_netlink as netlink;
pub mod plugin;
pub mod queue;

pub use error::{Error, Result};
