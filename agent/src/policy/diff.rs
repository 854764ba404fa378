//! The difference between two compiled states: what the datapath writes, never a flush.
use super::{
    Compiled, Direction, DirectionPolicy, EndpointPolicy, Entry, Identity, LabelSet, Origin,
    PodKey, PolicyName,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// What changed between two compiled states of a node.
///
/// The datapath applies it in this order, so that at no moment is traffic allowed by both the
/// old and the new state dropped, or traffic denied by both let through:
///
/// 1. per endpoint: `add` entries (harmless before anything refers to them; a new endpoint's
///    entries exist before its filters are attached);
/// 2. isolation switched **on** (`isolated == Some(true)`: its entries are already in place);
/// 3. `ipcache_upsert` (an address moving to a new identity finds that identity's entries);
/// 4. `ipcache_remove`;
/// 5. isolation switched **off**;
/// 6. per endpoint: `remove` entries; removed endpoints' state last.
///
/// `identities_added`/`identities_removed` and each direction's `reattributed` are bookkeeping
/// for views and metrics (no map write).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyDiff {
    /// Endpoints whose policy changed (added, removed or changed), by (namespace, name).
    pub endpoints: BTreeMap<PodKey, EndpointDiff>,
    /// Addresses whose identity is new or changed.
    pub ipcache_upsert: BTreeMap<Ipv4Addr, Identity>,
    /// Addresses no longer known (they become [`super::WORLD`]).
    pub ipcache_remove: BTreeSet<Ipv4Addr>,
    pub identities_added: BTreeMap<Identity, Arc<LabelSet>>,
    pub identities_removed: BTreeSet<Identity>,
    /// Policies newly rejected or with a changed reason.
    pub rejected: BTreeMap<PolicyName, String>,
    /// Policies no longer rejected (fixed or deleted).
    pub unrejected: BTreeSet<PolicyName>,
}

/// How an endpoint changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointChange {
    /// A new local endpoint: every entry is in `add`, isolation is `Some(..)`.
    Added,
    /// No longer a local endpoint: every entry is in `remove`.
    Removed,
    Changed,
}

/// What changed for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDiff {
    pub change: EndpointChange,
    /// The endpoint's state after the change (for `Removed`: before it).
    pub uid: String,
    pub ips: Vec<Ipv4Addr>,
    pub identity: Identity,
    pub ingress: DirectionDiff,
    pub egress: DirectionDiff,
}

