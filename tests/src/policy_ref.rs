//! An independent reference evaluator of Kubernetes NetworkPolicy (networking.k8s.io/v1): a
//! direct reading of the API's documented semantics, answering "is a new connection from `src`
//! to `dst` on `proto`/`port` allowed?" from the raw objects. It shares no code with the agent
//! (no `berth_agent` import): its own validation, selector matching and port resolution, and no
//! identities, entries or compilation — every question is answered from the objects again.
//!
//! Semantics read from the API reference (NetworkPolicySpec, NetworkPolicyIngressRule,
//! NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort, IPBlock, LabelSelector):
//! * a pod is isolated for ingress (egress) when some policy in its namespace selects it with
//!   `podSelector` and has `Ingress` (`Egress`) among its policy types; `policyTypes` omitted
//!   means `Ingress`, plus `Egress` when the policy has egress rules;
//! * traffic to an ingress-isolated pod passes when some rule of some such policy matches: each
//!   rule matches when one of its `from` peers matches the source (an empty or absent list:
//!   any source) AND one of its `ports` matches (empty or absent: any); egress likewise with `to`
//!   and the destination. A connection needs the source's egress AND the destination's ingress;
//! * a peer with `podSelector` alone: pods of the policy's namespace; `namespaceSelector` alone:
//!   every pod of the matching namespaces; both: pods matching the first in namespaces matching
//!   the second; `ipBlock`: addresses in `cidr` and in no `except` (pods' addresses too);
//! * a port: protocol (default TCP) equal, and `port` absent (every port), equal, within
//!   `port..=endPort`, or — a name — equal to the number of the destination pod's container port
//!   of that name and protocol;
//! * objects the API server's validation refuses do not exist: an invalid policy is ignored;
//! * the API server labels every namespace `kubernetes.io/metadata.name=<name>`;
//! * host-network and terminated pods are no endpoints and are not selected as pods (an
//!   implementation choice the API leaves open, shared with the agent);
//! * the node always reaches the pods on it (kubelet probes; the API leaves host traffic to the
//!   implementation).
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// The objects the evaluator reads.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub policies: Vec<NetworkPolicy>,
    /// (node name, node address).
    pub nodes: Vec<(String, Ipv4Addr)>,
}

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    Pod {
        namespace: String,
        name: String,
    },
    /// An address; a pod's address is that pod.
    Ip(Ipv4Addr),
    /// A node's own stack.
    Host(String),
}

impl Party {
    pub fn pod(namespace: &str, name: &str) -> Party {
        Party::Pod {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Party::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Party::Ip(a) => write!(f, "{a}"),
            Party::Host(n) => write!(f, "host:{n}"),
        }
    }
}

/// A resolved party: the pod if it is one, its address, and the node if it is a node's stack.
struct Resolved<'a> {
    pod: Option<&'a Pod>,
    addr: Option<Ipv4Addr>,
    host_of: Option<&'a str>,
}

fn ns_of(p: &Pod) -> &str {
    p.metadata.namespace.as_deref().unwrap_or("default")
}

