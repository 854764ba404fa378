//! The typed in-memory model of the cluster, the watched kinds, and what routing reads of a Node.
use ipnet::Ipv4Net;
use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::{Node, Pod};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One typed in-memory model of the cluster as this node needs it.
///
/// Later issues add namespaces, network policies, services and endpoint slices as further maps;
/// see [`Kind`] for the one place that lists what is watched.
#[derive(Debug, Clone, Default)]
pub struct ClusterModel {
    /// Every Node, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Pods with `spec.nodeName` == this node, by (namespace, name).
    pub local_pods: BTreeMap<(String, String), Pod>,
    /// True once every watched kind has been listed at least once.
    pub synced: bool,
    /// Bumped on every published change.
    pub revision: u64,
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
    }

    /// Number of objects of `kind` in the model.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Node => self.nodes.len(),
            Kind::Pod => self.local_pods.len(),
        }
    }

    /// Inserts or replaces `obj`; an object outside this node's scope (a pod of another node) is
    /// removed instead, so a stale copy never lingers.
    pub(crate) fn upsert(&mut self, obj: Object, node_name: &str) {
        if !obj.in_scope(node_name) {
            self.remove(&obj);
            return;
        }
        match obj {
            Object::Node(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.nodes.insert(name, n);
            }
            Object::Pod(p) => {
                self.local_pods.insert(pod_key(&p), p);
            }
        }
    }

    /// Removes the object with `obj`'s identity (kind, namespace, name).
    pub(crate) fn remove(&mut self, obj: &Object) {
        match obj {
            Object::Node(n) => {
                self.nodes
                    .remove(n.metadata.name.as_deref().unwrap_or_default());
            }
            Object::Pod(p) => {
                self.local_pods.remove(&pod_key(p));
            }
        }
    }

    /// Replaces every object of `kind` by `objs` (a fresh list).
    pub(crate) fn replace_kind(&mut self, kind: Kind, objs: Vec<Object>, node_name: &str) {
        match kind {
            Kind::Node => self.nodes.clear(),
            Kind::Pod => self.local_pods.clear(),
        }
        for obj in objs {
            debug_assert_eq!(obj.kind(), kind);
            self.upsert(obj, node_name);
        }
    }
}

fn pod_key(p: &Pod) -> (String, String) {
    (
        p.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// The kinds this node watches: THE one list of them.
///
/// Adding a kind (Namespaces, NetworkPolicies, Services, EndpointSlices) means: a variant here and
/// in [`Kind::ALL`], its type, scope and selector in the `impl` below, an [`Object`] variant, a
/// field of [`ClusterModel`] (with its arms in `count`/`upsert`/`remove`/`replace_kind`/
/// `same_content`), and one arm in `KubeSource::spawn_kind` (its typed `Api`). The manifest
/// source dispatches on [`Kind::from_type`] and needs nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Every Node of the cluster.
    Node,
    /// Pods bound to this node (`spec.nodeName`).
    Pod,
}

impl Kind {
    /// Every watched kind.
    pub const ALL: &'static [Kind] = &[Kind::Node, Kind::Pod];

    /// `apiVersion` of the kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node => Node::API_VERSION,
            Kind::Pod => Pod::API_VERSION,
        }
    }

    /// `kind` of the kind.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => Node::KIND,
            Kind::Pod => Pod::KIND,
        }
    }

    /// Plural resource name, for logs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => Node::URL_PATH_SEGMENT,
            Kind::Pod => Pod::URL_PATH_SEGMENT,
        }
    }

    /// The watched kind with this `apiVersion` and `kind`, if any.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// Field selector restricting the watch to what this node needs (`None`: everything).
    pub fn field_selector(self, node_name: &str) -> Option<String> {
        match self {
            Kind::Node => None,
            Kind::Pod => Some(format!("spec.nodeName={node_name}")),
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
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
        }
    }

    /// Parses a JSON value of a watched kind into its typed object.
    pub fn from_value(kind: Kind, value: serde_json::Value) -> serde_json::Result<Object> {
        Ok(match kind {
            Kind::Node => Object::Node(serde_json::from_value(value)?),
            Kind::Pod => Object::Pod(serde_json::from_value(value)?),
        })
    }

    /// Whether this node keeps the object (the client-side twin of [`Kind::field_selector`]).
    pub fn in_scope(&self, node_name: &str) -> bool {
        match self {
            Object::Node(_) => true,
            Object::Pod(p) => {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name)
            }
        }
    }

    /// `namespace/name` (or `name`), for logs.
    pub fn display_name(&self) -> String {
        let meta = match self {
            Object::Node(n) => &n.metadata,
            Object::Pod(p) => &p.metadata,
        };
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match &meta.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    /// Drops what the agent never reads but costs memory on big clusters (`managedFields`).
    pub(crate) fn slim(mut self) -> Object {
        match &mut self {
            Object::Node(n) => n.metadata.managed_fields = None,
            Object::Pod(p) => p.metadata.managed_fields = None,
        }
        self
    }
}
