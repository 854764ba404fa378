//! Address allocation in the node's pod CIDR (pure logic; persistence is the store's job).
use crate::error::{Error, Result};
use ipnet::Ipv4Net;
use std::{collections::BTreeSet, net::Ipv4Addr};

/// Ranges that must never be handed to pods (REFERENCE §6: MKS service range, Docker's default).
pub const RESERVED: [(&str, &str); 2] = [
    ("10.3.0.0/16", "the Kubernetes service (ClusterIP) range"),
    ("172.17.0.0/16", "the container runtime's bridge range"),
];

/// Link-local gateway every pod routes through; answered by the host-side veth's MAC.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Checks that a pod CIDR is usable: IPv4, between /16 and /28, clear of reserved ranges.
pub fn validate_pod_cidr(cidr: &Ipv4Net) -> Result<()> {
    if cidr.prefix_len() < 16 || cidr.prefix_len() > 28 {
        return Err(Error::Config(format!(
            "pod CIDR {cidr} must have a prefix length between /16 and /28"
        )));
    }
    if *cidr != cidr.trunc() {
        return Err(Error::Config(format!(
            "pod CIDR {cidr} has host bits set (use {})",
            cidr.trunc()
        )));
    }
    for (r, what) in RESERVED {
        let r: Ipv4Net = r.parse().expect("reserved range");
        if r.contains(cidr)
            || cidr.contains(&r)
            || r.contains(&cidr.network())
            || cidr.contains(&r.network())
        {
            return Err(Error::Config(format!(
                "pod CIDR {cidr} overlaps {r}, {what}"
            )));
        }
    }
    Ok(())
}

/// Number of assignable addresses (network, broadcast and the first host address are kept back:
/// the first host address is reserved for the node's own use).
pub fn capacity(cidr: &Ipv4Net) -> u32 {
    (1u32 << (32 - cidr.prefix_len())).saturating_sub(3)
}

/// True when `ip` is one [`next_free`] could hand out in `cidr` (inside it, and not its network,
/// node or broadcast address).
pub fn is_assignable(cidr: &Ipv4Net, ip: Ipv4Addr) -> bool {
    if !cidr.contains(&ip) {
        return false;
    }
    let off = u32::from(ip) - u32::from(cidr.network());
    let size = 1u32 << (32 - cidr.prefix_len());
    (2..=size - 2).contains(&off)
}

/// Picks the next free address after `last` (round robin, as host-local does, so a just-freed
/// address is not handed out again at once).
pub fn next_free(
    cidr: &Ipv4Net,
    used: &BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Result<Ipv4Addr> {
    let base = u32::from(cidr.network());
    let size = 1u32 << (32 - cidr.prefix_len());
    let first = 2u32; // .0 network, .1 reserved for the node
    let last_off = size - 2; // size-1 is broadcast
    let span = last_off - first + 1;
    let start = match last {
        Some(ip) if cidr.contains(&ip) => u32::from(ip) - base + 1,
        _ => first,
    };
    for i in 0..span {
        let mut off = start + i;
        if off > last_off || off < first {
            off = first + (off.wrapping_sub(first)) % span;
        }
        let ip = Ipv4Addr::from(base + off);
        if !used.contains(&ip) {
            return Ok(ip);
        }
    }
    Err(Error::Exhausted(cidr.to_string()))
}

/// Checks that `ip` may be given to a pod of `cidr`: inside it, neither the network, the node's
/// reserved first address nor the broadcast address, and not in `used`.
pub fn check_requested(cidr: &Ipv4Net, used: &BTreeSet<Ipv4Addr>, ip: Ipv4Addr) -> Result<()> {
    if !cidr.contains(&ip) {
        return Err(Error::InvalidArgument(format!(
            "requested address {ip} is outside this node's pod CIDR {cidr}"
        )));
    }
    let off = u32::from(ip) - u32::from(cidr.network());
    let size = 1u32 << (32 - cidr.prefix_len());
    if off < 2 || off >= size - 1 {
        return Err(Error::InvalidArgument(format!(
            "requested address {ip} is reserved in {cidr} (network, node or broadcast address)"
        )));
    }
    if used.contains(&ip) {
        return Err(Error::InvalidArgument(format!(
            "requested address {ip} is already allocated to another attachment"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_addresses_are_checked() {
        let c: Ipv4Net = "10.2.1.0/24".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = ["10.2.1.7".parse().unwrap()].into_iter().collect();
        assert!(check_requested(&c, &used, "10.2.1.10".parse().unwrap()).is_ok());
        for bad in [
            "10.2.2.10",
            "10.2.1.0",
            "10.2.1.1",
            "10.2.1.255",
            "10.2.1.7",
        ] {
            assert!(
                check_requested(&c, &used, bad.parse().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn reserved_ranges_are_refused() {
        assert!(validate_pod_cidr(&"10.2.0.0/24".parse().unwrap()).is_ok());
        assert!(validate_pod_cidr(&"10.3.1.0/24".parse().unwrap()).is_err());
        assert!(validate_pod_cidr(&"172.16.0.0/12".parse().unwrap()).is_err());
        assert!(validate_pod_cidr(&"10.2.0.1/24".parse().unwrap()).is_err());
        assert!(validate_pod_cidr(&"10.2.0.0/30".parse().unwrap()).is_err());
    }

    #[test]
    fn allocates_round_robin_and_exhausts() {
        let cidr: Ipv4Net = "10.2.0.0/28".parse().unwrap();
        assert_eq!(capacity(&cidr), 13);
        let mut used = BTreeSet::new();
        let mut last = None;
        for _ in 0..13 {
            let ip = next_free(&cidr, &used, last).unwrap();
            assert!(cidr.contains(&ip));
            assert_ne!(ip, Ipv4Addr::new(10, 2, 0, 0));
            assert_ne!(ip, Ipv4Addr::new(10, 2, 0, 1));
            assert_ne!(ip, Ipv4Addr::new(10, 2, 0, 15));
            assert!(used.insert(ip), "{ip} handed out twice");
            last = Some(ip);
        }
        assert!(matches!(
            next_free(&cidr, &used, last),
            Err(Error::Exhausted(_))
        ));
        // Freeing one makes exactly that one available, even though the cursor is past it.
        used.remove(&Ipv4Addr::new(10, 2, 0, 5));
        assert_eq!(
            next_free(&cidr, &used, last).unwrap(),
            Ipv4Addr::new(10, 2, 0, 5)
        );
    }

    #[test]
    fn assignable_excludes_reserved_offsets_and_outsiders() {
        let cidr: Ipv4Net = "10.2.0.0/28".parse().unwrap();
        let ok = |s: &str| is_assignable(&cidr, s.parse().unwrap());
        assert!(!ok("10.2.0.0") && !ok("10.2.0.1") && !ok("10.2.0.15"));
        assert!(ok("10.2.0.2") && ok("10.2.0.14"));
        assert!(!ok("10.2.0.16") && !ok("10.2.1.2"));
    }

    #[test]
    fn round_robin_skips_just_freed() {
        let cidr: Ipv4Net = "10.2.0.0/24".parse().unwrap();
        let used = BTreeSet::new();
        let a = next_free(&cidr, &used, None).unwrap();
        let b = next_free(&cidr, &used, Some(a)).unwrap();
        assert_ne!(a, b);
    }
}