impl EndpointDiff {
    pub fn direction(&self, d: Direction) -> &DirectionDiff {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What changed in one direction of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirectionDiff {
    /// The new isolation state, when it changed (always set for an added endpoint).
    pub isolated: Option<bool>,
    /// The new set of selecting policies, when it changed.
    pub policies: Option<BTreeSet<Arc<PolicyName>>>,
    /// Entries to write, with their origins.
    pub add: BTreeMap<Entry, BTreeSet<Origin>>,
    /// Entries to delete.
    pub remove: BTreeSet<Entry>,
    /// Entries that stay but whose origins changed (no map write), with the new origins.
    pub reattributed: BTreeMap<Entry, BTreeSet<Origin>>,
}

impl DirectionDiff {
    pub fn is_empty(&self) -> bool {
        self.isolated.is_none()
            && self.policies.is_none()
            && self.add.is_empty()
            && self.remove.is_empty()
            && self.reattributed.is_empty()
    }

    /// Number of map writes (additions and removals).
    pub fn writes(&self) -> usize {
        self.add.len() + self.remove.len()
    }
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.ipcache_upsert.is_empty()
            && self.ipcache_remove.is_empty()
            && self.identities_added.is_empty()
            && self.identities_removed.is_empty()
            && self.rejected.is_empty()
            && self.unrejected.is_empty()
    }

    /// Number of policy-map writes over every endpoint.
    pub fn entry_writes(&self) -> usize {
        self.endpoints
            .values()
            .map(|e| e.ingress.writes() + e.egress.writes())
            .sum()
    }
}

/// The difference from `prev` to `next`.
pub fn diff(prev: &Compiled, next: &Compiled) -> PolicyDiff {
    let mut out = PolicyDiff::default();
    let empty = EndpointPolicy::default();
    let keys: BTreeSet<&PodKey> = prev.endpoints.keys().chain(next.endpoints.keys()).collect();
    for key in keys {
        let (old, new) = (prev.endpoints.get(key), next.endpoints.get(key));
        let change = match (old, new) {
            (None, Some(_)) => EndpointChange::Added,
            (Some(_), None) => EndpointChange::Removed,
            (Some(o), Some(n)) if o == n => continue,
            _ => EndpointChange::Changed,
        };
        let o = old.unwrap_or(&empty);
        let n = new.unwrap_or(&empty);
        let d = |dir| {
            let mut dd = direction_diff(o.direction(dir), n.direction(dir));
            if change == EndpointChange::Added {
                dd.isolated = Some(n.direction(dir).isolated);
                dd.policies = Some(n.direction(dir).policies.clone());
            }
            dd
        };
        let shown = new.or(old).expect("one side exists");
        out.endpoints.insert(
            key.clone(),
            EndpointDiff {
                change,
                uid: shown.uid.clone(),
                ips: shown.ips.clone(),
                identity: shown.identity,
                ingress: d(Direction::Ingress),
                egress: d(Direction::Egress),
            },
        );
    }
    for (ip, id) in &next.ipcache {
        if prev.ipcache.get(ip) != Some(id) {
            out.ipcache_upsert.insert(*ip, *id);
        }
    }
    for ip in prev.ipcache.keys() {
        if !next.ipcache.contains_key(ip) {
            out.ipcache_remove.insert(*ip);
        }
    }
    for (id, labels) in &next.identities {
        if prev.identities.get(id) != Some(labels) {
            out.identities_added.insert(*id, labels.clone());
        }
    }
    for (id, labels) in &prev.identities {
        if next.identities.get(id) != Some(labels) {
            out.identities_removed.insert(*id);
        }
    }
    for (name, reason) in &next.rejected {
        if prev.rejected.get(name) != Some(reason) {
            out.rejected.insert(name.clone(), reason.clone());
        }
    }
    for name in prev.rejected.keys() {
        if !next.rejected.contains_key(name) {
            out.unrejected.insert(name.clone());
        }
    }
    out
}

fn direction_diff(o: &DirectionPolicy, n: &DirectionPolicy) -> DirectionDiff {
    let mut d = DirectionDiff {
        isolated: (o.isolated != n.isolated).then_some(n.isolated),
        policies: (o.policies != n.policies).then(|| n.policies.clone()),
        ..Default::default()
    };
    for (entry, origins) in &n.entries {
        match o.entries.get(entry) {
            None => {
                d.add.insert(*entry, origins.clone());
            }
            Some(old) if old != origins => {
                d.reattributed.insert(*entry, origins.clone());
            }
            Some(_) => {}
        }
    }
    for entry in o.entries.keys() {
        if !n.entries.contains_key(entry) {
            d.remove.insert(*entry);
        }
    }
    d
}

impl Compiled {
    /// Applies `d` (computed against a state equal to `self`): afterwards `self` equals the
    /// state `d` leads to. This is what a mirror of the datapath's maps does.
    pub fn apply(&mut self, d: &PolicyDiff) {
        for (key, ed) in &d.endpoints {
            if ed.change == EndpointChange::Removed {
                self.endpoints.remove(key);
                continue;
            }
            let ep = self.endpoints.entry(key.clone()).or_default();
            ep.uid = ed.uid.clone();
            ep.ips = ed.ips.clone();
            ep.identity = ed.identity;
            for dir in [Direction::Ingress, Direction::Egress] {
                let dd = ed.direction(dir);
                let side = ep.direction_mut(dir);
                if let Some(iso) = dd.isolated {
                    side.isolated = iso;
                }
                if let Some(p) = &dd.policies {
                    side.policies = p.clone();
                }
                for e in &dd.remove {
                    side.entries.remove(e);
                }
                for (e, o) in dd.add.iter().chain(&dd.reattributed) {
                    side.entries.insert(*e, o.clone());
                }
            }
        }
        for ip in &d.ipcache_remove {
            self.ipcache.remove(ip);
        }
        for (ip, id) in &d.ipcache_upsert {
            self.ipcache.insert(*ip, *id);
        }
        for id in &d.identities_removed {
            self.identities.remove(id);
        }
        for (id, l) in &d.identities_added {
            self.identities.insert(*id, l.clone());
        }
        for name in &d.unrejected {
            self.rejected.remove(name);
        }
        for (name, reason) in &d.rejected {
            self.rejected.insert(name.clone(), reason.clone());
        }
    }
}
