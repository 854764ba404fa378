//! Berth's tc datapath: one object, one program per attach point (DESIGN §8).
//!
//! * `berth_from_pod` — tc ingress on each pod's host-side veth (packets the pod sends). Every
//!   ethertype is handled on purpose: ARP is checked against the endpoint's address and MAC and
//!   answered here (no ARP spoofing, no proxy-ARP in the host), IPv6 and anything else is dropped
//!   and counted, IPv4 is parsed with its header length and fragments honoured. The source must be
//!   the endpoint's own address (anti-spoofing). Then: a pod on this node → Ethernet rewrite and
//!   `bpf_redirect_peer` (no bridge, no iptables, no host routing); a remote node's pod CIDR (from
//!   the ipcache) → native routing (kernel FIB lookup + redirect to the uplink, TTL decremented as
//!   a router would) or the VXLAN device; anything else continues into the host stack.
//! * `berth_to_pod` — tc egress on the host-side veth (packets the host stack sends to the pod):
//!   counts them.
//! * `berth_from_netdev` — tc ingress on the node's uplink: packets for a local pod (native
//!   routing from another node) go straight to the pod; everything else to the host stack.
//! * `berth_from_overlay` — tc ingress on the flow-based VXLAN device: decapsulated packets for a
//!   local pod go straight to the pod.
//! * `berth_to_overlay` — tc egress on the VXLAN device: sets the tunnel key (the remote node) from
//!   the ipcache, for pods' packets and for the host's own.
//!
//! Every IPv4 packet a pod sends, and every packet delivered to a pod (from a local pod, from
//! another node, from the host stack), goes through the conntrack and policy step of
//! [`policy::enforce`]: the sender's egress policy where the sender is a local pod, the
//! receiver's ingress policy where the receiver is one.
#![no_std]
#![no_main]

mod policy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key},
    helpers::{
        bpf_redirect_peer,
        r#gen::{
            bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_set_tunnel_key,
        },
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use berth_ebpf_common::{
    CidrKey, CtKey, CtValue, DEFAULT_CT_MAX, DatapathConfig, EP_FLAG_READY, EVENTS_BYTES,
    EndpointInfo, EndpointPolicy, IPCACHE_FLAG_REMOTE_PODS, IpcacheEntry, MAX_ENDPOINTS,
    MAX_IPCACHE, MAX_METRICS, MAX_POLICY, MAX_POLICY_CIDR, MetricKey, MetricValue, NODE_METRICS_ID,
    PolicyKey, PolicyValue, VXLAN_VNI, drop_reason, metric, routing_mode,
};
use policy::{Flow, Sides};

#[map(name = "BERTH_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map(name = "BERTH_METRICS")]
static METRICS: PerCpuHashMap<MetricKey, MetricValue> = PerCpuHashMap::pinned(MAX_METRICS, 0);

#[map(name = "BERTH_CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// LPM tries need BPF_F_NO_PREALLOC.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "BERTH_IPCACHE")]
static IPCACHE: LpmTrie<u32, IpcacheEntry> = LpmTrie::pinned(MAX_IPCACHE, BPF_F_NO_PREALLOC);

#[map(name = "BERTH_POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(MAX_POLICY, BPF_F_NO_PREALLOC);

#[map(name = "BERTH_POLICY_CIDR")]
static POLICY_CIDR: LpmTrie<CidrKey, u32> = LpmTrie::pinned(MAX_POLICY_CIDR, BPF_F_NO_PREALLOC);

#[map(name = "BERTH_POLICY_STATE")]
static POLICY_STATE: HashMap<u32, EndpointPolicy> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Its capacity is set by the agent at load time (scaled to the node's memory).
#[map(name = "BERTH_CT")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CT_MAX, 0);

#[map(name = "BERTH_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const OFF_ETHERTYPE: usize = 12;
const AF_INET: u8 = 2;

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

// ---------------------------------------------------------------------------------------------
// Metrics

#[inline(always)]
fn count(endpoint_id: u32, kind: u32, bytes: u64) {
    let key = MetricKey { endpoint_id, kind };
    if let Some(v) = METRICS.get_ptr_mut(&key) {
        // Per-CPU value: no other CPU writes this slot.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
    } else {
        let v = MetricValue { packets: 1, bytes };
        let _ = METRICS.insert(&key, &v, 0);
    }
}

#[inline(always)]
fn drop_packet(endpoint_id: u32, reason: u32, bytes: u64) -> i32 {
    count(endpoint_id, metric::DROP_BASE + reason, bytes);
    TC_ACT_SHOT
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn config() -> DatapathConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => DatapathConfig {
            anti_spoof: 1,
            ..DatapathConfig::default()
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded parsers

/// The parts of an IPv4 header the datapath uses.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub saddr: u32,
    pub daddr: u32,
    /// Header length in bytes (options included).
    pub hlen: usize,
    pub protocol: u8,
    /// True for every fragment but the first (no L4 header in it).
    pub later_fragment: bool,
}

/// Parses the IPv4 header after the Ethernet header: version 4, a header length of at least 20
/// bytes that fits in the packet (options honoured), a total length that covers the header and
/// fits in the packet.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Ipv4, ()> {
    let len = ctx.len() as usize;
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if vihl >> 4 != 4 {
        return Err(());
    }
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if hlen < 20 || ETH_HLEN + hlen > len {
        return Err(());
    }
    let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).map_err(|_| ())?) as usize;
    if tot_len < hlen || ETH_HLEN + tot_len > len {
        return Err(());
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
    Ok(Ipv4 {
        saddr: ctx.load(ETH_HLEN + 12).map_err(|_| ())?,
        daddr: ctx.load(ETH_HLEN + 16).map_err(|_| ())?,
        hlen,
        protocol: ctx.load(ETH_HLEN + 9).map_err(|_| ())?,
        later_fragment: frag & 0x1fff != 0,
    })
}

