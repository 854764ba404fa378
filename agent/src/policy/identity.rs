//! Numeric security identities: one per distinct security-relevant label set (the pod's labels,
//! its namespace's labels and the namespace's name, as Cilium does), plus reserved ones.
//!
//! # Numbers
//!
//! | identity            | meaning                                                        |
//! |---------------------|----------------------------------------------------------------|
//! | 0 ([`WILDCARD`])    | never a peer: "any peer" in policy keys ([`super::Peer::Any`]) |
//! | 1 ([`HOST`])        | this node (its own stack: kubelet probes, host processes)      |
//! | 2 ([`WORLD`])       | any address the cluster does not know (outside the cluster)    |
//! | 3 ([`REMOTE_NODE`]) | another node of the cluster (its node IP)                      |
//! | 4..=255             | reserved for later (health, ingress, kube-apiserver)           |
//! | 256..=0xFF_FFFF     | label sets ([`FIRST_CLUSTER`]..=[`MAX`]): 24 bits, a VNI's size |
//!
//! # Scheme: deterministic, collision-checked
//!
//! A label set's identity is a pure function of its canonical form ([`LabelSet::canonical`]):
//! FNV-1a (64 bit) of it, folded into `256..=0xFF_FFFF` ([`LabelSet::hash_slot`]). Every node
//! computing from the same Kubernetes objects therefore gets the same number for the same label
//! set without talking to the others, which is what carrying the source identity in the VXLAN
//! VNI (24 bits) needs. The hash function and the canonical form are part of that cross-node
//! contract: changing either changes every identity (a datapath upgrade must treat it like a
//! layout change).
//!
//! The allocator checks collisions: a label set whose slot is taken by another in-use set gets
//! the next free number (linear probing) and is marked *probed*
//! ([`IdentityAllocator::is_hash_derived`] is false). Such a number depends on this node's
//! history and may differ on other nodes. With `n` label sets in use the expected number of
//! collisions is about n²/2²⁵ (0.03 at 1 000 sets, 3 at 10 000). **Limitation**: until a
//! cluster-wide allocator exists (e.g. a CRD, as Cilium's `CiliumIdentity`), a receiver must not
//! trust a VNI-carried identity that it knows as probed; the datapath should resolve the source
//! through its own ipcache (address → identity, computed locally from the same model and always
//! consistent on one node) whenever the carried identity is not hash-derived, or simply always.
//!
//! Stability: an identity stays the same while its label set is in use on this node (a pod has
//! it), across any number of recomputations; new label sets are allocated before unused ones are
//! released, so one update never re-purposes a number (entries keyed by a released identity are
//! removed in the same diff before the number can be reused by a later update).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A numeric security identity.
pub type Identity = u32;

/// "Any peer" in policy keys; never the identity of a packet.
pub const WILDCARD: Identity = 0;
/// This node's own stack.
pub const HOST: Identity = 1;
/// Outside the cluster.
pub const WORLD: Identity = 2;
/// Another node of the cluster.
pub const REMOTE_NODE: Identity = 3;
/// The first identity of a label set.
pub const FIRST_CLUSTER: Identity = 256;
/// The last identity (24 bits).
pub const MAX: Identity = 0xFF_FFFF;

/// Name of a reserved identity, if it is one.
pub fn reserved_name(id: Identity) -> Option<&'static str> {
    match id {
        WILDCARD => Some("any"),
        HOST => Some("host"),
        WORLD => Some("world"),
        REMOTE_NODE => Some("remote-node"),
        4..FIRST_CLUSTER => Some("reserved"),
        _ => None,
    }
}

/// The security-relevant labels of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's labels (shared with the pod's [`PodInfo`](crate::cluster::PodInfo)).
    pub pod_labels: Arc<BTreeMap<String, String>>,
    /// Its namespace's labels (with `kubernetes.io/metadata.name`, which the API server sets on
    /// every namespace; shared by every set of the namespace).
    pub namespace_labels: Arc<BTreeMap<String, String>>,
}

