//! The agent's dial allow-list: the tunnel is never an open proxy into the node. Entries are
//! `IP:port` or `CIDR:port` (port `*` = any port); the default is the kubelet on
//! `127.0.0.1:10250` and `<node IP>:10250`. A destination must be an IP literal, `localhost`, or
//! the node's own host name (mapped to the node IP) — no DNS lookups, so a name can never be
//! re-pointed somewhere else.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;

/// One allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    pub net: IpNet,
    /// `None` = any port.
    pub port: Option<u16>,
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("allow-list entry {s:?} is not HOST:PORT or CIDR:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = match port {
            "*" => None,
            p => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("allow-list entry {s:?}: bad port"))?,
            ),
        };
        let net = if host.contains('/') {
            host.parse::<IpNet>()
                .map_err(|e| format!("allow-list entry {s:?}: {e}"))?
        } else {
            let ip: IpAddr = host
                .parse()
                .map_err(|_| format!("allow-list entry {s:?}: host must be an IP or a CIDR"))?;
            IpNet::from(ip)
        };
        Ok(AllowEntry { net, port })
    }
}

/// The allow-list plus the names the node answers to.
#[derive(Clone, Debug)]
pub struct AllowList {
    pub entries: Vec<AllowEntry>,
    pub node_names: Vec<String>,
    pub node_ip: Option<IpAddr>,
}

impl AllowList {
    /// `entries` empty → the default (kubelet on loopback and on the node IP).
    pub fn new(entries: Vec<AllowEntry>, node_names: Vec<String>, node_ip: Option<IpAddr>) -> Self {
        let entries = if entries.is_empty() {
            let mut d = vec![AllowEntry {
                net: IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port: Some(10250),
            }];
            if let Some(ip) = node_ip {
                d.push(AllowEntry {
                    net: IpNet::from(ip),
                    port: Some(10250),
                });
            }
            d
        } else {
            entries
        };
        Self {
            entries,
            node_names: node_names
                .into_iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            node_ip,
        }
    }

    /// The socket address to dial for `address` (`host:port`), or why it is refused.
    pub fn check(&self, address: &str) -> Result<SocketAddr, String> {
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (h, tail) = rest.split_once(']').ok_or("malformed address")?;
            (h, tail.strip_prefix(':').ok_or("missing port")?)
        } else {
            address.rsplit_once(':').ok_or("missing port")?
        };
        let port: u16 = port.parse().map_err(|_| "bad port".to_string())?;
        let ip: IpAddr = match host.parse() {
            Ok(ip) => ip,
            Err(_) if host.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Err(_) if self.node_names.contains(&host.to_ascii_lowercase()) => self
                .node_ip
                .ok_or_else(|| format!("{host} has no node IP configured"))?,
            Err(_) => return Err(format!("{host:?} is not an IP or this node's name")),
        };
        let allowed = self
            .entries
            .iter()
            .any(|e| e.net.contains(&ip) && e.port.is_none_or(|p| p == port));
        if allowed {
            Ok(SocketAddr::new(ip, port))
        } else {
            Err(format!("{ip}:{port} is not in the agent's allow-list"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_kubelet_only() {
        let a = AllowList::new(
            vec![],
            vec!["node-1".into()],
            Some("10.1.0.5".parse().unwrap()),
        );
        assert_eq!(
            a.check("127.0.0.1:10250").unwrap().to_string(),
            "127.0.0.1:10250"
        );
        assert_eq!(
            a.check("10.1.0.5:10250").unwrap().to_string(),
            "10.1.0.5:10250"
        );
        assert_eq!(
            a.check("Node-1:10250").unwrap().to_string(),
            "10.1.0.5:10250"
        );
        assert_eq!(
            a.check("localhost:10250").unwrap().to_string(),
            "127.0.0.1:10250"
        );
        assert!(a.check("127.0.0.1:22").is_err());
        assert!(a.check("10.1.0.6:10250").is_err());
        assert!(a.check("example.com:10250").is_err());
        assert!(a.check("127.0.0.1").is_err());
        assert!(a.check("[::1]:10250").is_err());
    }

    #[test]
    fn cidr_and_any_port_entries() {
        let a = AllowList::new(
            vec![
                "10.2.0.0/16:*".parse().unwrap(),
                "[::1]:8080".parse().unwrap(),
            ],
            vec![],
            None,
        );
        assert!(a.check("10.2.9.9:1234").is_ok());
        assert!(a.check("10.3.0.1:1234").is_err());
        assert!(a.check("[::1]:8080").is_ok());
        assert!(a.check("127.0.0.1:10250").is_err());
        assert!("10.0.0.0/8".parse::<AllowEntry>().is_err());
        assert!("host:80".parse::<AllowEntry>().is_err());
    }
}