/// Decrements the IPv4 TTL as a router hop does (checksum updated). Fails when the TTL would
/// reach zero: the caller then hands the packet to the host stack, which answers with ICMP time
/// exceeded.
#[inline(always)]
fn decrement_ttl(ctx: &mut TcContext) -> Result<(), ()> {
    let ttl: u8 = ctx.load(ETH_HLEN + 8).map_err(|_| ())?;
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    if ttl <= 1 {
        return Err(());
    }
    let old = u16::from_ne_bytes([ttl, proto]) as u64;
    let new = u16::from_ne_bytes([ttl - 1, proto]) as u64;
    ctx.l3_csum_replace(ETH_HLEN + 10, old, new, 2)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN + 8, &(ttl - 1), 0).map_err(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Delivery to a local endpoint (the destination endpoint's program)

/// Hands a packet to local endpoint `dst`: Ethernet header as the pod expects it, straight into
/// its network namespace. `routed`: the packet crossed a router hop (from another node), so its
/// TTL is decremented.
#[inline(always)]
fn deliver(ctx: &mut TcContext, dst: &EndpointInfo, src_id: u32, routed: bool, len: u64) -> i32 {
    if dst.flags & EP_FLAG_READY == 0 {
        return drop_packet(dst.endpoint_id, drop_reason::ENDPOINT_NOT_READY, len);
    }
    if routed && decrement_ttl(ctx).is_err() {
        return TC_ACT_OK;
    }
    if ctx.store(0, &dst.pod_mac, 0).is_err() || ctx.store(6, &dst.host_mac, 0).is_err() {
        return drop_packet(src_id, drop_reason::MALFORMED, len);
    }
    let rc = unsafe { bpf_redirect_peer(dst.ifindex, 0) } as i32;
    if rc == TC_ACT_SHOT {
        return drop_packet(dst.endpoint_id, drop_reason::REDIRECT_FAILED, len);
    }
    count(dst.endpoint_id, metric::RX, len);
    rc
}

// ---------------------------------------------------------------------------------------------
// from_pod

#[classifier]
pub fn berth_from_pod(mut ctx: TcContext) -> i32 {
    from_pod(&mut ctx)
}

#[inline(always)]
fn from_pod(ctx: &mut TcContext) -> i32 {
    let len = ctx.len() as u64;
    let Ok(ethertype) = ctx.load::<u16>(OFF_ETHERTYPE) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => {}
        ETH_P_ARP => return arp_from_pod(ctx, len),
        // No IPv6 yet: keeps router advertisements and neighbour discovery out of the node.
        ETH_P_IPV6 => return drop_packet(NODE_METRICS_ID, drop_reason::IPV6, len),
        _ => return drop_packet(NODE_METRICS_ID, drop_reason::UNSUPPORTED_ETHERTYPE, len),
    }
    let Ok(ip) = parse_ipv4(ctx) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    };
    let cfg = config();
    let src = unsafe { ENDPOINTS.get(&ip.saddr) };
    let src_id = match src {
        Some(ep) if ep.ifindex == ifindex(ctx) => ep.endpoint_id,
        _ => {
            if cfg.anti_spoof != 0 {
                return drop_packet(NODE_METRICS_ID, drop_reason::SPOOFED_SOURCE, len);
            }
            NODE_METRICS_ID
        }
    };
    count(src_id, metric::TX, len);

    let Ok(flow) = policy::parse_flow(ctx, &ip) else {
        return drop_packet(src_id, drop_reason::MALFORMED, len);
    };
    let local_dst = unsafe { ENDPOINTS.get(&ip.daddr) }.copied();
    let sides = Sides {
        src: (src_id != NODE_METRICS_ID).then_some(src_id),
        dst: local_dst.map(|d| d.endpoint_id),
    };
    let reason = policy::enforce(&flow, sides, false, cfg.policy_revision, cfg.event_flags);
    if reason != 0 {
        return drop_packet(policy::drop_owner(reason, sides), reason, len);
    }

    if let Some(dst) = local_dst {
        return deliver(ctx, &dst, src_id, false, len);
    }
    let Some(remote) = IPCACHE.get(&Key::new(32, ip.daddr)) else {
        // Not a pod of the cluster: the host stack takes it from here.
        return TC_ACT_OK;
    };
    if remote.flags & IPCACHE_FLAG_REMOTE_PODS == 0 {
        return TC_ACT_OK;
    }
    if cfg.routing_mode == routing_mode::VXLAN {
        if cfg.vxlan_ifindex == 0 {
            return drop_packet(src_id, drop_reason::NO_TUNNEL_ENDPOINT, len);
        }
        if decrement_ttl(ctx).is_err() {
            return TC_ACT_OK;
        }
        // berth_to_overlay sets the tunnel key on the VXLAN device's egress.
        return unsafe { bpf_redirect(cfg.vxlan_ifindex, 0) } as i32;
    }
    route_native(ctx, &ip, len)
}

