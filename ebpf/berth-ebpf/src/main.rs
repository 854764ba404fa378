//! Berth's tc datapath.
//!
//! * `berth_from_pod` — tc ingress on each pod's host-side veth (packets the pod sends). Checks the
//!   source against the endpoint map (anti-spoofing), counts, and when the destination is another
//!   pod on this node rewrites the Ethernet header and hands the packet straight to that pod's
//!   interface with `bpf_redirect_peer` (no bridge, no iptables, no host routing). Anything else
//!   continues into the host stack (host routing, later: cross-node routing).
//! * `berth_to_pod` — tc egress on the host-side veth (packets the host stack sends to the pod):
//!   counts them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect_peer,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuHashMap},
    programs::TcContext,
};
use berth_ebpf_common::{
    DatapathConfig, EP_FLAG_READY, EndpointInfo, MAX_ENDPOINTS, MAX_METRICS, MetricKey,
    MetricValue, drop_reason, metric,
};

#[map(name = "BERTH_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map(name = "BERTH_METRICS")]
static METRICS: PerCpuHashMap<MetricKey, MetricValue> = PerCpuHashMap::pinned(MAX_METRICS, 0);

#[map(name = "BERTH_CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const OFF_ETHERTYPE: usize = 12;
const OFF_SADDR: usize = ETH_HLEN + 12;
const OFF_DADDR: usize = ETH_HLEN + 16;

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

#[classifier]
pub fn berth_from_pod(mut ctx: TcContext) -> i32 {
    from_pod(&mut ctx)
}

#[inline(always)]
fn from_pod(ctx: &mut TcContext) -> i32 {
    let len = ctx.len() as u64;
    let Ok(ethertype) = ctx.load::<u16>(OFF_ETHERTYPE) else {
        return drop_packet(0, drop_reason::MALFORMED, len);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        // ARP, IPv6 neighbour discovery...: the host stack handles them.
        return TC_ACT_OK;
    }
    if (len as usize) < ETH_HLEN + IPV4_MIN_HLEN {
        return drop_packet(0, drop_reason::MALFORMED, len);
    }
    let (Ok(saddr), Ok(daddr)) = (ctx.load::<u32>(OFF_SADDR), ctx.load::<u32>(OFF_DADDR)) else {
        return drop_packet(0, drop_reason::MALFORMED, len);
    };

    let anti_spoof = match CONFIG.get(0) {
        Some(c) => c.anti_spoof != 0,
        None => true,
    };
    let src = unsafe { ENDPOINTS.get(&saddr) };
    let src_id = match src {
        Some(ep) if ep.ifindex == ifindex(ctx) => ep.endpoint_id,
        _ => {
            if anti_spoof {
                return drop_packet(0, drop_reason::SPOOFED_SOURCE, len);
            }
            0
        }
    };
    count(src_id, metric::TX, len);

    let Some(dst) = (unsafe { ENDPOINTS.get(&daddr) }) else {
        // Not a pod on this node: host routing takes it from here.
        return TC_ACT_OK;
    };
    if dst.flags & EP_FLAG_READY == 0 {
        return drop_packet(dst.endpoint_id, drop_reason::ENDPOINT_NOT_READY, len);
    }
    let dst = *dst;
    // Ethernet header as the destination pod expects it: to its MAC, from its host-side veth.
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

#[classifier]
pub fn berth_to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    if let Ok(ethertype) = ctx.load::<u16>(OFF_ETHERTYPE)
        && u16::from_be(ethertype) == ETH_P_IP
        && let Ok(daddr) = ctx.load::<u32>(OFF_DADDR)
        && let Some(ep) = unsafe { ENDPOINTS.get(&daddr) }
    {
        count(ep.endpoint_id, metric::RX, len);
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
