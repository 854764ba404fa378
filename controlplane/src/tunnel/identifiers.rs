//! Agent identifiers (`agentidentifiers` metadata: a URL-encoded query of `host`, `ipv4`, `ipv6`,
//! `cidr`, `default-route`, `uid`; unknown keys ignored) and destination matching.
use std::net::IpAddr;

use ipnet::IpNet;

/// What an agent serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Identifiers {
    pub hosts: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub cidrs: Vec<IpNet>,
    pub default_route: bool,
    pub uids: Vec<String>,
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte). Invalid
/// escapes are kept literally.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes text for a URL query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl Identifiers {
    /// Parses the `agentidentifiers` value. Invalid IPs/CIDRs are skipped (returned as warnings).
    pub fn parse(query: &str) -> (Self, Vec<String>) {
        let mut ids = Identifiers::default();
        let mut warnings = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (url_decode(k), url_decode(v));
            match k.as_str() {
                "host" => ids.hosts.push(v.to_ascii_lowercase()),
                "ipv4" | "ipv6" => match v.parse() {
                    Ok(ip) => ids.ips.push(ip),
                    Err(_) => warnings.push(format!("invalid {k} {v:?}")),
                },
                "cidr" => match v.parse() {
                    Ok(net) => ids.cidrs.push(net),
                    Err(_) => warnings.push(format!("invalid cidr {v:?}")),
                },
                "default-route" => ids.default_route = v == "true",
                "uid" => ids.uids.push(v),
                _ => {}
            }
        }
        (ids, warnings)
    }

    /// Encodes as an `agentidentifiers` value.
    pub fn encode(&self) -> String {
        let mut parts = Vec::new();
        for h in &self.hosts {
            parts.push(format!("host={}", url_encode(h)));
        }
        for ip in &self.ips {
            let k = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
            parts.push(format!("{k}={}", url_encode(&ip.to_string())));
        }
        for c in &self.cidrs {
            parts.push(format!("cidr={}", url_encode(&c.to_string())));
        }
        if self.default_route {
            parts.push("default-route=true".into());
        }
        for u in &self.uids {
            parts.push(format!("uid={}", url_encode(u)));
        }
        parts.join("&")
    }

    /// How well this agent serves `host` (lower is better): 0 exact host name or IP, 1 CIDR,
    /// 2 default route; `None` when it does not serve it.
    pub fn match_rank(&self, host: &str) -> Option<u8> {
        let host_lc = host.to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        if self.hosts.contains(&host_lc) || ip.is_some_and(|ip| self.ips.contains(&ip)) {
            return Some(0);
        }
        if let Some(ip) = ip
            && self.cidrs.iter().any(|c| c.contains(&ip))
        {
            return Some(1);
        }
        self.default_route.then_some(2)
    }
}

/// The host part of `host:port` / `[v6]:port`.
pub fn host_of(address: &str) -> Option<String> {
    if let Some(rest) = address.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        tail.strip_prefix(':')?.parse::<u16>().ok()?;
        return Some(h.to_string());
    }
    let (h, p) = address.rsplit_once(':')?;
    p.parse::<u16>().ok()?;
    (!h.is_empty() && !h.contains(':')).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let (ids, warn) = Identifiers::parse(
            "host=Node-1&ipv4=10.1.0.5&cidr=10.2.3.0%2F24&default-route=false&uid=abc&color=blue&ipv4=nope",
        );
        assert_eq!(warn.len(), 1);
        assert_eq!(ids.hosts, vec!["node-1"]);
        assert_eq!(ids.match_rank("node-1"), Some(0));
        assert_eq!(ids.match_rank("10.1.0.5"), Some(0));
        assert_eq!(ids.match_rank("10.2.3.77"), Some(1));
        assert_eq!(ids.match_rank("10.2.4.1"), None);
        let (back, _) = Identifiers::parse(&ids.encode());
        assert_eq!(back, ids);
    }

    #[test]
    fn decode_edge_cases() {
        assert_eq!(url_decode("a%2Fb+c"), "a/b c");
        assert_eq!(url_decode("100%"), "100%");
        assert_eq!(url_decode("%zz"), "%zz");
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:10250").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:10250").as_deref(), Some("::1"));
        assert_eq!(host_of("node:x"), None);
        assert_eq!(host_of("::1:80"), None);
    }
}
