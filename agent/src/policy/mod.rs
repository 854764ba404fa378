//! The NetworkPolicy engine (issue 9, userspace half): Kubernetes objects from the
//! [`crate::cluster::ClusterModel`] in, per-endpoint policy entries and their
//! differences out (DESIGN §3.4, §8). Plain synchronous code; the datapath half (per-endpoint
//! policy map, identities in the ipcache, conntrack) applies what it produces.
//!
//! # Pipeline
//!
//! 1. **Policies** are validated (module `parse`); an invalid one (unknown operator, bad CIDR, port out
//!    of range, `endPort` without a numeric port or below it, unknown protocol, a peer with no or
//!    with conflicting selectors, …) is rejected with a reason ([`Compiled::rejected`]) and treated
//!    as absent: it never changes what other policies allow or deny.
//! 2. **Identities** ([`identity`]): every pod that can be a peer (scheduled or not, not
//!    `hostNetwork`, not terminated) has a label set (its labels, its namespace's labels and
//!    name) and each distinct set a numeric identity; reserved identities name this node, other
//!    nodes and the world. [`Compiled::ipcache`] maps every pod address (and node address) to its
//!    identity; any other address is [`WORLD`].
//! 3. **Compilation**: for every *local* endpoint (a pod bound to this node), for each direction,
//!    either *not isolated* (no policy of that type selects it: everything passes) or *isolated*
//!    with a set of allowed [`Entry`]s: (peer, protocol, port range), where the peer is
//!    [`Peer::Any`] (a rule without peers), an [`Peer::Identity`] (pod/namespace selectors,
//!    expanded to the identities they match now) or a [`Peer::Cidr`] (an `ipBlock` with its
//!    `except`s subtracted, so every CIDR entry is a pure allow; it applies to pod addresses
//!    too). Each entry carries its provenance ([`Origin`]: policy and rule). Named ports resolve
//!    per pod: ingress against the endpoint's own container ports, egress against each
//!    destination pod's, which yields `/32` CIDR entries for those pods.
//! 4. **Differences** ([`diff`]): the previous and the new [`Compiled`] give per-endpoint entries
//!    to add and remove, isolation switches, and ipcache/identity changes; a changed policy or
//!    label touches only the entries it produces. [`PolicyDiff`] documents the order in which
//!    the datapath applies them so that no allowed traffic is dropped and no denied traffic
//!    passes in between.
//! 5. **Trace** ([`PolicyEngine::trace`]): the verdict a connection would get, with the entries
//!    and policies that decide it, for `berthctl policy trace`.
//!
//! # How the datapath evaluates a new connection
//!
//! A packet from `src` to `dst` (protocol, destination port) is allowed when the egress side of
//! `src` (if `src` is a local endpoint) AND the ingress side of `dst` (if `dst` is a local
//! endpoint) allow it. One side allows when it is not isolated, or when one entry matches: its
//! peer is `Any`, or the identity of the other end (ipcache lookup of its address; [`WORLD`] when
//! unknown; [`HOST`] for this node's own stack) equals the entry's, or the other end's address
//! is inside the entry's CIDR — and the protocol and port match. An isolated ingress side always
//! holds `(HOST, any, any)` (origin [`Origin::HostAccess`]): the node reaches its own pods
//! (kubelet probes). Replies of an allowed connection pass through conntrack (datapath half).
//!
//! Lowering for the maps: identity entries key a hash/LPM map by (endpoint, direction, identity,
//! protocol, port prefix) — [`PortRange::prefixes`] splits a range into aligned prefixes, Peer
//! `Any` is identity [`WILDCARD`] (0), protocol "any" is 0; CIDR entries go to a per-endpoint
//! LPM trie keyed by address whose value lists the (protocol, port range)s of every covering
//! prefix ([`DirectionPolicy::cidr_lpm`]), so one longest-prefix lookup answers.
mod compile;
mod diff;
pub mod identity;
pub mod lower;
mod parse;
pub mod reconcile;
pub mod selector;
#[cfg(test)]
mod tests;
mod trace;

pub use compile::compile;
pub use diff::{DirectionDiff, EndpointChange, EndpointDiff, PolicyDiff, diff};
pub use identity::{
    FIRST_CLUSTER, HOST, Identity, IdentityAllocator, LabelSet, REMOTE_NODE, WILDCARD, WORLD,
};
pub use selector::Selector;
pub use trace::{HalfTrace, HalfVerdict, Trace, TracePeer};

