//! Routing and tunnels: how this node reaches the pods of every other node (DESIGN §3.3).
//!
//! * **Native routing** (nodes share the private network): a kernel route per remote pod CIDR via
//!   that node's InternalIP on the uplink, so the host reaches remote pods too; pods' packets take
//!   the same route from eBPF (FIB lookup + redirect, see `berth_from_pod`).
//! * **VXLAN** (`--routing vxlan`): one flow-based device (`berth_vxlan`, UDP 8472, no learning, no
//!   ARP) and a kernel route per remote pod CIDR through it; `berth_to_overlay` sets the remote
//!   from the ipcache. No FDB or neighbour entries per peer.
//!
//! Both modes write the ipcache (remote pod CIDR → node IP). [`Router::reconcile`] makes the kernel
//! and the map match the desired set **by difference**: it reads what is there (routes tagged with
//! [`ROUTE_PROTOCOL`], ipcache entries of remote pod CIDRs), adds or replaces what differs and
//! removes what is no longer wanted; nothing is flushed and refilled, so unchanged peers never see
//! a gap. The desired set comes from the cluster model ([`desired_remotes`], pure).
use crate::{
    datapath::Ipcache,
    error::{Error, Result},
};
use berth_ebpf_common::{IPCACHE_FLAG_REMOTE_PODS, IpcacheEntry, VXLAN_OVERHEAD, VXLAN_PORT};
use berth_netlink::{Netlink, Route};
use ipnet::Ipv4Net;
use std::{collections::BTreeMap, net::Ipv4Addr};

/// rtnetlink protocol number of the routes Berth owns (`ip route` shows `proto 190`).
pub const ROUTE_PROTOCOL: u8 = 190;
/// Name of the flow-based VXLAN device.
pub const VXLAN_DEVICE: &str = "berth_vxlan";

/// How pods reach other nodes' pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingMode {
    /// Nodes share an L2/L3 private network (vRack): routes via each node's InternalIP.
    #[default]
    Native,
    /// VXLAN overlay (UDP 8472) through one flow-based device.
    Vxlan,
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoutingMode::Native => "native",
            RoutingMode::Vxlan => "vxlan",
        })
    }
}

/// A node as routing sees it (from `Node.spec.podCIDRs` and its InternalIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub name: String,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub node_ip: Option<Ipv4Addr>,
}

/// A remote pod CIDR and the node that hosts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub node: String,
    pub node_ip: Ipv4Addr,
}

/// The remote pod CIDRs this node must reach: every other node with a pod CIDR and an InternalIP
/// (NotReady nodes included: their pods may still run). A CIDR that overlaps this node's own, or
/// that two nodes claim, is logged and resolved deterministically (own CIDR wins; otherwise the
/// node whose name sorts first).
pub fn desired_remotes(
    nodes: &[NodeRoute],
    self_name: &str,
    local_cidr: Option<Ipv4Net>,
) -> BTreeMap<Ipv4Net, Remote> {
    let mut sorted: Vec<&NodeRoute> = nodes.iter().filter(|n| n.name != self_name).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: BTreeMap<Ipv4Net, Remote> = BTreeMap::new();
    for n in sorted {
        let Some(ip) = n.node_ip else {
            tracing::debug!(node = %n.name, "node has no InternalIP yet; no route");
            continue;
        };
        for cidr in &n.pod_cidrs {
            let cidr = cidr.trunc();
            if let Some(own) = local_cidr
                && (own.contains(&cidr.network()) || cidr.contains(&own.network()))
            {
                tracing::warn!(node = %n.name, %cidr, own = %own, "remote pod CIDR overlaps this node's; ignored");
                continue;
            }
            if let Some(prev) = out.get(&cidr) {
                tracing::warn!(%cidr, kept = %prev.node, ignored = %n.name, "two nodes claim one pod CIDR");
                continue;
            }
            out.insert(
                cidr,
                Remote {
                    node: n.name.clone(),
                    node_ip: ip,
                },
            );
        }
    }
    out
}

