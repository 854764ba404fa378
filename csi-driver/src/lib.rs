//! berth-csi: CSI Identity/Controller/Node services backed by OpenStack Cinder and Nova, a
//! drop-in replacement for cloud-provider-openstack's cinder-csi-plugin (same driver name,
//! topology key and StorageClass parameters) with a 100-volume-per-node cap.
pub mod caps;
pub mod config;
pub mod controller;
pub mod error;
pub mod host;
pub mod identity;
pub mod inflight;
pub mod metadata;
pub mod node;
pub mod openstack;
pub mod server;

pub use error::{Error, Result};

/// CSI driver name, as cinder-csi-plugin.
pub const DRIVER_NAME: &str = "cinder.csi.openstack.org";
/// Topology key, as cinder-csi-plugin.
pub const TOPOLOGY_KEY: &str = "topology.cinder.csi.openstack.org/zone";