use crate::cluster::ClusterModel;
use crate::error::Result;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// A NetworkPolicy's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An L4 protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number (6, 17, 132).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API validates it).
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// Direction of traffic, seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn is_all(&self) -> bool {
        *self == PortRange::ALL
    }

    /// The range as aligned (port, prefix length) blocks, for a map keyed by port prefix: at
    /// most 30 blocks; `[(0, 0)]` for every port, `[(p, 16)]` for one port.
    pub fn prefixes(&self) -> Vec<(u16, u8)> {
        let mut out = Vec::new();
        let mut lo = u32::from(self.first);
        let hi = u32::from(self.last);
        while lo <= hi {
            // The largest aligned block starting at lo that fits in [lo, hi].
            let mut size: u32 = if lo == 0 {
                1 << 16
            } else {
                1 << lo.trailing_zeros()
            };
            while lo + size - 1 > hi {
                size >>= 1;
            }
            out.push((lo as u16, 16 - size.trailing_zeros() as u8));
            lo += size;
        }
        out
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The other end of a connection an entry allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Any peer at all (a rule without `from`/`to`): identity [`WILDCARD`] in the map.
    Any,
    /// Pods with this identity.
    Identity(Identity),
    /// Any address in this prefix (pods included).
    Cidr(Ipv4Net),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Any => f.write_str("any"),
            Peer::Identity(id) => match identity::reserved_name(*id) {
                Some(name) => write!(f, "identity {id} ({name})"),
                None => write!(f, "identity {id}"),
            },
            Peer::Cidr(net) => write!(f, "cidr {net}"),
        }
    }
}

/// One allowed (peer, protocol, ports) of an endpoint's direction. `proto` None means every
/// protocol (ICMP too) and then `ports` is [`PortRange::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub peer: Peer,
    pub proto: Option<Protocol>,
    pub ports: PortRange,
}

impl Entry {
    /// Every protocol and port from/to `peer`.
    pub fn any_l4(peer: Peer) -> Entry {
        Entry {
            peer,
            proto: None,
            ports: PortRange::ALL,
        }
    }

    /// Whether this entry allows a connection with a peer of identity `peer_id` at `peer_addr`
    /// (None: the peer has no address, e.g. this node's own stack) on `proto`/`port`, exactly as
    /// the datapath decides it.
    pub fn matches(
        &self,
        peer_id: Identity,
        peer_addr: Option<Ipv4Addr>,
        proto: Protocol,
        port: u16,
    ) -> bool {
        let peer = match self.peer {
            Peer::Any => true,
            Peer::Identity(id) => id == peer_id,
            Peer::Cidr(net) => peer_addr.is_some_and(|a| net.contains(&a)),
        };
        peer && self.proto.is_none_or(|p| p == proto) && self.ports.contains(port)
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            None => write!(f, "{} any", self.peer),
            Some(p) => write!(f, "{} {p}/{}", self.peer, self.ports),
        }
    }
}

/// Why an entry exists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Rule `rule` (index in `spec.ingress` / `spec.egress`) of a policy.
    Rule { policy: Arc<PolicyName>, rule: u32 },
    /// The node always reaches its local pods (kubelet probes).
    HostAccess,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Rule { policy, rule } => write!(f, "{policy} rule {rule}"),
            Origin::HostAccess => f.write_str("node access to its pods"),
        }
    }
}

/// What is in force for one direction of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirectionPolicy {
    /// Some policy of this direction's type selects the endpoint: only `entries` pass.
    pub isolated: bool,
    /// The (valid) policies of this type selecting the endpoint.
    pub policies: BTreeSet<Arc<PolicyName>>,
    /// Allowed (peer, protocol, ports), each with the rules that produce it. Empty when not
    /// isolated.
    pub entries: BTreeMap<Entry, BTreeSet<Origin>>,
}

impl DirectionPolicy {
    /// Whether this side lets the connection pass (see [`Entry::matches`]).
    pub fn allows(
        &self,
        peer_id: Identity,
        peer_addr: Option<Ipv4Addr>,
        proto: Protocol,
        port: u16,
    ) -> bool {
        !self.isolated
            || self
                .entries
                .keys()
                .any(|e| e.matches(peer_id, peer_addr, proto, port))
    }

    /// The entries that allow the connection, with their origins.
    pub fn matching(
        &self,
        peer_id: Identity,
        peer_addr: Option<Ipv4Addr>,
        proto: Protocol,
        port: u16,
    ) -> Vec<(&Entry, &BTreeSet<Origin>)> {
        self.entries
            .iter()
            .filter(|(e, _)| e.matches(peer_id, peer_addr, proto, port))
            .collect()
    }

