//! The typed in-memory model of the cluster, the watched kinds, and what routing reads of a Node.
use ipnet::Ipv4Net;
use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, Pod, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Weak};

/// One typed in-memory model of the cluster as this node needs it.
///
/// Later issues add services and endpoint slices as further maps; see [`Kind`] for the one place
/// that lists what is watched.
///
/// Cost: every pod of the cluster is kept, but only as a [`PodInfo`] (a few hundred bytes: what
/// policy needs) shared by `Arc` between the source's working copy and every published revision,
/// so publishing a model of 10 000 pods copies pointers, not pods. Only this node's pods are kept
/// whole (`local_pods`).
#[derive(Debug, Clone, Default)]
pub struct ClusterModel {
    /// Every Node, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Pods with `spec.nodeName` == this node, whole, by (namespace, name).
    pub local_pods: BTreeMap<(String, String), Pod>,
    /// Every Pod of the cluster (this node's included), as policy sees it, by (namespace, name).
    pub pods: BTreeMap<(String, String), Arc<PodInfo>>,
    /// Every Namespace, by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Every NetworkPolicy (networking.k8s.io/v1), by (namespace, name); shared by `Arc`
    /// between revisions like the pods.
    pub network_policies: BTreeMap<(String, String), Arc<NetworkPolicy>>,
    /// True once every watched kind has been listed at least once.
    pub synced: bool,
    /// Bumped on every published change.
    pub revision: u64,
}

/// What the agent keeps of any pod of the cluster: what NetworkPolicy needs (address, namespace,
/// labels, named container ports) and little else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName` (None: not scheduled yet).
    pub node_name: Option<String>,
    /// `metadata.labels` (interned: pods with the same labels share one map).
    pub labels: Arc<BTreeMap<String, String>>,
    /// IPv4 addresses of `status.podIPs` (or `status.podIP`), in order, without duplicates.
    pub ips: Vec<Ipv4Addr>,
    /// `spec.hostNetwork`: the pod uses its node's addresses; it is no policy endpoint or peer.
    pub host_network: bool,
    /// `status.phase` is `Succeeded` or `Failed`: its address may already belong to another pod.
    pub terminated: bool,
    /// Named ports of `spec.containers[].ports` (unnamed ones are of no use to policy;
    /// interned like the labels).
    pub named_ports: Arc<Vec<NamedPort>>,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    /// `containerPort` (values outside 1..=65535 are dropped when read).
    pub port: u16,
    /// `protocol` as written (`TCP` when omitted).
    pub protocol: String,
}

impl PodInfo {
    /// Extracts the policy view of a Pod.
    pub fn from_pod(p: &Pod) -> PodInfo {
        let (namespace, name) = pod_key(p);
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        let listed: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().map(|i| i.ip.as_str()).collect())
            .unwrap_or_default();
        let candidates = if listed.is_empty() {
            status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .collect()
        } else {
            listed
        };
        for ip in candidates {
            if let Ok(ip) = ip.trim().parse::<Ipv4Addr>()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        let mut named_ports = Vec::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for cp in c.ports.iter().flatten() {
                let (Some(pname), Ok(port)) = (cp.name.as_ref(), u16::try_from(cp.container_port))
                else {
                    continue;
                };
                if port == 0 || pname.is_empty() {
                    continue;
                }
                named_ports.push(NamedPort {
                    name: pname.clone(),
                    port,
                    protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                });
            }
        }
        PodInfo {
            namespace,
            name,
            uid: p.metadata.uid.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            labels: LABELS.intern(p.metadata.labels.clone().unwrap_or_default()),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            named_ports: PORTS.intern(named_ports),
        }
    }

    /// `namespace/name`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Pods of one workload share their labels and ports: one copy each, whatever the number of
/// pods.
static LABELS: Interner<BTreeMap<String, String>> = Interner::new();
static PORTS: Interner<Vec<NamedPort>> = Interner::new();

