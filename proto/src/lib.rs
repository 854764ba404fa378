//! Generated protobuf and gRPC types for Berth.
//!
//! - [`agent`]: Berth's local agent API (`berth.agent.v1`), served on the agent's unix socket to
//!   the CNI plugin and `berthctl`.
//! - [`konnectivity`]: the Konnectivity agent and client protocols (no proto package:
//!   `/AgentService/Connect`, `/ProxyService/Proxy`).
//! - [`node`]: Berth's node API (`berth.node.v1`): registration, heartbeats, lifecycle commands.
//! - [`csi`]: the Container Storage Interface (`csi.v1`, wire shape of CSI spec v1.12), served by
//!   `berth-csi`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Berth's local agent API (`berth.agent.v1`).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/berth.agent.v1.rs"));
}

/// Container Storage Interface (`csi.v1`), wire shape of CSI spec v1.12.
pub mod csi {
    include!(concat!(env!("OUT_DIR"), "/csi.v1.rs"));
}

/// The Konnectivity services' lenient gRPC codec (a malformed frame must not end the stream).
#[cfg(feature = "grpc")]
pub mod codec;

/// The Konnectivity protocol (package-less proto: `/AgentService/Connect`, `/ProxyService/Proxy`).
pub mod konnectivity {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Berth's node API (`berth.node.v1`): registration, heartbeats and lifecycle commands.
pub mod node {
    include!(concat!(env!("OUT_DIR"), "/berth.node.v1.rs"));
}
