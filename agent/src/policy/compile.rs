//! Compilation of the model into per-endpoint policy entries.
use super::identity::{HOST, IdentityAllocator, LabelSet, REMOTE_NODE};
use super::parse::{ParsedPolicy, PeerSpec, PortSpec, Rule, parse_policy};
use super::{
    Compiled, Direction, EndpointPolicy, Entry, Identity, Origin, Peer, PodKey, PortRange, Protocol,
};
use crate::cluster::{ClusterModel, NodeView, PodInfo};
use ipnet::{IpNet, Ipv4Net};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The namespace label the API server sets on every namespace (to its name).
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What compilation reads of the model, kept by the engine for [`super::PolicyEngine::trace`].
/// Pods are held by position (no key copies): 10 000 pods cost a few pointers each here.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub node: String,
    /// Pods that take part in policy (not `hostNetwork`, not terminated), in (namespace, name)
    /// order.
    pub pods: Vec<Arc<PodInfo>>,
    /// The identity of each pod of `pods`.
    pub identity: Vec<Identity>,
    /// The first pod (index in `pods`) holding each address.
    pub pod_by_ip: BTreeMap<Ipv4Addr, u32>,
    /// Namespace labels (with the name label) of every namespace known or holding a pod.
    pub ns_labels: BTreeMap<String, Arc<BTreeMap<String, String>>>,
    /// Valid policies.
    pub policies: Vec<Arc<ParsedPolicy>>,
    /// Policy indexes by namespace.
    pub by_namespace: BTreeMap<String, Vec<usize>>,
    /// Label-set identities in use.
    pub identities: BTreeMap<Identity, Arc<LabelSet>>,
    /// Node InternalIP → node name.
    pub node_ips: BTreeMap<Ipv4Addr, String>,
}

impl Snapshot {
    pub fn empty(node: &str) -> Snapshot {
        Snapshot {
            node: node.to_string(),
            ..Default::default()
        }
    }

    /// The node's InternalIP.
    pub fn node_ip(&self, node: &str) -> Option<Ipv4Addr> {
        self.node_ips
            .iter()
            .find(|(_, n)| n.as_str() == node)
            .map(|(ip, _)| *ip)
    }

    /// Index of the pod `namespace/name`.
    pub fn find(&self, namespace: &str, name: &str) -> Option<usize> {
        self.pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
            .ok()
    }

    fn labels_of_namespace(&mut self, ns: &str) -> Arc<BTreeMap<String, String>> {
        self.ns_labels
            .entry(ns.to_string())
            .or_insert_with(|| Arc::new(BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), ns.into())])))
            .clone()
    }
}

/// Compiles `model` for the node `node`: allocates identities (in `identities`, which keeps them
/// stable across calls) and builds every local endpoint's policy.
pub fn compile(model: &ClusterModel, node: &str, identities: &mut IdentityAllocator) -> Compiled {
    compile_with_snapshot(model, node, identities).0
}

