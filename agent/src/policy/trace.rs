//! `berthctl policy trace`: the verdict a new connection would get, and why, without a packet.
use super::compile::{Compiler, Snapshot};
use super::identity::{HOST, REMOTE_NODE, WORLD, reserved_name};
use super::{
    Compiled, Direction, EndpointPolicy, Entry, Identity, Origin, PodKey, PolicyName, Protocol,
};
use crate::error::{Error, Result};
use std::fmt;
use std::net::Ipv4Addr;

/// One end of a traced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracePeer {
    /// A pod (of any node).
    Pod { namespace: String, name: String },
    /// An address: a pod's (then it is that pod), a node's, or outside the cluster.
    Ip(Ipv4Addr),
    /// This node's own stack.
    Host,
}

impl TracePeer {
    /// `namespace/name`, an IPv4 address, or `host`.
    pub fn parse(s: &str) -> Result<TracePeer> {
        if s == "host" {
            return Ok(TracePeer::Host);
        }
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(TracePeer::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(TracePeer::Pod {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(Error::InvalidArgument(format!(
                "{s:?}: expected <namespace>/<pod>, an IPv4 address or \"host\""
            ))),
        }
    }
}

/// The verdict of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfVerdict {
    /// This end is no pod endpoint (an address, a node): no policy applies on this side.
    NotEnforced,
    /// No policy of this direction selects the pod.
    NotIsolated,
    /// Isolated, and at least one entry matches.
    Allowed,
    /// Isolated, and no entry matches.
    Denied,
}

/// One side of a trace: the source's egress or the destination's ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfTrace {
    pub direction: Direction,
    /// The pod whose policy applies (`namespace/name`), if this end is one.
    pub endpoint: Option<String>,
    /// The node enforcing it.
    pub node: Option<String>,
    /// The other end as that node's datapath sees it.
    pub peer_identity: Identity,
    pub peer_addr: Option<Ipv4Addr>,
    pub verdict: HalfVerdict,
    /// Policies of this direction selecting the endpoint.
    pub policies: Vec<PolicyName>,
    /// Entries that allow the connection, with their origins.
    pub matched: Vec<(Entry, Vec<Origin>)>,
}

/// The verdict of a traced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Both sides allow it.
    pub allowed: bool,
    pub egress: HalfTrace,
    pub ingress: HalfTrace,
}

impl Trace {
    /// Human-readable lines, one per side and one for the verdict.
    pub fn explanation(&self) -> Vec<String> {
        let mut lines = vec![self.egress.to_string(), self.ingress.to_string()];
        let verdict = match (self.egress.verdict, self.ingress.verdict) {
            (HalfVerdict::Denied, HalfVerdict::Denied) => {
                "DENIED by the egress policy of the source and the ingress policy of the destination"
            }
            (HalfVerdict::Denied, _) => "DENIED by the egress policy of the source",
            (_, HalfVerdict::Denied) => "DENIED by the ingress policy of the destination",
            _ => "ALLOWED",
        };
        lines.push(format!("verdict: {verdict}"));
        lines
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explanation().join("\n"))
    }
}

fn describe_identity(id: Identity) -> String {
    match reserved_name(id) {
        Some(n) => format!("{id} ({n})"),
        None => id.to_string(),
    }
}

impl fmt::Display for HalfTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(ep) = &self.endpoint else {
            return write!(f, "{}: not a pod, no policy applies", self.direction);
        };
        let node = self.node.as_deref().unwrap_or("?");
        let peer = match self.peer_addr {
            Some(a) => format!(
                "peer {a} identity {}",
                describe_identity(self.peer_identity)
            ),
            None => format!("peer identity {}", describe_identity(self.peer_identity)),
        };
        match self.verdict {
            HalfVerdict::NotEnforced => write!(f, "{} of {ep}: not enforced", self.direction),
            HalfVerdict::NotIsolated => write!(
                f,
                "{} of {ep} (node {node}): not isolated, no {} policy selects it: allowed",
                self.direction, self.direction
            ),
            HalfVerdict::Allowed | HalfVerdict::Denied => {
                let policies: Vec<String> = self.policies.iter().map(|p| p.to_string()).collect();
                write!(
                    f,
                    "{} of {ep} (node {node}): isolated by {}; {peer}: ",
                    self.direction,
                    policies.join(", ")
                )?;
                if self.verdict == HalfVerdict::Denied {
                    return f.write_str("denied, no entry matches");
                }
                let matched: Vec<String> = self
                    .matched
                    .iter()
                    .map(|(e, o)| {
                        let o: Vec<String> = o.iter().map(|o| o.to_string()).collect();
                        format!("{e} [{}]", o.join("; "))
                    })
                    .collect();
                write!(f, "allowed by {}", matched.join(", "))
            }
        }
    }
}