/// eBPF host routing: the kernel's FIB decides the egress device and next hop (the routes to
/// other nodes' pod CIDRs that the agent installs), the packet goes there without a trip through
/// the upper stack.
#[inline(always)]
fn route_native(ctx: &mut TcContext, ip: &Ipv4, len: u64) -> i32 {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex(ctx);
    p.__bindgen_anon_3.ipv4_src = ip.saddr;
    p.__bindgen_anon_4.ipv4_dst = ip.daddr;
    // tot_len 0: the kernel checks the packet against the egress MTU itself (GSO-aware).
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if decrement_ttl(ctx).is_err() {
                return TC_ACT_OK;
            }
            if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
                return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
            }
            unsafe { bpf_redirect(p.ifindex, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            if decrement_ttl(ctx).is_err() {
                return TC_ACT_OK;
            }
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = AF_INET as u32;
            nh.__bindgen_anon_1.ipv4_nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
            unsafe {
                bpf_redirect_neigh(
                    p.ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                ) as i32
            }
        }
        // Fragmentation needed, no route, forwarding disabled...: the host stack decides (and
        // answers with the right ICMP error).
        _ => TC_ACT_OK,
    }
}

/// ARP from a pod: the sender must be the endpoint itself (address, MAC and Ethernet source);
/// requests are answered here with the host-side veth's MAC, as the pod's gateway.
#[inline(always)]
fn arp_from_pod(ctx: &mut TcContext, len: u64) -> i32 {
    const A: usize = ETH_HLEN;
    if (len as usize) < A + 28 {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    }
    let (Ok(ptype), Ok(hlen), Ok(plen), Ok(oper)) = (
        ctx.load::<u16>(A + 2),
        ctx.load::<u8>(A + 4),
        ctx.load::<u8>(A + 5),
        ctx.load::<u16>(A + 6),
    ) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    };
    if u16::from_be(ptype) != ETH_P_IP || hlen != 6 || plen != 4 {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    }
    let (Ok(eth_src), Ok(sha), Ok(spa), Ok(tpa)) = (
        ctx.load::<[u8; 6]>(6),
        ctx.load::<[u8; 6]>(A + 8),
        ctx.load::<u32>(A + 14),
        ctx.load::<u32>(A + 24),
    ) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    };
    let Some(ep) = (unsafe { ENDPOINTS.get(&spa) }) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::ARP_SPOOFED, len);
    };
    let ep = *ep;
    if ep.ifindex != ifindex(ctx) || ep.pod_mac != sha || eth_src != sha {
        return drop_packet(NODE_METRICS_ID, drop_reason::ARP_SPOOFED, len);
    }
    count(ep.endpoint_id, metric::TX, len);
    if u16::from_be(oper) != 1 || tpa == spa {
        // A reply or a gratuitous announcement of the pod's own, correct binding.
        return TC_ACT_OK;
    }
    // Answer as the gateway: every address the pod asks for is behind the host-side veth.
    let reply: u16 = 2u16.to_be();
    if ctx.store(0, &sha, 0).is_err()
        || ctx.store(6, &ep.host_mac, 0).is_err()
        || ctx.store(A + 6, &reply, 0).is_err()
        || ctx.store(A + 8, &ep.host_mac, 0).is_err()
        || ctx.store(A + 14, &tpa, 0).is_err()
        || ctx.store(A + 18, &sha, 0).is_err()
        || ctx.store(A + 24, &spa, 0).is_err()
    {
        return drop_packet(ep.endpoint_id, drop_reason::MALFORMED, len);
    }
    count(ep.endpoint_id, metric::RX, len);
    unsafe { bpf_redirect(ep.ifindex, 0) as i32 }
}