pub(crate) fn compile_with_snapshot(
    model: &ClusterModel,
    node: &str,
    alloc: &mut IdentityAllocator,
) -> (Compiled, Arc<Snapshot>) {
    let mut snap = Snapshot::empty(node);
    for (name, ns) in &model.namespaces {
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        snap.ns_labels.insert(name.clone(), Arc::new(labels));
    }
    // The model's map is in (namespace, name) order, so `pods` is sorted.
    snap.pods = model
        .pods
        .values()
        .filter(|p| !p.host_network && !p.terminated)
        .cloned()
        .collect();

    // Identities: known sets first, then new ones in canonical order (deterministic).
    let pods = std::mem::take(&mut snap.pods);
    let sets: Vec<LabelSet> = pods
        .iter()
        .map(|pod| LabelSet {
            namespace: pod.namespace.clone(),
            pod_labels: pod.labels.clone(),
            namespace_labels: snap.labels_of_namespace(&pod.namespace),
        })
        .collect();
    snap.pods = pods;
    let mut fresh: Vec<&LabelSet> = sets.iter().filter(|s| alloc.lookup(s).is_none()).collect();
    fresh.sort_by_cached_key(|s| s.canonical());
    fresh.dedup();
    for s in fresh {
        alloc.allocate(s);
    }
    snap.identity = sets.iter().map(|s| alloc.allocate(s)).collect();
    drop(sets);
    alloc.retain(&snap.identity.iter().copied().collect());
    snap.identities = alloc.iter().map(|(id, l)| (id, l.clone())).collect();

    // ipcache: node addresses, then pod addresses.
    let mut ipcache = BTreeMap::new();
    for n in model.nodes.values() {
        let v = NodeView::from_node(n);
        if let Some(ip) = v.internal_ip {
            snap.node_ips.insert(ip, v.name.clone());
            ipcache.insert(ip, if v.name == node { HOST } else { REMOTE_NODE });
        }
    }
    for (i, pod) in snap.pods.iter().enumerate() {
        for ip in &pod.ips {
            if let Some(&other) = snap.pod_by_ip.get(ip) {
                tracing::debug!(%ip, pod = %pod.display_name(),
                    holder = %snap.pods[other as usize].display_name(),
                    "address held by two pods; the first keeps it");
                continue;
            }
            snap.pod_by_ip.insert(*ip, i as u32);
            ipcache.insert(*ip, snap.identity[i]);
        }
    }

    // Policies.
    let mut rejected = BTreeMap::new();
    for np in model.network_policies.values() {
        match parse_policy(np) {
            Ok(p) => {
                let idx = snap.policies.len();
                snap.by_namespace
                    .entry(p.name.namespace.clone())
                    .or_default()
                    .push(idx);
                snap.policies.push(Arc::new(p));
            }
            Err(e) => {
                let name = super::PolicyName {
                    namespace: np
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    name: np.metadata.name.clone().unwrap_or_default(),
                };
                rejected.insert(name, e.to_string());
            }
        }
    }

    let snap = Arc::new(snap);
    let compiler = Compiler::new(&snap);
    let mut endpoints = BTreeMap::new();
    for (i, pod) in snap.pods.iter().enumerate() {
        if pod.node_name.as_deref() == Some(node) {
            let key: PodKey = (pod.namespace.clone(), pod.name.clone());
            endpoints.insert(key, compiler.endpoint(i));
        }
    }
    let compiled = Compiled {
        node: node.to_string(),
        endpoints,
        ipcache,
        identities: snap.identities.clone(),
        rejected,
    };
    (compiled, snap)
}

/// (policy index, direction, rule index).
type RuleKey = (usize, Direction, u32);
type Entries = Arc<Vec<Entry>>;

/// Compiles endpoints from a snapshot, caching what several endpoints share (the peers of a
/// rule, the destinations of an egress rule's named ports). A policy that selects no endpoint
/// costs only its selector test.
pub(crate) struct Compiler<'a> {
    snap: &'a Snapshot,
    peers: RefCell<HashMap<RuleKey, Arc<Vec<Peer>>>>,
    /// By (policy index, egress rule index).
    named_egress: RefCell<HashMap<(usize, u32), Entries>>,
}