/// A content-addressed pool of shared values that holds them weakly: a value lives as long as
/// some pod (of any model revision) refers to it.
struct Interner<T> {
    buckets: std::sync::Mutex<Option<std::collections::HashMap<u64, Vec<Weak<T>>>>>,
    since_sweep: std::sync::atomic::AtomicUsize,
}

impl<T: std::hash::Hash + Eq> Interner<T> {
    const fn new() -> Interner<T> {
        Interner {
            buckets: std::sync::Mutex::new(None),
            since_sweep: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn intern(&self, value: T) -> Arc<T> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(&value);
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(Default::default);
        let bucket = map.entry(hash).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        if let Some(found) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|a| **a == value)
        {
            return found;
        }
        let shared = Arc::new(value);
        bucket.push(Arc::downgrade(&shared));
        // Now and then, forget values no pod uses any more.
        let n = self
            .since_sweep
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n >= 4096 && n >= map.len() {
            self.since_sweep
                .store(0, std::sync::atomic::Ordering::Relaxed);
            map.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
        }
        shared
    }
}

/// A copy of `p` holding only what [`PodInfo::from_pod`] reads: what the source keeps of a pod of
/// another node while a list is in progress or a manifest file is cached.
fn strip_pod(p: Pod) -> Pod {
    let Pod {
        metadata,
        spec,
        status,
    } = p;
    let metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        labels: metadata.labels,
        resource_version: metadata.resource_version,
        ..Default::default()
    };
    let spec = spec.map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        containers: s
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ports| {
                    ports
                        .into_iter()
                        .filter(|cp| cp.name.is_some())
                        .map(|cp| ContainerPort {
                            name: cp.name,
                            container_port: cp.container_port,
                            protocol: cp.protocol,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    let status = status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..Default::default()
    });
    Pod {
        metadata,
        spec,
        status,
    }
}

/// What routing needs of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// IPv4 pod CIDRs: `spec.podCIDRs`, or `spec.podCIDR` when that list is empty.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The first IPv4 `InternalIP` of `status.addresses`.
    pub internal_ip: Option<Ipv4Addr>,
    /// The `Ready` condition has status `"True"`.
    pub ready: bool,
}

impl NodeView {
    /// Extracts the routing view of a Node.
    pub fn from_node(node: &Node) -> NodeView {
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<&str> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if cidrs.is_empty()
            && let Some(cidr) = spec.and_then(|s| s.pod_cidr.as_deref())
        {
            cidrs.push(cidr);
        }
        let mut pod_cidrs = Vec::new();
        for cidr in cidrs {
            // IPv6 ranges (dual-stack clusters) are not routed by this datapath.
            if let Ok(net) = cidr.trim().parse::<Ipv4Net>() {
                let net = net.trunc();
                if !pod_cidrs.contains(&net) {
                    pod_cidrs.push(net);
                }
            }
        }
        let status = node.status.as_ref();
        let internal_ip = status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.trim().parse::<Ipv4Addr>().ok());
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            pod_cidrs,
            internal_ip,
            ready,
        }
    }
}

impl ClusterModel {
    /// The routing view of the Node called `name`.
    pub fn node_view(&self, name: &str) -> Option<NodeView> {
        self.nodes.get(name).map(NodeView::from_node)
    }

    /// The routing views of every Node, by name.
    pub fn node_views(&self) -> Vec<NodeView> {
        self.nodes.values().map(NodeView::from_node).collect()
    }

    /// The local pod with this `metadata.uid`.
    pub fn local_pod_by_uid(&self, uid: &str) -> Option<&Pod> {
        self.local_pods
            .values()
            .find(|p| p.metadata.uid.as_deref() == Some(uid))
    }

    /// True when both models hold the same objects and sync state (the revision is not compared).
    pub fn same_content(&self, other: &ClusterModel) -> bool {
        self.synced == other.synced
            && self.nodes == other.nodes
            && self.local_pods == other.local_pods
            && self.pods == other.pods
            && self.namespaces == other.namespaces
            && self.network_policies == other.network_policies
    }