// ---------------------------------------------------------------------------------------------
// to_pod

/// Packets the host stack sends to the pod (its own, and what it forwarded): counted, and
/// checked against the pod's ingress policy (the source's identity from the ipcache: the node's
/// own addresses are the host identity).
#[classifier]
pub fn berth_to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    if let Ok(ethertype) = ctx.load::<u16>(OFF_ETHERTYPE)
        && u16::from_be(ethertype) == ETH_P_IP
        && let Ok(ip) = parse_ipv4(&ctx)
        && let Some(ep) = unsafe { ENDPOINTS.get(&ip.daddr) }.copied()
    {
        let Ok(flow) = policy::parse_flow(&ctx, &ip) else {
            return drop_packet(ep.endpoint_id, drop_reason::MALFORMED, len);
        };
        if let Some(reason) = ingress_check(&flow, &ep) {
            return drop_packet(ep.endpoint_id, reason, len);
        }
        count(ep.endpoint_id, metric::RX, len);
    }
    TC_ACT_OK
}

/// The conntrack and ingress-policy step for a packet that arrives for local endpoint `dst`
/// from outside the node's pods (another node, the host stack).
#[inline(always)]
fn ingress_check(flow: &Flow, dst: &EndpointInfo) -> Option<u32> {
    let cfg = config();
    let sides = Sides {
        src: None,
        dst: Some(dst.endpoint_id),
    };
    let reason = policy::enforce(flow, sides, false, cfg.policy_revision, cfg.event_flags);
    (reason != 0).then_some(reason)
}

// ---------------------------------------------------------------------------------------------
// Native device and overlay

/// Packets that arrive from another node for a local pod go straight to it; anything else (the
/// node's own traffic, malformed packets) is the host stack's.
#[inline(always)]
fn from_outside(ctx: &mut TcContext) -> i32 {
    let len = ctx.len() as u64;
    match ctx.load::<u16>(OFF_ETHERTYPE) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => {}
        _ => return TC_ACT_OK,
    }
    let Ok(ip) = parse_ipv4(ctx) else {
        return TC_ACT_OK;
    };
    let Some(dst) = (unsafe { ENDPOINTS.get(&ip.daddr) }).copied() else {
        return TC_ACT_OK;
    };
    let Ok(flow) = policy::parse_flow(ctx, &ip) else {
        return drop_packet(dst.endpoint_id, drop_reason::MALFORMED, len);
    };
    if let Some(reason) = ingress_check(&flow, &dst) {
        return drop_packet(dst.endpoint_id, reason, len);
    }
    deliver(ctx, &dst, NODE_METRICS_ID, true, len)
}

#[classifier]
pub fn berth_from_netdev(mut ctx: TcContext) -> i32 {
    from_outside(&mut ctx)
}

#[classifier]
pub fn berth_from_overlay(mut ctx: TcContext) -> i32 {
    from_outside(&mut ctx)
}

/// Sets the tunnel key of a packet leaving through the flow-based VXLAN device: the remote is the
/// node that hosts the destination's pod CIDR.
#[classifier]
pub fn berth_to_overlay(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    match ctx.load::<u16>(OFF_ETHERTYPE) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => {}
        _ => return drop_packet(NODE_METRICS_ID, drop_reason::UNSUPPORTED_ETHERTYPE, len),
    }
    let Ok(ip) = parse_ipv4(&ctx) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::MALFORMED, len);
    };
    let Some(remote) = IPCACHE.get(&Key::new(32, ip.daddr)) else {
        return drop_packet(NODE_METRICS_ID, drop_reason::NO_TUNNEL_ENDPOINT, len);
    };
    if remote.tunnel_endpoint == 0 {
        return drop_packet(NODE_METRICS_ID, drop_reason::NO_TUNNEL_ENDPOINT, len);
    }
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = VXLAN_VNI;
    // The helper takes the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote.tunnel_endpoint);
    key.tunnel_ttl = 64;
    // The size up to `tunnel_label` is understood by every kernel since 4.x (5.15 included).
    const KEY_SIZE: u32 = 24;
    let rc = unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, KEY_SIZE, 0) };
    if rc != 0 {
        return drop_packet(NODE_METRICS_ID, drop_reason::TUNNEL_KEY_FAILED, len);
    }
    TC_ACT_OK
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
