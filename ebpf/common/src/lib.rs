//! Types shared between Berth's eBPF programs (`berth-ebpf`) and userspace (`berth-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, has no `bool`, and its size is
//! asserted at compile time so the kernel and userspace layouts cannot drift apart. Map and
//! program names are constants; a test checks them against the built object.
#![no_std]

/// Map: pod IPv4 address (network byte order, as `u32` read from the packet) → [`EndpointInfo`].
pub const MAP_ENDPOINTS: &str = "BERTH_ENDPOINTS";
/// Map: [`MetricKey`] → [`MetricValue`] (per-CPU hash).
pub const MAP_METRICS: &str = "BERTH_METRICS";
/// Map: index 0 → [`DatapathConfig`] (array).
pub const MAP_CONFIG: &str = "BERTH_CONFIG";

/// tc ingress program on each pod's host-side veth: packets leaving the pod.
pub const PROG_FROM_POD: &str = "berth_from_pod";
/// tc egress program on each pod's host-side veth: packets from the host stack to the pod.
pub const PROG_TO_POD: &str = "berth_to_pod";

/// Every map name userspace relies on.
pub const ALL_MAPS: [&str; 3] = [MAP_ENDPOINTS, MAP_METRICS, MAP_CONFIG];
/// Every program name userspace relies on.
pub const ALL_PROGRAMS: [&str; 2] = [PROG_FROM_POD, PROG_TO_POD];

/// Capacity of the endpoint map (pods per node, with head room over Kubernetes' 110 default).
pub const MAX_ENDPOINTS: u32 = 4096;
/// Capacity of the metrics map.
pub const MAX_METRICS: u32 = 65536;

/// Endpoint flag: the datapath may deliver to this endpoint.
pub const EP_FLAG_READY: u32 = 1;

/// Where a pod lives, as the datapath needs it for redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth.
    pub ifindex: u32,
    /// Berth endpoint ID (also the metrics key).
    pub endpoint_id: u32,
    /// `EP_FLAG_*` bits.
    pub flags: u32,
    /// MAC address of the pod's interface.
    pub pod_mac: [u8; 6],
    /// MAC address of the host-side veth.
    pub host_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 24);

/// What a metric entry counts.
pub mod metric {
    /// Packets the endpoint sent (seen on its host-side veth ingress).
    pub const TX: u32 = 0;
    /// Packets delivered to the endpoint (redirect from a local pod, or from the host).
    pub const RX: u32 = 1;
    /// Drops start here: `DROP_BASE + reason`.
    pub const DROP_BASE: u32 = 16;
}

/// Drop reasons, recorded as `metric::DROP_BASE + reason`.
pub mod drop_reason {
    /// Packet too short for the headers it claims.
    pub const MALFORMED: u32 = 1;
    /// IPv4 source does not belong to the endpoint on this interface (spoofing).
    pub const SPOOFED_SOURCE: u32 = 2;
    /// Destination endpoint exists but is not ready.
    pub const ENDPOINT_NOT_READY: u32 = 3;
    /// bpf_redirect failed.
    pub const REDIRECT_FAILED: u32 = 4;
    /// Number of reasons (for iteration in userspace).
    pub const COUNT: u32 = 5;

    /// Human-readable reason name.
    pub fn name(reason: u32) -> &'static str {
        match reason {
            MALFORMED => "malformed",
            SPOOFED_SOURCE => "spoofed-source",
            ENDPOINT_NOT_READY => "endpoint-not-ready",
            REDIRECT_FAILED => "redirect-failed",
            _ => "unknown",
        }
    }
}

/// Key of the metrics map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MetricKey {
    pub endpoint_id: u32,
    /// `metric::TX`, `metric::RX` or `metric::DROP_BASE + reason`.
    pub kind: u32,
}
const _: () = assert!(core::mem::size_of::<MetricKey>() == 8);

/// Value of the metrics map (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricValue>() == 16);

/// Global datapath settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Non-zero: drop packets whose source is not the sending endpoint's address.
    pub anti_spoof: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, fully initialised with explicit padding fields.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::MetricKey {}
    unsafe impl aya::Pod for super::MetricValue {}
    unsafe impl aya::Pod for super::DatapathConfig {}
}