    /// The CIDR entries as a longest-prefix-match table: for each prefix of an entry, the
    /// (protocol, ports) of every entry whose prefix contains it, so one LPM lookup of the peer
    /// address yields everything CIDR entries allow for it.
    pub fn cidr_lpm(&self) -> BTreeMap<Ipv4Net, BTreeSet<(Option<Protocol>, PortRange)>> {
        let cidrs: Vec<(Ipv4Net, (Option<Protocol>, PortRange))> = self
            .entries
            .keys()
            .filter_map(|e| match e.peer {
                Peer::Cidr(net) => Some((net, (e.proto, e.ports))),
                _ => None,
            })
            .collect();
        let mut out: BTreeMap<Ipv4Net, BTreeSet<_>> = BTreeMap::new();
        for (net, _) in &cidrs {
            let rules = cidrs
                .iter()
                .filter(|(outer, _)| outer.contains(net))
                .map(|(_, l4)| *l4)
                .collect();
            out.insert(*net, rules);
        }
        out
    }
}

/// What is in force for one local endpoint (a pod bound to this node).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointPolicy {
    /// The pod's `metadata.uid` (the CNI endpoint is matched by namespace/name/UID).
    pub uid: String,
    /// The pod's addresses as the model knows them (may be empty before the CNI reported).
    pub ips: Vec<Ipv4Addr>,
    /// The pod's own identity.
    pub identity: Identity,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, d: Direction) -> &DirectionPolicy {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub(crate) fn direction_mut(&mut self, d: Direction) -> &mut DirectionPolicy {
        match d {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// The compiled state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compiled {
    /// The node it was compiled for.
    pub node: String,
    /// Every local endpoint's policy, by (namespace, name).
    pub endpoints: BTreeMap<PodKey, EndpointPolicy>,
    /// Address → identity of every pod (and node) address in the cluster.
    pub ipcache: BTreeMap<Ipv4Addr, Identity>,
    /// The label-set identities in use, with their labels.
    pub identities: BTreeMap<Identity, Arc<LabelSet>>,
    /// Invalid policies with the reason.
    pub rejected: BTreeMap<PolicyName, String>,
}

impl Compiled {
    /// The identity the datapath sees for a packet from/to `addr`: the ipcache's, else
    /// [`WORLD`].
    pub fn identity_of(&self, addr: Ipv4Addr) -> Identity {
        self.ipcache.get(&addr).copied().unwrap_or(WORLD)
    }

    /// Number of entries over every endpoint and direction.
    pub fn entry_count(&self) -> usize {
        self.endpoints
            .values()
            .map(|e| e.ingress.entries.len() + e.egress.entries.len())
            .sum()
    }
}

/// The engine of one node: compiles the model on every change and hands out the difference.
pub struct PolicyEngine {
    node: String,
    identities: IdentityAllocator,
    compiled: Compiled,
    snapshot: Arc<compile::Snapshot>,
}

impl PolicyEngine {
    /// An engine for the node `node_name`, with nothing compiled yet.
    pub fn new(node_name: impl Into<String>) -> PolicyEngine {
        let node = node_name.into();
        PolicyEngine {
            compiled: Compiled {
                node: node.clone(),
                ..Default::default()
            },
            snapshot: Arc::new(compile::Snapshot::empty(&node)),
            node,
            identities: IdentityAllocator::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Compiles `model` and returns what changed since the previous call (everything, the
    /// first time). Rejected policies are logged when they are first seen or their reason
    /// changes.
    pub fn update(&mut self, model: &ClusterModel) -> PolicyDiff {
        let (next, snapshot) =
            compile::compile_with_snapshot(model, &self.node, &mut self.identities);
        for (name, reason) in &next.rejected {
            if self.compiled.rejected.get(name) != Some(reason) {
                tracing::warn!(policy = %name, reason, "NetworkPolicy rejected; it is ignored");
            }
        }
        for name in self.compiled.rejected.keys() {
            if !next.rejected.contains_key(name) {
                tracing::info!(policy = %name, "NetworkPolicy no longer rejected");
            }
        }
        let d = diff(&self.compiled, &next);
        self.compiled = next;
        self.snapshot = snapshot;
        d
    }

    /// The state compiled by the last [`PolicyEngine::update`].
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The policy of a local endpoint.
    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<&EndpointPolicy> {
        self.compiled
            .endpoints
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// The identity allocator (for `berthctl` and metrics).
    pub fn identities(&self) -> &IdentityAllocator {
        &self.identities
    }

    /// Explains the verdict a new connection from `src` to `dst` on `proto`/`port` gets, from
    /// the last compiled model (both ends may be pods of any node).
    pub fn trace(
        &self,
        src: &TracePeer,
        dst: &TracePeer,
        proto: Protocol,
        port: u16,
    ) -> Result<Trace> {
        trace::trace(&self.snapshot, &self.compiled, src, dst, proto, port)
    }
}
