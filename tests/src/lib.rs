//! Helpers for Berth's privileged end-to-end tests. Every resource a test creates (network
//! namespaces, links, pin directories, loop devices, mounts) is owned by a guard that removes it on
//! drop, also when the test fails.
pub mod apiserver;
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod csi;
pub mod etcd;
pub mod manifests;
pub mod netns;
pub mod packaging;
pub mod policy_ref;
pub mod policy_scenarios;
pub mod replicas;
pub mod tunnel;