    /// Number of objects of `kind` in the model (pods: of the whole cluster).
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Node => self.nodes.len(),
            Kind::Pod => self.pods.len(),
            Kind::Namespace => self.namespaces.len(),
            Kind::NetworkPolicy => self.network_policies.len(),
        }
    }

    /// Inserts or replaces `obj`. A Pod goes into `pods` (as a [`PodInfo`]) and, when it is bound
    /// to `node_name`, whole into `local_pods`; a pod that left this node leaves `local_pods`, so
    /// a stale copy never lingers.
    pub fn upsert(&mut self, obj: Object, node_name: &str) {
        match obj {
            Object::Node(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.nodes.insert(name, n);
            }
            Object::Pod(p) => {
                let key = pod_key(&p);
                let info = PodInfo::from_pod(&p);
                // Keep the shared copy when nothing policy reads changed (status updates).
                if self.pods.get(&key).is_none_or(|old| **old != info) {
                    self.pods.insert(key.clone(), Arc::new(info));
                }
                if Object::pod_is_local(&p, node_name) {
                    self.local_pods.insert(key, p);
                } else {
                    self.local_pods.remove(&key);
                }
            }
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, ns);
            }
            Object::NetworkPolicy(np) => {
                self.network_policies
                    .insert(namespaced_key(&np.metadata), Arc::new(np));
            }
        }
    }

    /// Removes the object with `obj`'s identity (kind, namespace, name).
    pub fn remove(&mut self, obj: &Object) {
        match obj {
            Object::Node(n) => {
                self.nodes
                    .remove(n.metadata.name.as_deref().unwrap_or_default());
            }
            Object::Pod(p) => {
                let key = pod_key(p);
                self.local_pods.remove(&key);
                self.pods.remove(&key);
            }
            Object::Namespace(ns) => {
                self.namespaces
                    .remove(ns.metadata.name.as_deref().unwrap_or_default());
            }
            Object::NetworkPolicy(np) => {
                self.network_policies.remove(&namespaced_key(&np.metadata));
            }
        }
    }

    /// Replaces every object of `kind` by `objs` (a fresh list).
    pub(crate) fn replace_kind(&mut self, kind: Kind, objs: Vec<Object>, node_name: &str) {
        match kind {
            Kind::Node => self.nodes.clear(),
            Kind::Pod => {
                // Keep the shared PodInfos of pods that did not change (a relist of 10 000 pods
                // allocates only for the changed ones).
                let mut old = std::mem::take(&mut self.pods);
                self.local_pods.clear();
                for obj in objs {
                    debug_assert_eq!(obj.kind(), kind);
                    if let Object::Pod(p) = &obj {
                        let key = pod_key(p);
                        if let Some(prev) = old.remove(&key) {
                            self.pods.insert(key, prev);
                        }
                    }
                    self.upsert(obj, node_name);
                }
                return;
            }
            Kind::Namespace => self.namespaces.clear(),
            Kind::NetworkPolicy => self.network_policies.clear(),
        }
        for obj in objs {
            debug_assert_eq!(obj.kind(), kind);
            self.upsert(obj, node_name);
        }
    }
}

fn pod_key(p: &Pod) -> (String, String) {
    namespaced_key(&p.metadata)
}

/// (namespace, name) of a namespaced object; a missing namespace is `default`.
fn namespaced_key(m: &ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".to_string()),
        m.name.clone().unwrap_or_default(),
    )
}

/// The kinds this node watches: THE one list of them.
///
/// Adding a kind (Services, EndpointSlices) means: a variant here and in [`Kind::ALL`], its type,
/// scope and selector in the `impl` below, an [`Object`] variant (with its arms in `from_value`,
/// `display_name`, `slim` and the manifest parser's namespace defaulting), a field of
/// [`ClusterModel`] (with its arms in `count`/`upsert`/`remove`/`replace_kind`/`same_content`),
/// and one arm in `KubeSource::spawn_kind` (its typed `Api`). The manifest source dispatches on
/// [`Kind::from_type`] and needs nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Every Node of the cluster.
    Node,
    /// Every Pod of the cluster (policy needs every pod's address, namespace and labels); this
    /// node's are also kept whole.
    Pod,
    /// Every Namespace (their labels, for namespaceSelectors).
    Namespace,
    /// Every NetworkPolicy (networking.k8s.io/v1).
    NetworkPolicy,
}

