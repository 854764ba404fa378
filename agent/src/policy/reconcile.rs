//! The identities-and-policy reconciler (DESIGN §9): writes the compiled policy of the local
//! endpoints and the identities of every address into the datapath's maps, by difference.
//!
//! What it owns: the `/32` entries of the ipcache (every pod, node and host address: identity and
//! hosting node), every key of the policy, CIDR and policy-state maps, and the policy revision.
//! On start it reads what the pinned maps hold (a restarted agent continues from the enforcement
//! in force, never from nothing), so the first pass only writes what differs.
//!
//! Order of writes, so that at no moment allowed traffic is dropped or denied traffic passes:
//! 1. new policy and CIDR entries (allowing more of what is isolated; nothing new is isolated yet);
//! 2. isolation switched on for endpoints that gain it (their allow entries are in place);
//! 3. ipcache changes (identities of addresses);
//! 4. isolation switched off;
//! 5. stale policy and CIDR entries removed;
//! 6. the policy revision bumped: established connections are checked again at their next
//!    packet, and one the new policy denies stops.
use super::Compiled;
use super::lower::{CidrLpm, Lowered, PolicyLpm, lower};
use crate::cluster::ClusterModel;
use crate::error::Result;
use berth_ebpf_common::{
    EndpointPolicy as EpState, IPCACHE_FLAG_REMOTE_PODS, IpcacheEntry, identity,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The maps the reconciler writes (the eBPF maps in the agent, a mirror in tests).
pub trait PolicyMaps: Send {
    fn read_policy(&self) -> Result<BTreeSet<PolicyLpm>>;
    fn read_cidr(&self) -> Result<BTreeMap<CidrLpm, u32>>;
    fn read_states(&self) -> Result<BTreeMap<u32, EpState>>;
    /// The `/32` entries of the ipcache.
    fn read_hosts(&self) -> Result<BTreeMap<Ipv4Addr, IpcacheEntry>>;
    fn put_policy(&mut self, key: &PolicyLpm) -> Result<()>;
    fn del_policy(&mut self, key: &PolicyLpm) -> Result<()>;
    fn put_cidr(&mut self, key: &CidrLpm, id: u32) -> Result<()>;
    fn del_cidr(&mut self, key: &CidrLpm) -> Result<()>;
    fn put_state(&mut self, ep: u32, state: EpState) -> Result<()>;
    fn del_state(&mut self, ep: u32) -> Result<()>;
    fn put_host(&mut self, addr: Ipv4Addr, entry: IpcacheEntry) -> Result<()>;
    fn del_host(&mut self, addr: Ipv4Addr) -> Result<()>;
    fn revision(&self) -> Result<u32>;
    fn set_revision(&mut self, revision: u32) -> Result<()>;
}

/// A local endpoint as the agent's registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub address: Ipv4Addr,
}

/// What one pass wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Writes {
    pub policy_added: usize,
    pub policy_removed: usize,
    pub cidr_written: usize,
    pub cidr_removed: usize,
    pub states_written: usize,
    pub states_removed: usize,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
}

impl Writes {
    pub fn total(&self) -> usize {
        self.policy_added
            + self.policy_removed
            + self.cidr_written
            + self.cidr_removed
            + self.states_written
            + self.states_removed
            + self.ipcache_written
            + self.ipcache_removed
    }
}

/// What is in the maps (as far as the reconciler owns them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub policy: BTreeSet<PolicyLpm>,
    pub cidr: BTreeMap<CidrLpm, u32>,
    pub states: BTreeMap<u32, EpState>,
    pub hosts: BTreeMap<Ipv4Addr, IpcacheEntry>,
}

/// Writes compiled policy into [`PolicyMaps`] by difference.
pub struct PolicyReconciler<M: PolicyMaps> {
    maps: M,
    applied: Applied,
    revision: u32,
}

