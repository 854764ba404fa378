//! berth-agent: Berth's privileged node daemon.
//!
//! - [`datapath`]: loads, pins and adopts the eBPF tc programs and maps; attaches them to pods.
//! - [`ipam`] and [`store`]: the node's pod addresses and the persisted endpoint registry.
//! - [`core`]: request handling (Allocate, CreateEndpoint, Release, Check, GC, Status) behind one
//!   lock, synchronous.
//! - [`server`]: the async edge: the local API on the agent socket (gRPC + the CNI's framed
//!   protocol).
//! - [`tunnel`] and [`node`]: the Konnectivity-compatible tunnel client, node registration,
//!   heartbeats and lifecycle commands.
//! - [`config`]: settings from flags, environment and `/etc/berth/agent.toml`.
//! - [`host`]: IPv4 forwarding and the CNI configuration installed once the agent serves.
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod host;
pub mod ipam;
pub mod links;
pub mod lock;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod policy;
pub mod routing;
pub mod server;
pub mod store;
pub mod tunnel;

pub use error::{Error, Result};
