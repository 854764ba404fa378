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
/// where an address lives (which node hosts it) and its security identity. Two writers own
/// disjoint keys: the routing reconciler the nodes' pod CIDRs (identity 0), the policy reconciler
/// the `/32` of every pod, node and host address (identity and hosting node).
pub const MAP_IPCACHE: &str = "BERTH_IPCACHE";
/// Map (LPM trie): [`PolicyKey`] → [`PolicyValue`]: what each local endpoint allows, per
/// direction, peer identity, protocol and destination port prefix.
pub const MAP_POLICY: &str = "BERTH_POLICY";
/// Map (LPM trie): [`CidrKey`] → CIDR identity (`u32`): the `ipBlock` prefixes of each endpoint
/// and direction; the identity found keys [`MAP_POLICY`] like a pod identity.
pub const MAP_POLICY_CIDR: &str = "BERTH_POLICY_CIDR";
/// Map (hash): endpoint ID → [`EndpointPolicy`]: whether each direction is isolated.
pub const MAP_POLICY_STATE: &str = "BERTH_POLICY_STATE";
/// Map (LRU hash): [`CtKey`] → [`CtValue`]: the connection-tracking table (DESIGN §8: shared by
/// policy, services and masquerade).
pub const MAP_CONNTRACK: &str = "BERTH_CT";
/// Map (ring buffer): [`PolicyEvent`]s for `berthctl monitor`.
pub const MAP_EVENTS: &str = "BERTH_EVENTS";

/// Version of the map layouts as a whole. The agent records it next to the pins; a pin directory
/// written under another version has every map re-created (and repopulated from the agent's
/// registry and the cluster model) before the new programs are attached. Each pinned map is also
/// checked against the object's definition (type, key and value size, capacity), so a layout change
/// that forgot to bump this is still caught.
pub const LAYOUT_VERSION: u32 = 3;

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
pub const ALL_MAPS: [&str; 9] = [
    MAP_ENDPOINTS,
    MAP_METRICS,
    MAP_CONFIG,
    MAP_IPCACHE,
    MAP_POLICY,
    MAP_POLICY_CIDR,
    MAP_POLICY_STATE,
    MAP_CONNTRACK,
    MAP_EVENTS,
];
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
/// Capacity of the ipcache (node pod CIDRs, every pod, node and host address of the cluster).
pub const MAX_IPCACHE: u32 = 65536;
/// Capacity of the policy map (entries of every local endpoint; a port range takes one entry per
/// aligned block).
pub const MAX_POLICY: u32 = 262144;
/// Capacity of the per-endpoint CIDR map.
pub const MAX_POLICY_CIDR: u32 = 65536;
/// Default capacity of the conntrack table; the agent sizes it from the node's memory
/// (`--conntrack-max` overrides).
pub const DEFAULT_CT_MAX: u32 = 262144;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

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

/// Reserved security identities (the agent's policy engine uses the same numbers).
pub mod identity {
    /// A policy entry for any peer (a rule without `from`/`to`).
    pub const WILDCARD: u32 = 0;
    /// This node's own stack.
    pub const HOST: u32 = 1;
    /// Any address the ipcache does not know.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = 3;
}

/// Policy directions (`PolicyKey::direction`, `PolicyEvent::direction`).
pub mod direction {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// Bits of the LPM key data of [`PolicyKey`] before the port (endpoint 32, direction 8, protocol
/// 8, padding 16, identity 32): an entry's prefix length is this plus its port prefix length.
pub const POLICY_KEY_FIXED_BITS: u32 = 96;

/// Key of [`MAP_POLICY`] (the data of an LPM key). `port` is in network byte order so that a port
/// range stored as aligned prefixes matches by longest prefix; protocol 0 means every protocol
/// (and then the port prefix length is 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub _pad: u16,
    pub identity: u32,
    /// Destination port, network byte order.
    pub port: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);

/// Value of [`MAP_POLICY`]: an allow entry. `flags` is reserved (0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

/// Bits of the LPM key data of [`CidrKey`] before the address.
pub const CIDR_KEY_FIXED_BITS: u32 = 64;

/// Key of [`MAP_POLICY_CIDR`] (the data of an LPM key): the endpoint, the direction and the peer
/// address (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<CidrKey>() == 12);

