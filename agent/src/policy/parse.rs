//! Validation of a NetworkPolicy into the engine's form. An invalid policy is rejected whole
//! with a reason naming the field, as the API server's validation would have refused it; the
//! engine then treats it as absent (it neither isolates nor allows anything).
use super::selector::Selector;
use super::{PolicyName, PortRange, Protocol};
use crate::error::{Error, Result};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::sync::Arc;

/// A validated NetworkPolicy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedPolicy {
    pub name: Arc<PolicyName>,
    /// `spec.podSelector` (absent: every pod of the namespace).
    pub pod_selector: Selector,
    /// The ingress rules when the policy has the `Ingress` type (an empty list denies all).
    pub ingress: Option<Vec<Rule>>,
    /// The egress rules when the policy has the `Egress` type.
    pub egress: Option<Vec<Rule>>,
}

/// One ingress or egress rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    /// Position in `spec.ingress` / `spec.egress` (provenance).
    pub index: u32,
    /// `from` / `to`; None when absent or empty (every peer, outside the cluster too).
    pub peers: Option<Vec<PeerSpec>>,
    /// `ports`; None when absent or empty (every protocol and port).
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PeerSpec {
    /// Pods: `pods` None = every pod of the selected namespaces; `namespaces` None = the policy's
    /// own namespace. Both given: pods matching `pods` in namespaces matching `namespaces` (AND).
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    /// `ipBlock`: addresses in `cidr` and in none of `except`.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortSpec {
    /// Every port of the protocol (`port` absent).
    Numeric(Protocol, PortRange),
    /// A named port, resolved against the destination pod's container ports.
    Named(Protocol, String),
}

/// Validates `np`. The error names the policy and the offending field.
pub(crate) fn parse_policy(np: &NetworkPolicy) -> Result<ParsedPolicy> {
    let name = Arc::new(PolicyName {
        namespace: np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: np.metadata.name.clone().unwrap_or_default(),
    });
    parse_spec(np, name.clone()).map_err(|e| match e {
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{name}: {msg}")),
        other => other,
    })
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn parse_spec(np: &NetworkPolicy, name: Arc<PolicyName>) -> Result<ParsedPolicy> {
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let pod_selector = match &spec.pod_selector {
        Some(s) => Selector::parse(s, "spec.podSelector")?,
        None => Selector::everything(),
    };
    let mut ingress_type = false;
    let mut egress_type = false;
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        return Err(invalid(format!(
                            "spec.policyTypes[{i}]: {other:?} is neither Ingress nor Egress"
                        )));
                    }
                }
            }
        }
        // The API server's default: Ingress, plus Egress when there are egress rules.
        _ => {
            ingress_type = true;
            egress_type = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }
    // Rules are validated even for a type the policy does not have (the API server does too).
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(Rule {
            index: i as u32,
            peers: parse_peers(r.from.as_deref(), &format!("{path}.from"))?,
            ports: parse_ports(r.ports.as_deref(), &format!("{path}.ports"))?,
        });
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(Rule {
            index: i as u32,
            peers: parse_peers(r.to.as_deref(), &format!("{path}.to"))?,
            ports: parse_ports(r.ports.as_deref(), &format!("{path}.ports"))?,
        });
    }
    Ok(ParsedPolicy {
        name,
        pod_selector,
        ingress: ingress_type.then_some(ingress),
        egress: egress_type.then_some(egress),
    })
}

fn parse_peers(peers: Option<&[NetworkPolicyPeer]>, path: &str) -> Result<Option<Vec<PeerSpec>>> {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
        match &p.ip_block {
            Some(_) if selectors => {
                return Err(invalid(format!(
                    "{at}: ipBlock cannot be combined with podSelector or namespaceSelector"
                )));
            }
            Some(b) => {
                let cidr = parse_cidr(&b.cidr, &format!("{at}.ipBlock.cidr"))?;
                let mut except = Vec::new();
                for (j, e) in b.except.iter().flatten().enumerate() {
                    let epath = format!("{at}.ipBlock.except[{j}]");
                    let e = parse_cidr(e, &epath)?;
                    let inside = match (cidr, e) {
                        (IpNet::V4(c), IpNet::V4(x)) => {
                            c.contains(&x) && x.prefix_len() > c.prefix_len()
                        }
                        (IpNet::V6(c), IpNet::V6(x)) => {
                            c.contains(&x) && x.prefix_len() > c.prefix_len()
                        }
                        _ => false,
                    };
                    if !inside {
                        return Err(invalid(format!(
                            "{epath}: {e} must be a strict subset of the cidr {cidr}"
                        )));
                    }
                    except.push(e);
                }
                out.push(PeerSpec::Block { cidr, except });
            }
            None if !selectors => {
                return Err(invalid(format!(
                    "{at}: a peer needs a podSelector, a namespaceSelector or an ipBlock"
                )));
            }
            None => {
                let pods = p
                    .pod_selector
                    .as_ref()
                    .map(|s| Selector::parse(s, &format!("{at}.podSelector")))
                    .transpose()?;
                let namespaces = p
                    .namespace_selector
                    .as_ref()
                    .map(|s| Selector::parse(s, &format!("{at}.namespaceSelector")))
                    .transpose()?;
                out.push(PeerSpec::Pods { pods, namespaces });
            }
        }
    }
    Ok(Some(out))
}

/// A CIDR (host bits are cleared, as `net.ParseCIDR` does).
fn parse_cidr(s: &str, path: &str) -> Result<IpNet> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| invalid(format!("{path}: {s:?} is not a CIDR")))
}

fn parse_ports(ports: Option<&[NetworkPolicyPort]>, path: &str) -> Result<Option<Vec<PortSpec>>> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let proto = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => Protocol::from_k8s(s)
                .ok_or_else(|| invalid(format!("{at}.protocol: {s:?} is not TCP, UDP or SCTP")))?,
        };
        let spec = match (&p.port, p.end_port) {
            (None, Some(_)) => {
                return Err(invalid(format!("{at}.endPort: needs a numeric port")));
            }
            (None, None) => PortSpec::Numeric(proto, PortRange::ALL),
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    return Err(invalid(format!(
                        "{at}.endPort: not allowed with a named port"
                    )));
                }
                // A string is a name, even "80" (the API server refuses it as a name too).
                if !valid_port_name(name) {
                    return Err(invalid(format!(
                        "{at}.port: {name:?} is not a valid port name (IANA service name)"
                    )));
                }
                PortSpec::Named(proto, name.clone())
            }
            (Some(IntOrString::Int(n)), end) => numeric(proto, *n, end, &at)?,
        };
        out.push(spec);
    }
    Ok(Some(out))
}

fn numeric(proto: Protocol, port: i32, end: Option<i32>, at: &str) -> Result<PortSpec> {
    let first = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(format!("{at}.port: {port} is outside 1-65535")))?;
    let last = match end {
        None => first,
        Some(e) => {
            let e16 = u16::try_from(e)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("{at}.endPort: {e} is outside 1-65535")))?;
            if e16 < first {
                return Err(invalid(format!(
                    "{at}.endPort: {e} is below the port {first}"
                )));
            }
            e16
        }
    };
    Ok(PortSpec::Numeric(proto, PortRange { first, last }))
}

/// IANA service name: 1-15 of `[a-z0-9-]`, at least one letter, no leading, trailing or double
/// hyphen.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
