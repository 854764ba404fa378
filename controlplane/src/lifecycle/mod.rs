//! Node registration and lifecycle: the pure state machine ([`machine`]), what is stored and
//! where ([`state`]), the storage seam with its etcd and in-memory stores ([`store`]), a
//! replica's copy of the store ([`cache`]), the decisions over a working copy ([`model`]), the
//! registry with leader election ([`registry`]) and the gRPC `berth.node.v1.NodeService`
//! ([`service`]).
pub mod cache;
pub mod machine;
pub mod model;
pub mod registry;
pub mod service;
pub mod state;
pub mod store;

pub use machine::{NodeState, Plan, Timers};
pub use registry::{LifecycleConfig, Registry};
pub use state::{ProvisionRecord, ProvisionRequest, Strategy, UpgradeRequest};