/// One resolved end.
enum End {
    /// Index in the snapshot's pods.
    Pod(usize),
    Addr(Ipv4Addr),
    Host,
}

pub(crate) fn trace(
    snap: &Snapshot,
    compiled: &Compiled,
    src: &TracePeer,
    dst: &TracePeer,
    proto: Protocol,
    port: u16,
) -> Result<Trace> {
    let src = resolve(snap, src)?;
    let dst = resolve(snap, dst)?;
    let compiler = Compiler::new(snap);
    let egress = half(
        snap,
        compiled,
        &compiler,
        Direction::Egress,
        &src,
        &dst,
        proto,
        port,
    );
    let ingress = half(
        snap,
        compiled,
        &compiler,
        Direction::Ingress,
        &dst,
        &src,
        proto,
        port,
    );
    Ok(Trace {
        allowed: egress.verdict != HalfVerdict::Denied && ingress.verdict != HalfVerdict::Denied,
        egress,
        ingress,
    })
}

fn resolve(snap: &Snapshot, p: &TracePeer) -> Result<End> {
    Ok(match p {
        TracePeer::Pod { namespace, name } => {
            let i = snap.find(namespace, name).ok_or_else(|| {
                Error::NotFound(format!(
                    "pod {namespace}/{name} (unknown, host-network or terminated)"
                ))
            })?;
            End::Pod(i)
        }
        TracePeer::Ip(a) => match snap.pod_by_ip.get(a) {
            Some(&i) => End::Pod(i as usize),
            None => End::Addr(*a),
        },
        TracePeer::Host => End::Host,
    })
}

/// The identity and address of `end` as the datapath of `node` sees them.
fn seen_from(snap: &Snapshot, end: &End, node: Option<&str>) -> (Identity, Option<Ipv4Addr>) {
    let node_relative = |n: &str| if Some(n) == node { HOST } else { REMOTE_NODE };
    match end {
        End::Pod(i) => (snap.identity[*i], snap.pods[*i].ips.first().copied()),
        End::Host => (node_relative(&snap.node), snap.node_ip(&snap.node)),
        End::Addr(a) => match snap.node_ips.get(a) {
            Some(n) => (node_relative(n), Some(*a)),
            None => (WORLD, Some(*a)),
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn half(
    snap: &Snapshot,
    compiled: &Compiled,
    compiler: &Compiler<'_>,
    direction: Direction,
    this: &End,
    other: &End,
    proto: Protocol,
    port: u16,
) -> HalfTrace {
    let End::Pod(index) = this else {
        let (peer_identity, peer_addr) = seen_from(snap, other, None);
        return HalfTrace {
            direction,
            endpoint: None,
            node: None,
            peer_identity,
            peer_addr,
            verdict: HalfVerdict::NotEnforced,
            policies: Vec::new(),
            matched: Vec::new(),
        };
    };
    let pod = &snap.pods[*index];
    let node = pod.node_name.as_deref();
    let (peer_identity, peer_addr) = seen_from(snap, other, node);
    let owned;
    let key: PodKey = (pod.namespace.clone(), pod.name.clone());
    let ep: &EndpointPolicy = match compiled.endpoints.get(&key) {
        Some(ep) => ep,
        None => {
            owned = compiler.endpoint(*index);
            &owned
        }
    };
    let side = ep.direction(direction);
    let matched: Vec<(Entry, Vec<Origin>)> = side
        .matching(peer_identity, peer_addr, proto, port)
        .into_iter()
        .map(|(e, o)| (*e, o.iter().cloned().collect()))
        .collect();
    let verdict = if !side.isolated {
        HalfVerdict::NotIsolated
    } else if matched.is_empty() {
        HalfVerdict::Denied
    } else {
        HalfVerdict::Allowed
    };
    HalfTrace {
        direction,
        endpoint: Some(pod.display_name()),
        node: node.map(str::to_string),
        peer_identity,
        peer_addr,
        verdict,
        policies: side.policies.iter().map(|p| (**p).clone()).collect(),
        matched: if side.isolated { matched } else { Vec::new() },
    }
}