impl<'a> Compiler<'a> {
    pub fn new(snap: &'a Snapshot) -> Compiler<'a> {
        Compiler {
            snap,
            peers: RefCell::default(),
            named_egress: RefCell::default(),
        }
    }

    /// The policy of the pod at `index` in the snapshot (local or not).
    pub fn endpoint(&self, index: usize) -> EndpointPolicy {
        let pod = &self.snap.pods[index];
        let mut ep = EndpointPolicy {
            uid: pod.uid.clone(),
            ips: pod.ips.clone(),
            identity: self.snap.identity[index],
            ..Default::default()
        };
        let selecting: Vec<usize> = self
            .snap
            .by_namespace
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| self.snap.policies[i].pod_selector.matches(&pod.labels))
            .collect();
        for dir in [Direction::Ingress, Direction::Egress] {
            let out = ep.direction_mut(dir);
            for &pi in &selecting {
                let policy = &self.snap.policies[pi];
                let rules = match dir {
                    Direction::Ingress => policy.ingress.as_ref(),
                    Direction::Egress => policy.egress.as_ref(),
                };
                let Some(rules) = rules else { continue };
                out.isolated = true;
                out.policies.insert(policy.name.clone());
                for rule in rules {
                    let origin = Origin::Rule {
                        policy: policy.name.clone(),
                        rule: rule.index,
                    };
                    for entry in self.rule_entries(pi, dir, rule, pod) {
                        out.entries.entry(entry).or_default().insert(origin.clone());
                    }
                }
            }
            if dir == Direction::Ingress && out.isolated {
                out.entries
                    .entry(Entry::any_l4(Peer::Identity(HOST)))
                    .or_default()
                    .insert(Origin::HostAccess);
            }
        }
        ep
    }

    /// The entries one rule gives the endpoint `pod`.
    fn rule_entries(&self, pi: usize, dir: Direction, rule: &Rule, pod: &PodInfo) -> Vec<Entry> {
        // (protocol, ports) the rule allows, named ports resolved here for ingress.
        let mut l4: Vec<(Option<Protocol>, PortRange)> = Vec::new();
        let mut named_egress = false;
        match &rule.ports {
            None => l4.push((None, PortRange::ALL)),
            Some(ports) => {
                for p in ports {
                    match p {
                        PortSpec::Numeric(proto, range) => l4.push((Some(*proto), *range)),
                        PortSpec::Named(proto, name) => match dir {
                            Direction::Ingress => {
                                if let Some(port) = resolve_named(pod, *proto, name) {
                                    l4.push((Some(*proto), PortRange::single(port)));
                                }
                            }
                            Direction::Egress => named_egress = true,
                        },
                    }
                }
            }
        }
        let mut out = Vec::new();
        if !l4.is_empty() {
            let peers = self.rule_peers(pi, dir, rule);
            for peer in peers.iter() {
                for (proto, ports) in &l4 {
                    out.push(Entry {
                        peer: *peer,
                        proto: *proto,
                        ports: *ports,
                    });
                }
            }
        }
        if named_egress {
            out.extend(self.named_egress_entries(pi, rule).iter().copied());
        }
        out
    }

    /// The peers of a rule (without named ports): `Any`, the identities its selectors match,
    /// the CIDRs of its ipBlocks.
    fn rule_peers(&self, pi: usize, dir: Direction, rule: &Rule) -> Arc<Vec<Peer>> {
        let key = (pi, dir, rule.index);
        if let Some(p) = self.peers.borrow().get(&key) {
            return p.clone();
        }
        let policy = &self.snap.policies[pi];
        let mut set = BTreeSet::new();
        match &rule.peers {
            None => {
                set.insert(Peer::Any);
            }
            Some(peers) => {
                for peer in peers {
                    match peer {
                        PeerSpec::Pods { .. } => {
                            for (id, labels) in &self.snap.identities {
                                if peer_selects(peer, &policy.name.namespace, labels) {
                                    set.insert(Peer::Identity(*id));
                                }
                            }
                        }
                        PeerSpec::Block { cidr, except } => {
                            for net in block_prefixes(cidr, except) {
                                set.insert(Peer::Cidr(net));
                            }
                        }
                    }
                }
            }
        }
        let peers = Arc::new(set.into_iter().collect::<Vec<_>>());
        self.peers.borrow_mut().insert(key, peers.clone());
        peers
    }

