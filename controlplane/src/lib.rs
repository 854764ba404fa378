//! berth-controlplane: the provider side the node suite talks to (tunnel server, node lifecycle
//! controller, OpenStack API simulator).
pub mod error;
pub mod openstack;

pub use error::{Error, Result};