impl LabelSet {
    /// The canonical form hashed into the identity: one line per label, `namespace:<name>`, then
    /// `pod:<key>=<value>` and `ns:<key>=<value>` in key order. Label keys and values cannot hold
    /// `=` or a newline, so the form is unambiguous.
    pub fn canonical(&self) -> String {
        let mut s = format!("namespace:{}\n", self.namespace);
        for (k, v) in self.pod_labels.iter() {
            s.push_str(&format!("pod:{k}={v}\n"));
        }
        for (k, v) in self.namespace_labels.iter() {
            s.push_str(&format!("ns:{k}={v}\n"));
        }
        s
    }

    /// The identity this set gets when nothing collides with it.
    pub fn hash_slot(&self) -> Identity {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        for b in self.canonical().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        // Fold the high bits in, then map onto the label-set range.
        let h = h ^ (h >> 32) ^ (h >> 24);
        let span = u64::from(MAX - FIRST_CLUSTER + 1);
        FIRST_CLUSTER + (h % span) as Identity
    }

    /// `namespace=x, pod labels {…}` for logs and `berthctl`.
    pub fn describe(&self) -> String {
        let labels: Vec<String> = self
            .pod_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("ns={} [{}]", self.namespace, labels.join(","))
    }
}

/// Allocates and remembers identities of label sets.
#[derive(Debug, Default, Clone)]
pub struct IdentityAllocator {
    by_labels: HashMap<Arc<LabelSet>, Identity>,
    by_id: BTreeMap<Identity, Arc<LabelSet>>,
    /// Identities that are not their set's hash slot (a collision moved them).
    probed: BTreeSet<Identity>,
}

impl IdentityAllocator {
    pub fn new() -> IdentityAllocator {
        IdentityAllocator::default()
    }

    /// The identity of `labels`, allocating it if new.
    pub fn allocate(&mut self, labels: &LabelSet) -> Identity {
        if let Some(&id) = self.by_labels.get(labels) {
            return id;
        }
        let slot = labels.hash_slot();
        let mut id = slot;
        while self.by_id.contains_key(&id) {
            id = if id == MAX { FIRST_CLUSTER } else { id + 1 };
            assert_ne!(id, slot, "identity space exhausted");
        }
        if id != slot {
            tracing::warn!(
                identity = id,
                slot,
                labels = labels.describe(),
                taken_by = self.by_id[&slot].describe(),
                "security identity collision: this identity is local to this node"
            );
            self.probed.insert(id);
        }
        let labels = Arc::new(labels.clone());
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, labels);
        id
    }

    /// The identity of `labels`, if allocated.
    pub fn lookup(&self, labels: &LabelSet) -> Option<Identity> {
        self.by_labels.get(labels).copied()
    }

    /// The label set of `id`, if allocated.
    pub fn labels(&self, id: Identity) -> Option<&Arc<LabelSet>> {
        self.by_id.get(&id)
    }

    /// Every allocated identity with its labels.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &Arc<LabelSet>)> {
        self.by_id.iter().map(|(id, l)| (*id, l))
    }

    /// Number of allocated identities.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether `id` is its label set's hash slot, so every node agrees on it.
    pub fn is_hash_derived(&self, id: Identity) -> bool {
        self.by_id.contains_key(&id) && !self.probed.contains(&id)
    }

    /// Releases every identity not in `in_use`; returns the released ones.
    pub fn retain(&mut self, in_use: &BTreeSet<Identity>) -> Vec<Identity> {
        let gone: Vec<Identity> = self
            .by_id
            .keys()
            .filter(|id| !in_use.contains(id))
            .copied()
            .collect();
        for id in &gone {
            if let Some(labels) = self.by_id.remove(id) {
                self.by_labels.remove(&labels);
            }
            self.probed.remove(id);
        }
        gone
    }
}
