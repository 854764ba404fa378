//! berth-controlplane: the provider side the node suite talks to (tunnel server, node lifecycle
//! controller, OpenStack API simulator).
pub mod error;
pub mod lifecycle;
pub mod openstack;
pub mod serve;
pub mod status;
pub mod tunnel;

pub use error::{Error, Result};