/// The devices routing works with, found or created at start-up (before the datapath loads, whose
/// configuration names them).
#[derive(Debug, Clone)]
pub struct Topology {
    pub mode: RoutingMode,
    /// `None` on a node with no way out (no --uplink, no node IP, no default route: a stand-alone
    /// node); native routes then name only their gateway and the kernel picks the device.
    pub uplink: Option<berth_netlink::Link>,
    pub vxlan: Option<berth_netlink::Link>,
    pub node_ip: Option<Ipv4Addr>,
    /// MTU for pod interfaces: the uplink's, minus the VXLAN overhead in overlay mode.
    pub pod_mtu: u32,
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

impl Topology {
    /// Finds the uplink (`uplink` by name; else the link holding `node_ip`; else the link of the
    /// default route), the node IP (`node_ip`; else the uplink's first address) and, in VXLAN mode,
    /// creates or adopts the flow-based device (re-created when its settings differ). In native
    /// mode a leftover VXLAN device of an earlier overlay configuration is removed.
    pub fn discover(
        mode: RoutingMode,
        uplink: Option<&str>,
        node_ip: Option<Ipv4Addr>,
    ) -> Result<Self> {
        let mut nl = Netlink::new().map_err(nl_err("open netlink"))?;
        let addrs = nl.all_addresses().map_err(nl_err("list addresses"))?;
        let links = nl.links().map_err(nl_err("list links"))?;
        let by_index = |i: u32| links.iter().find(|l| l.index == i).cloned();
        // Without a node IP (the Node object is not available yet), the routes an earlier agent
        // installed name it as their source.
        let node_ip = node_ip.or_else(|| {
            let ours = nl.routes(Some(ROUTE_PROTOCOL)).ok()?;
            let ip = ours.iter().find_map(|(r, _)| r.src)?;
            tracing::info!(node_ip = %ip, "node IP taken from the routes an earlier agent installed");
            Some(ip)
        });
        let up = if let Some(name) = uplink {
            links
                .iter()
                .find(|l| l.name == name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("uplink {name} does not exist")))?
        } else if let Some(ip) = node_ip
            && let Some((idx, _, _)) = addrs.iter().find(|(_, a, _)| *a == ip)
        {
            by_index(*idx).ok_or_else(|| Error::Config(format!("link of {ip} vanished")))?
        } else {
            let routes = nl.routes(None).map_err(nl_err("list routes"))?;
            let default = routes
                .iter()
                .find(|(r, _)| r.prefix == 0 && r.oif != 0)
                .map(|(r, _)| r.oif);
            match default.and_then(by_index) {
                Some(l) => l,
                None => {
                    tracing::warn!(
                        "no uplink: no --uplink, no link holds the node IP and there is no default \
                         route; pods reach only this node until one of them exists"
                    );
                    return Self::standalone(&mut nl, mode, node_ip);
                }
            }
        };
        let node_ip = node_ip.or_else(|| {
            addrs
                .iter()
                .find(|(i, a, _)| *i == up.index && !a.is_loopback())
                .map(|(_, a, _)| *a)
        });
        let base_mtu = up.mtu;
        let mut topo = Self::standalone(&mut nl, mode, node_ip)?;
        if let Some(vx) = &topo.vxlan
            && vx.mtu != base_mtu - VXLAN_OVERHEAD
        {
            topo.vxlan = Some(ensure_vxlan(&mut nl, base_mtu - VXLAN_OVERHEAD)?);
        }
        topo.pod_mtu = match mode {
            RoutingMode::Native => base_mtu,
            RoutingMode::Vxlan => base_mtu - VXLAN_OVERHEAD,
        };
        topo.uplink = Some(up);
        Ok(topo)
    }

