//! Lowering an endpoint's compiled policy to the datapath's map entries (pure; the
//! [`super::reconcile`] module writes them by difference).
//!
//! - [`MAP_POLICY`](berth_ebpf_common::MAP_POLICY): one LPM entry per (direction, peer identity or
//!   wildcard, protocol or any, aligned port block); the prefix length is
//!   [`POLICY_KEY_FIXED_BITS`] plus the block's.
//! - [`MAP_POLICY_CIDR`](berth_ebpf_common::MAP_POLICY_CIDR): one LPM entry per `ipBlock` prefix of
//!   the direction ([`DirectionPolicy::cidr_lpm`]), valued with a *CIDR identity* that is local to
//!   the endpoint and direction (high bit set, so it never equals a label identity); the
//!   (protocol, ports) of every covering prefix become policy entries for that identity.
use super::{Direction, DirectionPolicy, EndpointPolicy, Entry, Peer, PortRange, Protocol};
use berth_ebpf_common::{
    CIDR_KEY_FIXED_BITS, CidrKey, EndpointPolicy as EpState, POLICY_EGRESS_ISOLATED,
    POLICY_INGRESS_ISOLATED, POLICY_KEY_FIXED_BITS, PolicyKey, direction, identity,
};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};

/// CIDR identities have this bit set; label identities fit in 24 bits.
pub const CIDR_IDENTITY_BIT: u32 = 0x8000_0000;

/// An LPM key: the data and its prefix length.
pub type PolicyLpm = (PolicyKey, u32);
/// An LPM key of the CIDR map.
pub type CidrLpm = (CidrKey, u32);

/// Everything the datapath holds for one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lowered {
    pub state: EpState,
    pub policy: BTreeSet<PolicyLpm>,
    pub cidr: BTreeMap<CidrLpm, u32>,
}

fn dir_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => direction::INGRESS,
        Direction::Egress => direction::EGRESS,
    }
}

/// The policy keys of (endpoint, direction, identity) for one (protocol, ports).
fn keys(
    ep: u32,
    dir: u8,
    id: u32,
    proto: Option<Protocol>,
    ports: PortRange,
    out: &mut BTreeSet<PolicyLpm>,
) {
    let base = PolicyKey {
        endpoint_id: ep,
        direction: dir,
        identity: id,
        ..Default::default()
    };
    match proto {
        None => {
            out.insert((base, POLICY_KEY_FIXED_BITS));
        }
        Some(p) => {
            for (port, len) in ports.prefixes() {
                let k = PolicyKey {
                    protocol: p.number(),
                    port: port.to_be(),
                    ..base
                };
                out.insert((k, POLICY_KEY_FIXED_BITS + u32::from(len)));
            }
        }
    }
}

/// A CIDR identity for each prefix of one direction: a hash of the prefix with the high bit set,
/// probed past collisions in prefix order (so the same set always gets the same numbers).
fn cidr_identities(nets: impl Iterator<Item = Ipv4Net>) -> BTreeMap<Ipv4Net, u32> {
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for net in nets {
        let mut h: u32 = 0x811c_9dc5;
        for b in net.network().octets().into_iter().chain([net.prefix_len()]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let mut id = CIDR_IDENTITY_BIT | (h & 0x7fff_ffff);
        while !used.insert(id) {
            id = CIDR_IDENTITY_BIT | (id.wrapping_add(1) & 0x7fff_ffff);
        }
        out.insert(net, id);
    }
    out
}

fn lower_direction(ep: u32, d: Direction, side: &DirectionPolicy, out: &mut Lowered) {
    if !side.isolated {
        return;
    }
    out.state.flags |= match d {
        Direction::Ingress => POLICY_INGRESS_ISOLATED,
        Direction::Egress => POLICY_EGRESS_ISOLATED,
    };
    let dir = dir_code(d);
    for Entry { peer, proto, ports } in side.entries.keys() {
        let id = match peer {
            Peer::Any => identity::WILDCARD,
            Peer::Identity(id) => *id,
            Peer::Cidr(_) => continue,
        };
        keys(ep, dir, id, *proto, *ports, &mut out.policy);
    }
    let lpm = side.cidr_lpm();
    let ids = cidr_identities(lpm.keys().copied());
    for (net, rules) in &lpm {
        let cid = ids[net];
        let key = CidrKey {
            endpoint_id: ep,
            direction: dir,
            _pad: [0; 3],
            addr: u32::from_ne_bytes(net.network().octets()),
        };
        out.cidr.insert(
            (key, CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len())),
            cid,
        );
        for (proto, ports) in rules {
            keys(ep, dir, cid, *proto, *ports, &mut out.policy);
        }
    }
}

