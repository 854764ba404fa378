//! Connection tracking and the NetworkPolicy verdict (DESIGN §8 "conntrack", "policy verdict").
//!
//! A packet is first looked up in the conntrack table, as it is (a later packet of a connection
//! this node allowed) and reversed (a reply). A hit of the current policy revision passes. A miss,
//! or a hit of another revision (the policy changed since), is checked against the policy of the
//! local endpoints the packet concerns at this point — the sender's egress when the sender is a
//! local pod, the receiver's ingress when the receiver is one — for the connection's original
//! direction. An allowed new connection is recorded; a denied one is dropped, counted and
//! reported on the event ring buffer; an established connection the new policy denies has its
//! entry removed, so it stops.
//!
//! One side's verdict: not isolated → allowed. Isolated → one of at most six longest-prefix
//! lookups in the policy map must hit: (peer identity | CIDR identity of the peer's address |
//! wildcard) × (protocol | any protocol), each with the destination port as the last 16 bits.
use aya_ebpf::{helpers::r#gen::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext};
use berth_ebpf_common::{
    CIDR_KEY_FIXED_BITS, CidrKey, CtKey, CtValue, EVENTS_ALLOWED, POLICY_EGRESS_ISOLATED,
    POLICY_INGRESS_ISOLATED, POLICY_KEY_FIXED_BITS, PolicyEvent, PolicyKey, ct_state, ct_timeout,
    direction, drop_reason, identity, metric, verdict,
};

use crate::{CONNTRACK, ETH_HLEN, EVENTS, IPCACHE, Ipv4, POLICY, POLICY_CIDR, POLICY_STATE, count};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS: u64 = 1_000_000_000;

/// The L4 view of a packet.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    /// Network byte order (ICMP echo: the identifier, in both).
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// A later fragment: no L4 header, no ports.
    pub fragment: bool,
}

impl Flow {
    fn reversed(&self) -> Flow {
        Flow {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }

    fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

/// Reads the ports (TCP, UDP, SCTP: the first four bytes of their headers) or the ICMP echo
/// identifier. Fails on a truncated header.
#[inline(always)]
pub fn parse_flow(ctx: &TcContext, ip: &Ipv4) -> Result<Flow, ()> {
    let mut f = Flow {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        protocol: ip.protocol,
        tcp_flags: 0,
        fragment: ip.later_fragment,
    };
    if ip.later_fragment {
        return Ok(f);
    }
    let l4 = ETH_HLEN + ip.hlen;
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            f.sport = ctx.load::<u16>(l4).map_err(|_| ())?;
            f.dport = ctx.load::<u16>(l4 + 2).map_err(|_| ())?;
            if ip.protocol == IPPROTO_TCP {
                f.tcp_flags = ctx.load::<u8>(l4 + 13).map_err(|_| ())?;
            }
        }
        IPPROTO_ICMP => {
            let ty: u8 = ctx.load(l4).map_err(|_| ())?;
            // Echo request (8) and reply (0) are tracked by identifier; other types (errors)
            // by addresses alone.
            if ty == 8 || ty == 0 {
                let id = ctx.load::<u16>(l4 + 4).map_err(|_| ())?;
                f.sport = id;
                f.dport = id;
            }
        }
        _ => {}
    }
    Ok(f)
}

/// The local endpoints a packet concerns at an enforcement point, with their policy state.
#[derive(Clone, Copy)]
pub struct Sides {
    /// The sending pod, when it is a local endpoint whose packet this program sees leave it.
    pub src: Option<u32>,
    /// The receiving pod, when it is a local endpoint this program delivers to.
    pub dst: Option<u32>,
}

/// Identity of an address as this node knows it (ipcache; unknown → world).
#[inline(always)]
fn identity_of(addr: u32) -> u32 {
    match IPCACHE.get(&Key::new(32, addr)) {
        Some(e) if e.identity != 0 => e.identity,
        _ => identity::WORLD,
    }
}

#[inline(always)]
fn policy_hit(ep: u32, dir: u8, proto: u8, id: u32, port: u16, prefix: u32) -> bool {
    let key = PolicyKey {
        endpoint_id: ep,
        direction: dir,
        protocol: proto,
        _pad: 0,
        identity: id,
        port,
        _pad2: 0,
    };
    POLICY.get(&Key::new(prefix, key)).is_some()
}