fn pod_labels(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

fn pod_addr(p: &Pod) -> Option<Ipv4Addr> {
    let st = p.status.as_ref()?;
    let from_list = st
        .pod_ips
        .iter()
        .flatten()
        .find_map(|i| i.ip.parse::<Ipv4Addr>().ok());
    from_list.or_else(|| st.pod_ip.as_deref().and_then(|s| s.parse().ok()))
}

/// A pod that takes part in policy (not host-network, not terminated).
fn is_policy_pod(p: &Pod) -> bool {
    let host = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !host && !matches!(phase, Some("Succeeded") | Some("Failed"))
}

impl Objects {
    fn resolve<'a>(&'a self, party: &'a Party) -> Resolved<'a> {
        match party {
            Party::Pod { namespace, name } => {
                let pod = self.pods.iter().find(|p| {
                    ns_of(p) == namespace
                        && p.metadata.name.as_deref() == Some(name.as_str())
                        && is_policy_pod(p)
                });
                let pod = pod.unwrap_or_else(|| panic!("reference: no pod {party}"));
                Resolved {
                    pod: Some(pod),
                    addr: pod_addr(pod),
                    host_of: None,
                }
            }
            Party::Ip(a) => Resolved {
                pod: self
                    .pods
                    .iter()
                    .find(|p| is_policy_pod(p) && pod_addr(p) == Some(*a)),
                addr: Some(*a),
                host_of: None,
            },
            Party::Host(n) => Resolved {
                pod: None,
                addr: self
                    .nodes
                    .iter()
                    .find(|(name, _)| name == n)
                    .map(|(_, a)| *a),
                host_of: Some(n.as_str()),
            },
        }
    }

    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    }

    /// The valid policies.
    fn valid_policies(&self) -> impl Iterator<Item = (&str, &NetworkPolicySpec)> {
        self.policies.iter().filter_map(|np| {
            let spec = np.spec.as_ref()?;
            validate(spec).ok()?;
            Some((np.metadata.namespace.as_deref().unwrap_or("default"), spec))
        })
    }

    /// Whether a new connection from `src` to `dst` on `proto` (`TCP`, `UDP`, `SCTP`) and
    /// destination port `port` is allowed.
    pub fn allowed(&self, src: &Party, dst: &Party, proto: &str, port: u16) -> bool {
        let s = self.resolve(src);
        let d = self.resolve(dst);
        self.egress_allows(&s, &d, proto, port) && self.ingress_allows(&s, &d, proto, port)
    }

    fn egress_allows(&self, s: &Resolved, d: &Resolved, proto: &str, port: u16) -> bool {
        let Some(src_pod) = s.pod else { return true };
        let mut isolated = false;
        for (ns, spec) in self.valid_policies() {
            if ns != ns_of(src_pod) || !selects(spec, src_pod) || !types(spec).1 {
                continue;
            }
            isolated = true;
            for rule in spec.egress.iter().flatten() {
                if peers_match(self, ns, rule.to.as_deref(), d)
                    && ports_match(rule.ports.as_deref(), d.pod, proto, port)
                {
                    return true;
                }
            }
        }
        !isolated
    }

    fn ingress_allows(&self, s: &Resolved, d: &Resolved, proto: &str, port: u16) -> bool {
        let Some(dst_pod) = d.pod else { return true };
        let dst_node = dst_pod.spec.as_ref().and_then(|sp| sp.node_name.as_deref());
        if s.host_of.is_some() && s.host_of == dst_node {
            return true;
        }
        let mut isolated = false;
        for (ns, spec) in self.valid_policies() {
            if ns != ns_of(dst_pod) || !selects(spec, dst_pod) || !types(spec).0 {
                continue;
            }
            isolated = true;
            for rule in spec.ingress.iter().flatten() {
                if peers_match(self, ns, rule.from.as_deref(), s)
                    && ports_match(rule.ports.as_deref(), Some(dst_pod), proto, port)
                {
                    return true;
                }
            }
        }
        !isolated
    }
}

/// (ingress, egress) types in effect.
fn types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        Some(t) if !t.is_empty() => (
            t.iter().any(|x| x == "Ingress"),
            t.iter().any(|x| x == "Egress"),
        ),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

fn selects(spec: &NetworkPolicySpec, pod: &Pod) -> bool {
    let all = LabelSelector::default();
    label_match(spec.pod_selector.as_ref().unwrap_or(&all), &pod_labels(pod))
}

fn label_match(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => !have.is_some_and(|v| values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn peers_match(
    objs: &Objects,
    policy_ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    other: &Resolved,
) -> bool {
    let peers = match peers {
        None => return true,
        Some([]) => return true,
        Some(p) => p,
    };
    peers.iter().any(|peer| {
        if let Some(block) = &peer.ip_block {
            let Some(addr) = other.addr else { return false };
            let a = IpAddr::V4(addr);
            let inside = |c: &str| c.parse::<IpNet>().is_ok_and(|n| n.trunc().contains(&a));
            return inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e));
        }
        let Some(pod) = other.pod else { return false };
        let ns_ok = match &peer.namespace_selector {
            None => ns_of(pod) == policy_ns,
            Some(sel) => label_match(sel, &objs.namespace_labels(ns_of(pod))),
        };
        let pod_ok = match &peer.pod_selector {
            None => true,
            Some(sel) => label_match(sel, &pod_labels(pod)),
        };
        ns_ok && pod_ok
    })
}