impl<M: PolicyMaps> PolicyReconciler<M> {
    /// Adopts what the maps hold now.
    pub fn adopt(maps: M) -> Result<Self> {
        let applied = Applied {
            policy: maps.read_policy()?,
            cidr: maps.read_cidr()?,
            states: maps.read_states()?,
            hosts: maps.read_hosts()?,
        };
        let revision = maps.revision()?;
        Ok(PolicyReconciler {
            maps,
            applied,
            revision,
        })
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn revision(&self) -> u32 {
        self.revision
    }

    /// The desired state: every joined local endpoint lowered, and the `/32` ipcache.
    pub fn desired(
        compiled: &Compiled,
        model: &ClusterModel,
        endpoints: &[LocalEndpoint],
        host_addrs: &[Ipv4Addr],
    ) -> (BTreeMap<u32, Lowered>, BTreeMap<Ipv4Addr, IpcacheEntry>) {
        let mut lowered = BTreeMap::new();
        let mut own_ids: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for ep in endpoints {
            let Some(p) = compiled
                .endpoints
                .get(&(ep.namespace.clone(), ep.name.clone()))
            else {
                continue;
            };
            // The registry and the model must agree on which incarnation of the pod this is.
            if !p.uid.is_empty() && !ep.uid.is_empty() && p.uid != ep.uid {
                continue;
            }
            lowered.insert(ep.id, lower(ep.id, p));
            own_ids.insert(ep.address, p.identity);
        }
        // Hosting node of every pod address.
        let node_ips: BTreeMap<&str, Option<Ipv4Addr>> = model
            .nodes
            .keys()
            .map(|n| (n.as_str(), model.node_view(n).and_then(|v| v.internal_ip)))
            .collect();
        let mut host_of: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for p in model.pods.values() {
            if let Some(n) = &p.node_name
                && !p.host_network
                && !p.terminated
            {
                for ip in &p.ips {
                    host_of.insert(*ip, n.as_str());
                }
            }
        }
        let mut hosts = BTreeMap::new();
        for (addr, id) in &compiled.ipcache {
            let mut e = IpcacheEntry {
                identity: *id,
                ..Default::default()
            };
            if let Some(node) = host_of.get(addr)
                && *node != compiled.node
            {
                e.flags = IPCACHE_FLAG_REMOTE_PODS;
                e.tunnel_endpoint = node_ips
                    .get(node)
                    .copied()
                    .flatten()
                    .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
            }
            hosts.insert(*addr, e);
        }
        // A local endpoint the model has no address for yet still has its identity.
        for (addr, id) in own_ids {
            hosts.entry(addr).or_insert(IpcacheEntry {
                identity: id,
                ..Default::default()
            });
        }
        for a in host_addrs {
            hosts.entry(*a).or_insert(IpcacheEntry {
                identity: identity::HOST,
                ..Default::default()
            });
        }
        (lowered, hosts)
    }

    /// One pass: writes what differs, in the order of the module documentation.
    pub fn reconcile(
        &mut self,
        compiled: &Compiled,
        model: &ClusterModel,
        endpoints: &[LocalEndpoint],
        host_addrs: &[Ipv4Addr],
    ) -> Result<Writes> {
        let (lowered, hosts) = Self::desired(compiled, model, endpoints, host_addrs);
        let mut policy = BTreeSet::new();
        let mut cidr = BTreeMap::new();
        let mut states = BTreeMap::new();
        for (id, l) in lowered {
            policy.extend(l.policy);
            cidr.extend(l.cidr);
            // An endpoint without isolation needs no state entry (absent = not isolated), but
            // keeps one for its identity when it has policy around it.
            states.insert(id, l.state);
        }
        self.apply(Applied {
            policy,
            cidr,
            states,
            hosts,
        })
    }

    fn apply(&mut self, want: Applied) -> Result<Writes> {
        let mut w = Writes::default();
        let a = &mut self.applied;
        // 1. New allow entries.
        for k in want.policy.difference(&a.policy.clone()) {
            self.maps.put_policy(k)?;
            a.policy.insert(*k);
            w.policy_added += 1;
        }
        for (k, id) in &want.cidr {
            if a.cidr.get(k) != Some(id) {
                self.maps.put_cidr(k, *id)?;
                a.cidr.insert(*k, *id);
                w.cidr_written += 1;
            }
        }
        // 2. Isolation on (and identity changes of states that keep their isolation).
        for (ep, s) in &want.states {
            let old = a.states.get(ep).copied().unwrap_or_default();
            if a.states.get(ep) != Some(s) && s.flags & !old.flags != 0 {
                self.maps.put_state(*ep, *s)?;
                a.states.insert(*ep, *s);
                w.states_written += 1;
            }
        }
        // 3. Identities of addresses.
        for (addr, e) in &want.hosts {
            if a.hosts.get(addr) != Some(e) {
                self.maps.put_host(*addr, *e)?;
                a.hosts.insert(*addr, *e);
                w.ipcache_written += 1;
            }
        }
        let gone: Vec<Ipv4Addr> = a
            .hosts
            .keys()
            .filter(|k| !want.hosts.contains_key(k))
            .copied()
            .collect();
        for addr in gone {
            self.maps.del_host(addr)?;
            a.hosts.remove(&addr);
            w.ipcache_removed += 1;
        }
        // 4. Isolation off, remaining state changes, and states of endpoints that are gone.
        for (ep, s) in &want.states {
            if a.states.get(ep) != Some(s) {
                self.maps.put_state(*ep, *s)?;
                a.states.insert(*ep, *s);
                w.states_written += 1;
            }
        }
        let gone: Vec<u32> = a
            .states
            .keys()
            .filter(|k| !want.states.contains_key(k))
            .copied()
            .collect();
        for ep in gone {
            self.maps.del_state(ep)?;
            a.states.remove(&ep);
            w.states_removed += 1;
        }
        // 5. Stale allow entries.
        let stale: Vec<PolicyLpm> = a.policy.difference(&want.policy).copied().collect();
        for k in stale {
            self.maps.del_policy(&k)?;
            a.policy.remove(&k);
            w.policy_removed += 1;
        }
        let stale: Vec<CidrLpm> = a
            .cidr
            .keys()
            .filter(|k| !want.cidr.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.maps.del_cidr(&k)?;
            a.cidr.remove(&k);
            w.cidr_removed += 1;
        }
        // 6. Established connections are checked again.
        if w.total() > 0 {
            self.revision = self.revision.wrapping_add(1).max(1);
            self.maps.set_revision(self.revision)?;
        }
        Ok(w)
    }
}

/// An in-memory [`PolicyMaps`] (unit tests, and the agent without a datapath).
#[derive(Debug, Default, Clone)]
pub struct MemoryMaps {
    pub applied: Applied,
    pub revision: u32,
    /// Every write in order (for tests of the write order).
    pub log: Vec<String>,
}

impl PolicyMaps for MemoryMaps {
    fn read_policy(&self) -> Result<BTreeSet<PolicyLpm>> {
        Ok(self.applied.policy.clone())
    }
    fn read_cidr(&self) -> Result<BTreeMap<CidrLpm, u32>> {
        Ok(self.applied.cidr.clone())
    }
    fn read_states(&self) -> Result<BTreeMap<u32, EpState>> {
        Ok(self.applied.states.clone())
    }
    fn read_hosts(&self) -> Result<BTreeMap<Ipv4Addr, IpcacheEntry>> {
        Ok(self.applied.hosts.clone())
    }
    fn put_policy(&mut self, key: &PolicyLpm) -> Result<()> {
        self.log.push(format!("put policy ep{}", key.0.endpoint_id));
        self.applied.policy.insert(*key);
        Ok(())
    }
    fn del_policy(&mut self, key: &PolicyLpm) -> Result<()> {
        self.log.push(format!("del policy ep{}", key.0.endpoint_id));
        self.applied.policy.remove(key);
        Ok(())
    }
    fn put_cidr(&mut self, key: &CidrLpm, id: u32) -> Result<()> {
        self.log.push(format!("put cidr ep{}", key.0.endpoint_id));
        self.applied.cidr.insert(*key, id);
        Ok(())
    }
    fn del_cidr(&mut self, key: &CidrLpm) -> Result<()> {
        self.log.push(format!("del cidr ep{}", key.0.endpoint_id));
        self.applied.cidr.remove(key);
        Ok(())
    }
    fn put_state(&mut self, ep: u32, state: EpState) -> Result<()> {
        self.log
            .push(format!("put state ep{ep} flags {}", state.flags));
        self.applied.states.insert(ep, state);
        Ok(())
    }
    fn del_state(&mut self, ep: u32) -> Result<()> {
        self.log.push(format!("del state ep{ep}"));
        self.applied.states.remove(&ep);
        Ok(())
    }
    fn put_host(&mut self, addr: Ipv4Addr, entry: IpcacheEntry) -> Result<()> {
        self.log
            .push(format!("put ipcache {addr} id {}", entry.identity));
        self.applied.hosts.insert(addr, entry);
        Ok(())
    }
    fn del_host(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.log.push(format!("del ipcache {addr}"));
        self.applied.hosts.remove(&addr);
        Ok(())
    }
    fn revision(&self) -> Result<u32> {
        Ok(self.revision)
    }
    fn set_revision(&mut self, revision: u32) -> Result<()> {
        self.log.push(format!("revision {revision}"));
        self.revision = revision;
        Ok(())
    }
}

impl<M: PolicyMaps> PolicyReconciler<M> {
    /// The maps (tests look at a [`MemoryMaps`]).
    pub fn maps(&self) -> &M {
        &self.maps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        DirectionPolicy, EndpointPolicy, Entry, Origin, Peer, PortRange, Protocol,
    };