/// Whether one side (endpoint `ep`, direction `dir`) allows a connection with the peer at
/// `peer_addr` of identity `peer_id` to destination port `port` (network order).
#[inline(always)]
fn side_allows(ep: u32, dir: u8, peer_addr: u32, peer_id: u32, flow: &Flow) -> bool {
    let isolated = match unsafe { POLICY_STATE.get(&ep) } {
        Some(s) => {
            s.flags
                & if dir == direction::INGRESS {
                    POLICY_INGRESS_ISOLATED
                } else {
                    POLICY_EGRESS_ISOLATED
                }
                != 0
        }
        None => false,
    };
    if !isolated {
        return true;
    }
    let full = POLICY_KEY_FIXED_BITS + 16;
    let port = flow.dport;
    let proto = flow.protocol;
    // Ports mean something for TCP, UDP and SCTP only; other protocols match entries for every
    // protocol alone.
    let l4 = proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
    if l4
        && (policy_hit(ep, dir, proto, peer_id, port, full)
            || policy_hit(ep, dir, proto, identity::WILDCARD, port, full))
    {
        return true;
    }
    if policy_hit(ep, dir, 0, peer_id, 0, full)
        || policy_hit(ep, dir, 0, identity::WILDCARD, 0, full)
    {
        return true;
    }
    let ck = CidrKey {
        endpoint_id: ep,
        direction: dir,
        _pad: [0; 3],
        addr: peer_addr,
    };
    if let Some(cid) = POLICY_CIDR.get(&Key::new(CIDR_KEY_FIXED_BITS + 32, ck)) {
        let cid = *cid;
        if (l4 && policy_hit(ep, dir, proto, cid, port, full))
            || policy_hit(ep, dir, 0, cid, 0, full)
        {
            return true;
        }
    }
    false
}

#[inline(always)]
fn isolated_any(ep: Option<u32>, bit: u32) -> bool {
    match ep {
        Some(id) => match unsafe { POLICY_STATE.get(&id) } {
            Some(s) => s.flags & bit != 0,
            None => false,
        },
        None => false,
    }
}

/// The verdict for a connection `orig` (its original direction) whose sender is the local
/// endpoint `src` (if any) and receiver the local endpoint `dst` (if any). `host_src`: the
/// packet came from this node's own stack (identity host whatever its address).
/// Returns 0 when allowed, else the drop reason, with the deciding endpoint and direction.
#[inline(always)]
fn evaluate(orig: &Flow, src: Option<u32>, dst: Option<u32>, host_src: bool) -> (u32, u32, u8) {
    if let Some(ep) = src {
        let peer_id = identity_of(orig.daddr);
        if !side_allows(ep, direction::EGRESS, orig.daddr, peer_id, orig) {
            return (drop_reason::POLICY_DENIED_EGRESS, ep, direction::EGRESS);
        }
    }
    if let Some(ep) = dst {
        let peer_id = if host_src {
            identity::HOST
        } else {
            identity_of(orig.saddr)
        };
        if !side_allows(ep, direction::INGRESS, orig.saddr, peer_id, orig) {
            return (drop_reason::POLICY_DENIED_INGRESS, ep, direction::INGRESS);
        }
    }
    (0, 0, 0)
}

#[inline(always)]
fn timeout_s(protocol: u8, state: u32) -> u64 {
    if protocol == IPPROTO_TCP {
        if state & ct_state::RST != 0
            || state & (ct_state::FIN_ORIG | ct_state::FIN_REPLY)
                == (ct_state::FIN_ORIG | ct_state::FIN_REPLY)
        {
            ct_timeout::TCP_CLOSING
        } else if state & ct_state::REPLIED != 0 {
            ct_timeout::TCP_ESTABLISHED
        } else {
            ct_timeout::TCP_OPENING
        }
    } else if state & ct_state::REPLIED != 0 {
        ct_timeout::OTHER_REPLIED
    } else {
        ct_timeout::OTHER
    }
}

#[inline(always)]
fn emit(flow: &Flow, ep: u32, dir: u8, verdict_: u8, reason: u32, now: u64) {
    let peer = if dir == direction::INGRESS {
        flow.saddr
    } else {
        flow.daddr
    };
    let ev = PolicyEvent {
        timestamp_ns: now,
        endpoint_id: ep,
        saddr: flow.saddr,
        daddr: flow.daddr,
        peer_identity: identity_of(peer),
        sport: flow.sport,
        dport: flow.dport,
        protocol: flow.protocol,
        verdict: verdict_,
        direction: dir,
        _pad: 0,
        reason,
    };
    if EVENTS.output(&ev, 0).is_err() {
        count(ep, metric::EVENTS_LOST, 0);
    }
}