    /// Egress named ports resolve against each destination pod: `/32` entries for every address
    /// of every pod the rule's peers select that has a container port of that name and protocol.
    fn named_egress_entries(&self, pi: usize, rule: &Rule) -> Entries {
        let key = (pi, rule.index);
        if let Some(e) = self.named_egress.borrow().get(&key) {
            return e.clone();
        }
        let policy = &self.snap.policies[pi];
        let named: Vec<(Protocol, &str)> = rule
            .ports
            .iter()
            .flatten()
            .filter_map(|p| match p {
                PortSpec::Named(proto, name) => Some((*proto, name.as_str())),
                PortSpec::Numeric(..) => None,
            })
            .collect();
        let mut set = BTreeSet::new();
        for (i, dst) in self.snap.pods.iter().enumerate() {
            let ports: Vec<(Protocol, u16)> = named
                .iter()
                .filter_map(|(proto, name)| resolve_named(dst, *proto, name).map(|p| (*proto, p)))
                .collect();
            if ports.is_empty() {
                continue;
            }
            let labels = self.snap.identities.get(&self.snap.identity[i]);
            for ip in &dst.ips {
                // Only the address the ipcache gives this pod is its own.
                if self.snap.pod_by_ip.get(ip) != Some(&(i as u32)) {
                    continue;
                }
                let selected = match &rule.peers {
                    None => true,
                    Some(peers) => peers.iter().any(|peer| match peer {
                        PeerSpec::Pods { .. } => {
                            labels.is_some_and(|l| peer_selects(peer, &policy.name.namespace, l))
                        }
                        PeerSpec::Block { cidr, except } => {
                            let a = std::net::IpAddr::V4(*ip);
                            cidr.contains(&a) && !except.iter().any(|e| e.contains(&a))
                        }
                    }),
                };
                if !selected {
                    continue;
                }
                let host = Ipv4Net::new(*ip, 32).expect("/32");
                for (proto, port) in &ports {
                    set.insert(Entry {
                        peer: Peer::Cidr(host),
                        proto: Some(*proto),
                        ports: PortRange::single(*port),
                    });
                }
            }
        }
        let entries = Arc::new(set.into_iter().collect::<Vec<_>>());
        self.named_egress.borrow_mut().insert(key, entries.clone());
        entries
    }
}

/// Whether a pod/namespace-selector peer of a policy in `policy_ns` selects pods with `labels`.
fn peer_selects(peer: &PeerSpec, policy_ns: &str, labels: &LabelSet) -> bool {
    let PeerSpec::Pods { pods, namespaces } = peer else {
        return false;
    };
    let ns_ok = match namespaces {
        Some(sel) => sel.matches(&labels.namespace_labels),
        None => labels.namespace == policy_ns,
    };
    ns_ok
        && pods
            .as_ref()
            .is_none_or(|sel| sel.matches(&labels.pod_labels))
}

/// The container port `name`/`proto` of `pod`.
fn resolve_named(pod: &PodInfo, proto: Protocol, name: &str) -> Option<u16> {
    pod.named_ports
        .iter()
        .find(|p| p.name == name && p.protocol == proto.as_k8s())
        .map(|p| p.port)
}

/// The IPv4 prefixes of `cidr` minus `except` (an IPv6 block has none in this IPv4 datapath).
pub(crate) fn block_prefixes(cidr: &IpNet, except: &[IpNet]) -> Vec<Ipv4Net> {
    let IpNet::V4(cidr) = cidr else {
        return Vec::new();
    };
    let except: Vec<Ipv4Net> = except
        .iter()
        .filter_map(|e| match e {
            IpNet::V4(e) => Some(*e),
            IpNet::V6(_) => None,
        })
        .collect();
    let mut out = Vec::new();
    subtract(*cidr, &except, &mut out);
    out
}

fn subtract(net: Ipv4Net, except: &[Ipv4Net], out: &mut Vec<Ipv4Net>) {
    if except.iter().any(|e| e.contains(&net)) {
        return;
    }
    let inside: Vec<Ipv4Net> = except
        .iter()
        .filter(|e| net.contains(*e))
        .copied()
        .collect();
    if inside.is_empty() {
        out.push(net);
        return;
    }
    // Some except lies strictly inside: split in halves (net is not a /32 here).
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return;
    };
    for half in halves {
        subtract(half, &inside, out);
    }
}