    /// Without an uplink: 1500-byte underlay assumed.
    fn standalone(nl: &mut Netlink, mode: RoutingMode, node_ip: Option<Ipv4Addr>) -> Result<Self> {
        const DEFAULT_UNDERLAY_MTU: u32 = 1500;
        let vxlan = match mode {
            RoutingMode::Native => {
                if nl
                    .delete_link_by_name(VXLAN_DEVICE)
                    .map_err(nl_err("remove the VXLAN device"))?
                {
                    tracing::info!(
                        device = VXLAN_DEVICE,
                        "native routing: removed the overlay device"
                    );
                }
                None
            }
            RoutingMode::Vxlan => Some(ensure_vxlan(nl, DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD)?),
        };
        Ok(Topology {
            mode,
            uplink: None,
            vxlan,
            node_ip,
            pod_mtu: match mode {
                RoutingMode::Native => DEFAULT_UNDERLAY_MTU,
                RoutingMode::Vxlan => DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD,
            },
        })
    }
}

fn ensure_vxlan(nl: &mut Netlink, mtu: u32) -> Result<berth_netlink::Link> {
    match nl
        .link_kind(VXLAN_DEVICE)
        .map_err(nl_err("inspect the VXLAN device"))?
    {
        Some((kind, true, Some(VXLAN_PORT))) if kind == "vxlan" => {}
        Some(other) => {
            tracing::warn!(device = VXLAN_DEVICE, found = ?other, "re-creating the VXLAN device with Berth's settings");
            nl.delete_link_by_name(VXLAN_DEVICE)
                .map_err(nl_err("remove the VXLAN device"))?;
            nl.create_vxlan_external(VXLAN_DEVICE, VXLAN_PORT, mtu)
                .map_err(nl_err("create the VXLAN device"))?;
        }
        None => {
            nl.create_vxlan_external(VXLAN_DEVICE, VXLAN_PORT, mtu)
                .map_err(nl_err("create the VXLAN device"))?;
            tracing::info!(
                device = VXLAN_DEVICE,
                port = VXLAN_PORT,
                mtu,
                "created the flow-based VXLAN device"
            );
        }
    }
    let link = nl
        .link_by_name(VXLAN_DEVICE)
        .map_err(nl_err("find the VXLAN device"))?
        .ok_or_else(|| Error::Datapath("the VXLAN device vanished".into()))?;
    if link.mtu != mtu {
        nl.set_mtu(link.index, mtu)
            .map_err(nl_err("set the VXLAN device's MTU"))?;
    }
    nl.set_up(link.index)
        .map_err(nl_err("bring the VXLAN device up"))?;
    Ok(berth_netlink::Link { mtu, ..link })
}

/// What one reconcile pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added + self.updated + self.removed == 0
    }
}

/// Kernel routes and ipcache entries for remote pod CIDRs.
pub struct Router {
    topo: Topology,
    nl: Netlink,
    ipcache: Ipcache,
}