/// The policy and conntrack step of every enforcement point. Returns 0 to let the packet go on,
/// or the drop reason (already counted and reported) and the endpoint to count it under.
#[inline(always)]
pub fn enforce(flow: &Flow, sides: Sides, host_src: bool, revision: u32, event_flags: u32) -> u32 {
    if sides.src.is_none() && sides.dst.is_none() {
        return 0;
    }
    if flow.fragment {
        // No ports to track or match: only an endpoint without isolation takes it.
        if isolated_any(sides.src, POLICY_EGRESS_ISOLATED)
            || isolated_any(sides.dst, POLICY_INGRESS_ISOLATED)
        {
            return drop_reason::POLICY_FRAGMENT;
        }
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = flow.ct_key();
    let rev = flow.reversed().ct_key();
    // Which entry (if any) and in which direction.
    let mut reply = false;
    let mut entry = CONNTRACK.get_ptr_mut(&fwd);
    if entry.is_none() {
        entry = CONNTRACK.get_ptr_mut(&rev);
        reply = entry.is_some();
    }
    if let Some(e) = entry {
        let v = unsafe { *e };
        let expired = now.saturating_sub(v.last_seen_ns) > timeout_s(flow.protocol, v.state) * NS;
        // A new TCP connection (SYN without ACK) on a closing entry starts afresh.
        let reopened = flow.protocol == IPPROTO_TCP
            && !reply
            && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && v.state & (ct_state::RST | ct_state::FIN_ORIG | ct_state::FIN_REPLY) != 0;
        if !expired && !reopened {
            if v.policy_revision != revision {
                // The policy changed: check the connection again, in its original direction.
                let (orig, s, d) = if reply {
                    (flow.reversed(), sides.dst, sides.src)
                } else {
                    (*flow, sides.src, sides.dst)
                };
                let (reason, ep, dir) = evaluate(&orig, s, d, host_src && !reply);
                if reason != 0 {
                    let _ = CONNTRACK.remove(if reply { &rev } else { &fwd });
                    emit(flow, ep, dir, verdict::DENIED, reason, now);
                    return reason;
                }
            }
            let mut state = v.state;
            if reply {
                state |= ct_state::REPLIED;
            }
            if flow.protocol == IPPROTO_TCP {
                if flow.tcp_flags & TCP_RST != 0 {
                    state |= ct_state::RST;
                }
                if flow.tcp_flags & TCP_FIN != 0 {
                    state |= if reply {
                        ct_state::FIN_REPLY
                    } else {
                        ct_state::FIN_ORIG
                    };
                }
            }
            if state != v.state
                || v.policy_revision != revision
                || now.saturating_sub(v.last_seen_ns) > NS
            {
                unsafe {
                    (*e).state = state;
                    (*e).policy_revision = revision;
                    (*e).last_seen_ns = now;
                }
            }
            return 0;
        }
        let _ = CONNTRACK.remove(if reply { &rev } else { &fwd });
    }
    // A new connection (or one this node lost track of): its first packet's direction.
    let (reason, ep, dir) = evaluate(flow, sides.src, sides.dst, host_src);
    if reason != 0 {
        emit(flow, ep, dir, verdict::DENIED, reason, now);
        return reason;
    }
    let mut state = 0;
    if flow.protocol == IPPROTO_TCP && flow.tcp_flags & TCP_RST != 0 {
        state |= ct_state::RST;
    }
    let v = CtValue {
        last_seen_ns: now,
        policy_revision: revision,
        state,
    };
    let decider = match (sides.src, sides.dst) {
        (Some(s), _) => s,
        (None, Some(d)) => d,
        _ => 0,
    };
    if CONNTRACK.insert(&fwd, &v, 0).is_err() {
        count(decider, metric::CT_INSERT_FAILED, 0);
    }
    count(decider, metric::POLICY_ALLOWED, 0);
    if event_flags & EVENTS_ALLOWED != 0 {
        let dir = if sides.src.is_some() {
            direction::EGRESS
        } else {
            direction::INGRESS
        };
        emit(flow, decider, dir, verdict::ALLOWED, 0, now);
    }
    0
}

/// The endpoint a policy drop is counted under.
#[inline(always)]
pub fn drop_owner(reason: u32, sides: Sides) -> u32 {
    let ep = if reason == drop_reason::POLICY_DENIED_EGRESS {
        sides.src
    } else {
        sides.dst.or(sides.src)
    };
    ep.unwrap_or(0)
}