    fn compiled(isolated: bool) -> Compiled {
        let mut ingress = DirectionPolicy::default();
        if isolated {
            ingress.isolated = true;
            ingress.entries.insert(
                Entry {
                    peer: Peer::Identity(100),
                    proto: Some(Protocol::Tcp),
                    ports: PortRange::single(80),
                },
                [Origin::HostAccess].into_iter().collect(),
            );
        }
        let mut c = Compiled {
            node: "n1".into(),
            ..Default::default()
        };
        c.endpoints.insert(
            ("x".into(), "a".into()),
            EndpointPolicy {
                uid: "u1".into(),
                ips: vec![],
                identity: 200,
                ingress,
                egress: DirectionPolicy::default(),
            },
        );
        c.ipcache.insert("10.2.2.5".parse().unwrap(), 100);
        c
    }

    fn endpoint(uid: &str) -> LocalEndpoint {
        LocalEndpoint {
            id: 7,
            namespace: "x".into(),
            name: "a".into(),
            uid: uid.into(),
            address: "10.2.1.10".parse().unwrap(),
        }
    }

    fn pos(log: &[String], prefix: &str) -> usize {
        log.iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {log:?}"))
    }

    #[test]
    fn writes_by_difference_in_a_gap_free_order_and_adopts() {
        let model = ClusterModel::default();
        let host = ["192.168.50.1".parse().unwrap()];
        let mut r = PolicyReconciler::adopt(MemoryMaps::default()).unwrap();
        let w = r
            .reconcile(&compiled(true), &model, &[endpoint("u1")], &host)
            .unwrap();
        assert_eq!(w.policy_added, 1);
        assert_eq!(w.states_written, 1);
        // The peer, the endpoint's own address (identity 200) and the host.
        assert_eq!(w.ipcache_written, 3);
        let log = r.maps().log.clone();
        assert!(pos(&log, "put policy") < pos(&log, "put state ep7 flags 1"));
        assert_eq!(log.last().unwrap(), "revision 1");
        assert_eq!(
            r.maps().applied.hosts[&"10.2.1.10".parse().unwrap()].identity,
            200
        );
        assert_eq!(
            r.maps().applied.hosts[&"192.168.50.1".parse().unwrap()].identity,
            identity::HOST
        );

        // Nothing changed: nothing written, the revision stays.
        let w = r
            .reconcile(&compiled(true), &model, &[endpoint("u1")], &host)
            .unwrap();
        assert_eq!(w.total(), 0);
        assert_eq!(r.revision(), 1);

        // A restarted agent adopts what the maps hold and writes nothing.
        let mut again = PolicyReconciler::adopt(r.maps().clone()).unwrap();
        let w = again
            .reconcile(&compiled(true), &model, &[endpoint("u1")], &host)
            .unwrap();
        assert_eq!(w.total(), 0);
        assert_eq!(again.revision(), 1);

        // Isolation goes: switched off before its entries are removed.
        let before = r.maps().log.len();
        let w = r
            .reconcile(&compiled(false), &model, &[endpoint("u1")], &host)
            .unwrap();
        assert_eq!((w.policy_removed, w.states_written), (1, 1));
        let log = r.maps().log[before..].to_vec();
        assert!(pos(&log, "put state ep7 flags 0") < pos(&log, "del policy"));
        assert_eq!(r.revision(), 2);
    }

    #[test]
    fn an_endpoint_of_another_incarnation_of_the_pod_is_not_joined() {
        let mut r = PolicyReconciler::adopt(MemoryMaps::default()).unwrap();
        r.reconcile(
            &compiled(true),
            &ClusterModel::default(),
            &[endpoint("u-old")],
            &[],
        )
        .unwrap();
        assert!(r.maps().applied.states.is_empty());
        assert!(r.maps().applied.policy.is_empty());
    }
}