fn ports_match(
    ports: Option<&[NetworkPolicyPort]>,
    dst: Option<&Pod>,
    proto: &str,
    port: u16,
) -> bool {
    let ports = match ports {
        None => return true,
        Some([]) => return true,
        Some(p) => p,
    };
    ports.iter().any(|p| {
        if p.protocol.as_deref().unwrap_or("TCP") != proto {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                (*n..=end).contains(&i32::from(port))
            }
            Some(IntOrString::String(name)) => dst.is_some_and(|pod| {
                pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
                    c.ports.iter().flatten().any(|cp| {
                        cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol.as_deref().unwrap_or("TCP") == proto
                            && cp.container_port == i32::from(port)
                    })
                })
            }),
        }
    })
}

/// The API server's validation of a NetworkPolicySpec, as far as this evaluator needs it.
pub fn validate(spec: &NetworkPolicySpec) -> Result<(), String> {
    fn selector(s: &LabelSelector) -> Result<(), String> {
        for (k, _) in s.match_labels.iter().flatten() {
            if k.is_empty() {
                return Err("empty label key".into());
            }
        }
        for e in s.match_expressions.iter().flatten() {
            let n = e.values.as_ref().map_or(0, Vec::len);
            match e.operator.as_str() {
                "In" | "NotIn" if n == 0 => return Err(format!("{} without values", e.operator)),
                "Exists" | "DoesNotExist" if n > 0 => {
                    return Err(format!("{} with values", e.operator));
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => return Err(format!("operator {other}")),
            }
            if e.key.is_empty() {
                return Err("empty key".into());
            }
        }
        Ok(())
    }
    fn peers(list: Option<&[NetworkPolicyPeer]>) -> Result<(), String> {
        for p in list.into_iter().flatten() {
            let sels = p.pod_selector.is_some() || p.namespace_selector.is_some();
            match &p.ip_block {
                Some(_) if sels => return Err("ipBlock with selectors".into()),
                None if !sels => return Err("empty peer".into()),
                Some(b) => {
                    let cidr: IpNet = b.cidr.parse().map_err(|_| format!("cidr {}", b.cidr))?;
                    for e in b.except.iter().flatten() {
                        let x: IpNet = e.parse().map_err(|_| format!("except {e}"))?;
                        let strict = cidr.trunc().contains(&x.network())
                            && x.prefix_len() > cidr.prefix_len()
                            && matches!(
                                (cidr, x),
                                (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
                            );
                        if !strict {
                            return Err(format!("except {e} outside {}", b.cidr));
                        }
                    }
                }
                None => {
                    if let Some(s) = &p.pod_selector {
                        selector(s)?;
                    }
                    if let Some(s) = &p.namespace_selector {
                        selector(s)?;
                    }
                }
            }
        }
        Ok(())
    }
    fn ports(list: Option<&[NetworkPolicyPort]>) -> Result<(), String> {
        for p in list.into_iter().flatten() {
            if let Some(proto) = &p.protocol
                && !["TCP", "UDP", "SCTP"].contains(&proto.as_str())
            {
                return Err(format!("protocol {proto}"));
            }
            match (&p.port, p.end_port) {
                (None, Some(_)) => return Err("endPort without port".into()),
                (Some(IntOrString::String(_)), Some(_)) => {
                    return Err("endPort with a named port".into());
                }
                (Some(IntOrString::String(name)), None) => {
                    let ok = (1..=15).contains(&name.len())
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && name.chars().any(|c| c.is_ascii_lowercase())
                        && !name.starts_with('-')
                        && !name.ends_with('-')
                        && !name.contains("--");
                    if !ok {
                        return Err(format!("port name {name}"));
                    }
                }
                (Some(IntOrString::Int(n)), end) => {
                    if !(1..=65535).contains(n) {
                        return Err(format!("port {n}"));
                    }
                    if let Some(e) = end
                        && !(*n..=65535).contains(&e)
                    {
                        return Err(format!("endPort {e}"));
                    }
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
    if let Some(s) = &spec.pod_selector {
        selector(s)?;
    }
    for t in spec.policy_types.iter().flatten() {
        if t != "Ingress" && t != "Egress" {
            return Err(format!("policy type {t}"));
        }
    }
    for r in spec.ingress.iter().flatten() {
        peers(r.from.as_deref())?;
        ports(r.ports.as_deref())?;
    }
    for r in spec.egress.iter().flatten() {
        peers(r.to.as_deref())?;
        ports(r.ports.as_deref())?;
    }
    Ok(())
}
