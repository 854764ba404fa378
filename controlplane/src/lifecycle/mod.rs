//! Node registration and lifecycle: the pure state machine ([`machine`]), the registry and
//! controller ([`registry`]) and the gRPC `berth.node.v1.NodeService` ([`service`]).
pub mod machine;
pub mod registry;
pub mod service;

pub use machine::{NodeState, Plan, Timers};
pub use registry::{LifecycleConfig, ProvisionRequest, Registry, Strategy, UpgradeRequest};