/// [`EndpointPolicy::flags`]: ingress is isolated (only policy entries pass).
pub const POLICY_INGRESS_ISOLATED: u32 = 1;
/// [`EndpointPolicy::flags`]: egress is isolated.
pub const POLICY_EGRESS_ISOLATED: u32 = 2;

/// Value of [`MAP_POLICY_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub flags: u32,
    /// The endpoint's own security identity.
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointPolicy>() == 8);

/// Key of the conntrack table: the connection as its first packet saw it. For ICMP echo, `sport`
/// and `dport` both hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// Conntrack state bits (`CtValue::state`).
pub mod ct_state {
    /// The reply direction has been seen.
    pub const REPLIED: u32 = 1;
    /// TCP: a FIN from the originator.
    pub const FIN_ORIG: u32 = 2;
    /// TCP: a FIN from the replier.
    pub const FIN_REPLY: u32 = 4;
    /// TCP: a RST from either side.
    pub const RST: u32 = 8;
}

/// Conntrack timeouts in seconds (Cilium's and netfilter's defaults, rounded).
pub mod ct_timeout {
    /// TCP after the reply was seen and before any FIN/RST (Cilium: 6 h).
    pub const TCP_ESTABLISHED: u64 = 21600;
    /// TCP before the reply (SYN sent).
    pub const TCP_OPENING: u64 = 60;
    /// TCP after a RST or FINs from both sides.
    pub const TCP_CLOSING: u64 = 10;
    /// Other protocols before a reply.
    pub const OTHER: u64 = 60;
    /// Other protocols once both directions were seen (netfilter's UDP stream: 120 s).
    pub const OTHER_REPLIED: u64 = 180;
}

/// Value of the conntrack table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The policy revision ([`DatapathConfig::policy_revision`]) the connection was last allowed
    /// under; an entry of another revision is checked against the policy again.
    pub policy_revision: u32,
    /// `ct_state` bits.
    pub state: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 16);

/// Verdicts of [`PolicyEvent`].
pub mod verdict {
    pub const DENIED: u8 = 0;
    pub const ALLOWED: u8 = 1;
}

/// A policy verdict, sent through [`MAP_EVENTS`]: every denied packet, and every new allowed
/// connection when [`DatapathConfig::event_flags`] asks for them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    pub timestamp_ns: u64,
    /// Endpoint whose policy decided (the sender for egress, the receiver for ingress).
    pub endpoint_id: u32,
    /// Source and destination of the packet (network byte order).
    pub saddr: u32,
    pub daddr: u32,
    /// Identity of the other end, as the deciding node saw it.
    pub peer_identity: u32,
    /// Ports, network byte order.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// `verdict::*`.
    pub verdict: u8,
    /// `direction::*` of the deciding side.
    pub direction: u8,
    pub _pad: u8,
    /// `drop_reason::*` for a denial, 0 for an allowed connection.
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 40);

/// [`DatapathConfig::event_flags`]: emit an event for every new allowed connection too.
pub const EVENTS_ALLOWED: u32 = 1;

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
    /// New connections the policy allowed (per endpoint that decided).
    pub const POLICY_ALLOWED: u32 = 2;
    /// Conntrack insertions that failed (the packet passed; the next one is checked again).
    pub const CT_INSERT_FAILED: u32 = 3;
    /// Events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 4;
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
    /// The receiving endpoint's ingress policy denies the connection.
    pub const POLICY_DENIED_INGRESS: u32 = 10;
    /// The sending endpoint's egress policy denies the connection.
    pub const POLICY_DENIED_EGRESS: u32 = 11;
    /// A later IPv4 fragment (no L4 header) to or from an isolated endpoint.
    pub const POLICY_FRAGMENT: u32 = 12;
    /// Number of reasons (for iteration in userspace).
    pub const COUNT: u32 = 13;

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
            POLICY_DENIED_INGRESS => "policy-denied-ingress",
            POLICY_DENIED_EGRESS => "policy-denied-egress",
            POLICY_FRAGMENT => "policy-fragment",
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
    /// Bumped by the agent after every policy change: conntrack entries of another revision are
    /// checked against the policy again (an established connection the new policy denies stops).
    pub policy_revision: u32,
    /// `EVENTS_*` bits.
    pub event_flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, fully initialised with explicit padding fields.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::MetricKey {}
    unsafe impl aya::Pod for super::MetricValue {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::IpcacheEntry {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::EndpointPolicy {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::PolicyEvent {}
}