/// The datapath entries of endpoint `ep` (its Berth endpoint ID) under `policy`.
pub fn lower(ep: u32, policy: &EndpointPolicy) -> Lowered {
    let mut out = Lowered {
        state: EpState {
            flags: 0,
            identity: policy.identity,
        },
        ..Default::default()
    };
    lower_direction(ep, Direction::Ingress, &policy.ingress, &mut out);
    lower_direction(ep, Direction::Egress, &policy.egress, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Origin;

    fn side(entries: &[Entry]) -> DirectionPolicy {
        DirectionPolicy {
            isolated: true,
            policies: Default::default(),
            entries: entries
                .iter()
                .map(|e| (*e, [Origin::HostAccess].into_iter().collect()))
                .collect(),
        }
    }

    #[test]
    fn ranges_become_aligned_prefixes_and_cidrs_get_local_identities() {
        let p = EndpointPolicy {
            identity: 300,
            ingress: side(&[
                Entry {
                    peer: Peer::Identity(77),
                    proto: Some(Protocol::Tcp),
                    ports: PortRange {
                        first: 80,
                        last: 81,
                    },
                },
                Entry::any_l4(Peer::Identity(identity::HOST)),
                Entry {
                    peer: Peer::Cidr("10.0.0.0/8".parse().unwrap()),
                    proto: Some(Protocol::Udp),
                    ports: PortRange::single(53),
                },
            ]),
            ..Default::default()
        };
        let l = lower(9, &p);
        assert_eq!(l.state.flags, POLICY_INGRESS_ISOLATED);
        assert_eq!(l.state.identity, 300);
        // 80-81 is one /15 block.
        assert!(l.policy.contains(&(
            PolicyKey {
                endpoint_id: 9,
                direction: direction::INGRESS,
                protocol: 6,
                identity: 77,
                port: 80u16.to_be(),
                ..Default::default()
            },
            POLICY_KEY_FIXED_BITS + 15
        )));
        assert!(l.policy.contains(&(
            PolicyKey {
                endpoint_id: 9,
                identity: identity::HOST,
                ..Default::default()
            },
            POLICY_KEY_FIXED_BITS
        )));
        assert_eq!(l.cidr.len(), 1);
        let (&(ck, len), &cid) = l.cidr.iter().next().unwrap();
        assert_eq!(len, CIDR_KEY_FIXED_BITS + 8);
        assert_eq!(ck.addr, u32::from_ne_bytes([10, 0, 0, 0]));
        assert_ne!(cid & CIDR_IDENTITY_BIT, 0);
        assert!(l.policy.iter().any(|(k, len)| k.identity == cid
            && k.protocol == 17
            && k.port == 53u16.to_be()
            && *len == POLICY_KEY_FIXED_BITS + 16));
        assert_eq!(l.policy.len(), 3);
    }

    #[test]
    fn identities_of_prefixes_are_stable_and_distinct() {
        let nets: Vec<Ipv4Net> = (0..2000u32)
            .map(|i| Ipv4Net::new(std::net::Ipv4Addr::from(i << 12), 20).unwrap())
            .collect();
        let a = cidr_identities(nets.iter().copied());
        let b = cidr_identities(nets.iter().copied());
        assert_eq!(a, b);
        let distinct: BTreeSet<_> = a.values().collect();
        assert_eq!(distinct.len(), nets.len());
    }

    #[test]
    fn not_isolated_lowers_to_nothing() {
        let l = lower(1, &EndpointPolicy::default());
        assert_eq!(l.state.flags, 0);
        assert!(l.policy.is_empty() && l.cidr.is_empty());
    }
}
