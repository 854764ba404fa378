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
/// Map (LPM trie): address or CIDR (`aya` LPM key over a network-order `u32`) → [`IpcacheEntry`]:
/// where an address lives (which node hosts it) and, later, its security identity.
pub const MAP_IPCACHE: &str = "BERTH_IPCACHE";

/// Version of the map layouts as a whole. The agent records it next to the pins; a pin directory
/// written under another version has every map re-created (and repopulated from the agent's
/// registry and the cluster model) before the new programs are attached. Each pinned map is also
/// checked against the object's definition (type, key and value size, capacity), so a layout change
/// that forgot to bump this is still caught.
pub const LAYOUT_VERSION: u32 = 2;

/// tc ingress program on each pod's host-side veth: packets leaving the pod.
pub const PROG_FROM_POD: &str = "berth_from_pod";
/// tc egress program on each pod's host-side veth: packets from the host stack to the pod.
pub const PROG_TO_POD: &str = "berth_to_pod";
/// tc ingress program on the node's native device (uplink): native-routing receive, straight to
/// the destination pod.
pub const PROG_FROM_NETDEV: &str = "berth_from_netdev";
/// tc ingress program on the VXLAN device: decapsulated packets, straight to the destination pod.
pub const PROG_FROM_OVERLAY: &str = "berth_from_overlay";
/// tc egress program on the VXLAN device: sets the tunnel key (remote node) from the ipcache.
pub const PROG_TO_OVERLAY: &str = "berth_to_overlay";

/// Every map name userspace relies on.
pub const ALL_MAPS: [&str; 4] = [MAP_ENDPOINTS, MAP_METRICS, MAP_CONFIG, MAP_IPCACHE];
/// Every program name userspace relies on.
pub const ALL_PROGRAMS: [&str; 5] = [
    PROG_FROM_POD,
    PROG_TO_POD,
    PROG_FROM_NETDEV,
    PROG_FROM_OVERLAY,
    PROG_TO_OVERLAY,
];

/// Capacity of the endpoint map (pods per node, with head room over Kubernetes' 110 default).
pub const MAX_ENDPOINTS: u32 = 4096;
/// Capacity of the metrics map.
pub const MAX_METRICS: u32 = 65536;
/// Capacity of the ipcache (remote pod CIDRs now; every pod address and policy CIDR later).
pub const MAX_IPCACHE: u32 = 65536;

/// UDP port of the VXLAN overlay (Linux, flannel and Cilium use 8472; IANA's is 4789).
pub const VXLAN_PORT: u16 = 8472;
/// VNI carried by Berth's overlay packets (the receiving side accepts any: the device is
/// flow-based). NetworkPolicy will carry the source identity here, as Cilium does.
pub const VXLAN_VNI: u32 = 1;
/// Bytes VXLAN adds to every packet (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Routing modes (`DatapathConfig::routing_mode`).
pub mod routing_mode {
    /// Nodes share the private network: FIB lookup and redirect to the uplink.
    pub const NATIVE: u32 = 0;
    /// VXLAN overlay through one flow-based device.
    pub const VXLAN: u32 = 1;
}

/// ipcache flag: the prefix is a remote node's pod CIDR, reachable through `tunnel_endpoint`.
pub const IPCACHE_FLAG_REMOTE_PODS: u32 = 1;

/// Value of the ipcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    /// IPv4 address (network byte order, as read from a packet) of the node that hosts the
    /// prefix: the VXLAN remote, or the native next hop.
    pub tunnel_endpoint: u32,
    /// Security identity of the prefix (0: not yet assigned; NetworkPolicy fills it).
    pub identity: u32,
    /// `IPCACHE_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 16);

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
    /// ARP whose sender address or MAC is not the endpoint's own (ARP spoofing).
    pub const ARP_SPOOFED: u32 = 5;
    /// IPv6 from a pod (not supported yet; also keeps router advertisements out of the node).
    pub const IPV6: u32 = 6;
    /// An ethertype the datapath does not forward (VLAN tags, LLDP, ...).
    pub const UNSUPPORTED_ETHERTYPE: u32 = 7;
    /// A remote pod CIDR is known but the overlay has no tunnel endpoint for the destination.
    pub const NO_TUNNEL_ENDPOINT: u32 = 8;
    /// Setting the tunnel key failed.
    pub const TUNNEL_KEY_FAILED: u32 = 9;
    /// Number of reasons (for iteration in userspace).
    pub const COUNT: u32 = 10;

    /// Human-readable reason name.
    pub fn name(reason: u32) -> &'static str {
        match reason {
            MALFORMED => "malformed",
            SPOOFED_SOURCE => "spoofed-source",
            ENDPOINT_NOT_READY => "endpoint-not-ready",
            REDIRECT_FAILED => "redirect-failed",
            ARP_SPOOFED => "arp-spoofed",
            IPV6 => "ipv6",
            UNSUPPORTED_ETHERTYPE => "unsupported-ethertype",
            NO_TUNNEL_ENDPOINT => "no-tunnel-endpoint",
            TUNNEL_KEY_FAILED => "tunnel-key-failed",
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

/// Metrics of the node's own devices (uplink, VXLAN) are kept under this endpoint ID.
pub const NODE_METRICS_ID: u32 = 0;

/// Global datapath settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Non-zero: drop packets whose source is not the sending endpoint's address.
    pub anti_spoof: u32,
    /// `routing_mode::*`.
    pub routing_mode: u32,
    /// ifindex of the VXLAN device (overlay mode), else 0.
    pub vxlan_ifindex: u32,
    /// ifindex of the native device (uplink).
    pub uplink_ifindex: u32,
    /// This node's address on the private network (network byte order).
    pub node_ip: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 24);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, fully initialised with explicit padding fields.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::MetricKey {}
    unsafe impl aya::Pod for super::MetricValue {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::IpcacheEntry {}
}