impl Kind {
    /// Every watched kind.
    pub const ALL: &'static [Kind] = &[Kind::Node, Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];

    /// `apiVersion` of the kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node => Node::API_VERSION,
            Kind::Pod => Pod::API_VERSION,
            Kind::Namespace => Namespace::API_VERSION,
            Kind::NetworkPolicy => NetworkPolicy::API_VERSION,
        }
    }

    /// `kind` of the kind.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => Node::KIND,
            Kind::Pod => Pod::KIND,
            Kind::Namespace => Namespace::KIND,
            Kind::NetworkPolicy => NetworkPolicy::KIND,
        }
    }

    /// Plural resource name, for logs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => Node::URL_PATH_SEGMENT,
            Kind::Pod => Pod::URL_PATH_SEGMENT,
            Kind::Namespace => Namespace::URL_PATH_SEGMENT,
            Kind::NetworkPolicy => NetworkPolicy::URL_PATH_SEGMENT,
        }
    }

    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy)
    }

    /// The watched kind with this `apiVersion` and `kind`, if any.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// Field selector restricting the watch to what this node needs (`None`: everything).
    /// Every kind is watched whole today (policy needs every pod); kept as the one place to
    /// restrict a later kind.
    pub fn field_selector(self, _node_name: &str) -> Option<String> {
        match self {
            Kind::Node | Kind::Pod | Kind::Namespace | Kind::NetworkPolicy => None,
        }
    }
}

/// One typed object of a watched kind.
// Every variant is a large k8s-openapi struct; boxing them would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(Node),
    Pod(Pod),
    Namespace(Namespace),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    /// Parses a JSON value of a watched kind into its typed object.
    pub fn from_value(kind: Kind, value: serde_json::Value) -> serde_json::Result<Object> {
        Ok(match kind {
            Kind::Node => Object::Node(serde_json::from_value(value)?),
            Kind::Pod => Object::Pod(serde_json::from_value(value)?),
            Kind::Namespace => Object::Namespace(serde_json::from_value(value)?),
            Kind::NetworkPolicy => Object::NetworkPolicy(serde_json::from_value(value)?),
        })
    }

    /// Whether this node keeps the whole object (a pod bound here), not only its summary.
    pub fn in_scope(&self, node_name: &str) -> bool {
        match self {
            Object::Pod(p) => Object::pod_is_local(p, node_name),
            Object::Node(_) | Object::Namespace(_) | Object::NetworkPolicy(_) => true,
        }
    }

    fn pod_is_local(p: &Pod, node_name: &str) -> bool {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name)
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Node(n) => &n.metadata,
            Object::Pod(p) => &p.metadata,
            Object::Namespace(ns) => &ns.metadata,
            Object::NetworkPolicy(np) => &np.metadata,
        }
    }

    pub(crate) fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Node(n) => &mut n.metadata,
            Object::Pod(p) => &mut p.metadata,
            Object::Namespace(ns) => &mut ns.metadata,
            Object::NetworkPolicy(np) => &mut np.metadata,
        }
    }

    /// `namespace/name` (or `name`), for logs.
    pub fn display_name(&self) -> String {
        let meta = self.metadata();
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match &meta.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    /// Drops what the agent never reads but costs memory on big clusters: `managedFields` of
    /// everything, and all but the policy view ([`PodInfo`]) of pods of other nodes.
    pub fn slim(mut self, node_name: &str) -> Object {
        self.metadata_mut().managed_fields = None;
        match self {
            Object::Pod(p) if !Object::pod_is_local(&p, node_name) => Object::Pod(strip_pod(p)),
            other => other,
        }
    }
}