impl Router {
    pub fn new(topo: Topology, ipcache: Ipcache) -> Result<Self> {
        Ok(Router {
            topo,
            nl: Netlink::new().map_err(nl_err("open netlink"))?,
            ipcache,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    fn route_for(&self, cidr: &Ipv4Net, remote: &Remote) -> Route {
        match &self.topo.vxlan {
            Some(vx) => Route {
                dst: cidr.network(),
                prefix: cidr.prefix_len(),
                gateway: None,
                oif: vx.index,
                src: self.topo.node_ip,
            },
            None => Route {
                dst: cidr.network(),
                prefix: cidr.prefix_len(),
                gateway: Some(remote.node_ip),
                oif: self.topo.uplink.as_ref().map_or(0, |l| l.index),
                src: self.topo.node_ip,
            },
        }
    }

    /// Makes routes and ipcache match `desired`, by difference against what the kernel holds.
    pub fn reconcile(&mut self, desired: &BTreeMap<Ipv4Net, Remote>) -> Result<Changes> {
        let routes: BTreeMap<Ipv4Net, Route> = self
            .nl
            .routes(Some(ROUTE_PROTOCOL))
            .map_err(nl_err("list Berth's routes"))?
            .into_iter()
            .filter_map(|(r, _)| Ipv4Net::new(r.dst, r.prefix).ok().map(|n| (n, r)))
            .collect();
        let cache: BTreeMap<Ipv4Net, IpcacheEntry> = self
            .ipcache
            .entries()?
            .into_iter()
            // Routing owns the pod CIDRs; the `/32`s (pods, nodes, this host) are the policy
            // reconciler's, whatever their flags.
            .filter(|(net, e)| net.prefix_len() < 32 && e.flags & IPCACHE_FLAG_REMOTE_PODS != 0)
            .collect();
        let mut ch = Changes::default();
        for (cidr, remote) in desired {
            let want_route = self.route_for(cidr, remote);
            let want_entry = IpcacheEntry {
                tunnel_endpoint: u32::from_ne_bytes(remote.node_ip.octets()),
                identity: 0,
                flags: IPCACHE_FLAG_REMOTE_PODS,
                _pad: 0,
            };
            // What the kernel chose where we named nothing (device, source) is not a difference.
            let have_route = routes.get(cidr).map(|r| Route {
                oif: if want_route.oif == 0 { 0 } else { r.oif },
                src: want_route.src.and(r.src),
                ..r.clone()
            });
            let have_route = have_route.as_ref();
            let have_entry = cache.get(cidr);
            if have_route == Some(&want_route) && have_entry == Some(&want_entry) {
                continue;
            }
            // Map first: pods' packets then already know the node when the route appears.
            self.ipcache.upsert(cidr, want_entry)?;
            if have_route != Some(&want_route) {
                // Gateways of native routes are on the private network's subnet; onlink keeps the
                // route valid when the node IP sits outside the uplink's prefix (a /32, say).
                let onlink = want_route.gateway.is_some() && want_route.oif != 0;
                self.nl
                    .replace_route(&want_route, ROUTE_PROTOCOL, onlink)
                    .map_err(nl_err(format!("route {cidr} via {}", remote.node_ip)))?;
            }
            if have_route.is_none() && have_entry.is_none() {
                tracing::info!(%cidr, node = %remote.node, node_ip = %remote.node_ip, mode = %self.topo.mode, "route to remote pods added");
                ch.added += 1;
            } else {
                tracing::info!(%cidr, node = %remote.node, node_ip = %remote.node_ip, "route to remote pods updated");
                ch.updated += 1;
            }
        }
        let stale: Vec<Ipv4Net> = routes
            .keys()
            .chain(cache.keys())
            .filter(|c| !desired.contains_key(c))
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for cidr in stale {
            // Route first, then the map: no packet is sent to a node the map no longer knows.
            if routes.contains_key(&cidr) {
                self.nl
                    .delete_route(cidr.network(), cidr.prefix_len(), ROUTE_PROTOCOL)
                    .map_err(nl_err(format!("delete route {cidr}")))?;
            }
            self.ipcache.remove(&cidr)?;
            tracing::info!(%cidr, "route to remote pods removed");
            ch.removed += 1;
        }
        Ok(ch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: Option<&str>) -> NodeRoute {
        NodeRoute {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            node_ip: ip.map(|i| i.parse().unwrap()),
        }
    }

    #[test]
    fn remotes_skip_self_nodes_without_ip_and_conflicts() {
        let nodes = vec![
            node("a", "10.2.0.0/24", Some("192.168.0.1")),
            node("b", "10.2.1.0/24", Some("192.168.0.2")),
            node("c", "10.2.2.0/24", None),
            node("d", "10.2.1.0/24", Some("192.168.0.4")),
            node("e", "10.2.0.128/25", Some("192.168.0.5")),
        ];
        let r = desired_remotes(&nodes, "a", Some("10.2.0.0/24".parse().unwrap()));
        assert_eq!(r.len(), 1, "{r:?}");
        let b = &r[&"10.2.1.0/24".parse::<Ipv4Net>().unwrap()];
        assert_eq!(b.node, "b", "first name wins a duplicate CIDR");
        assert_eq!(b.node_ip, "192.168.0.2".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn host_bits_are_cleared() {
        let r = desired_remotes(&[node("b", "10.2.1.7/24", Some("192.168.0.2"))], "a", None);
        assert!(r.contains_key(&"10.2.1.0/24".parse::<Ipv4Net>().unwrap()));
    }
}
