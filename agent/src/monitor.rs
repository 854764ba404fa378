//! Policy verdict events from the datapath's ring buffer (`berthctl monitor`, the `hubble
//! observe` habit): every packet a policy denies, and every new allowed connection when the agent
//! runs with `--monitor-allowed`.
//!
//! The ring buffer has one consumer: two monitors at once share the events between them.
use crate::error::Result;
use berth_ebpf_common::{MAP_EVENTS, PolicyEvent, direction, drop_reason, verdict};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

/// The event ring buffer, opened from its pin.
pub struct EventReader {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
}

impl EventReader {
    pub fn open(pin_root: &Path) -> Result<EventReader> {
        let data = aya::maps::MapData::from_pin(pin_root.join("maps").join(MAP_EVENTS))?;
        let ring = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data))?;
        Ok(EventReader { ring })
    }

    /// The next event, if one is waiting.
    pub fn next_event(&mut self) -> Option<PolicyEvent> {
        let item = self.ring.next()?;
        decode(&item)
    }

    /// The ring buffer's file descriptor (readable when events are waiting).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is the map's, open for as long as `self` lives.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }
}

/// Reads an event from the bytes the kernel wrote (None when too short).
pub fn decode(bytes: &[u8]) -> Option<PolicyEvent> {
    if bytes.len() < std::mem::size_of::<PolicyEvent>() {
        return None;
    }
    // SAFETY: PolicyEvent is repr(C), every bit pattern is valid, and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const PolicyEvent) })
}

/// What the monitor knows to name an endpoint and to filter on.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Endpoint ID → "namespace/name".
    pub endpoints: BTreeMap<u32, String>,
    /// Pod address → "namespace/name" (local endpoints).
    pub addresses: BTreeMap<Ipv4Addr, String>,
}

/// Filters of `berthctl monitor`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// "namespace/name": events where this pod is either end.
    pub pod: Option<String>,
    /// Events where a pod of this namespace is either end.
    pub namespace: Option<String>,
    /// Only denied (`Some(false)`) or only allowed (`Some(true)`).
    pub allowed: Option<bool>,
}

fn addr(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto {n}"),
    }
}

/// The decoded fields, with names where the node knows them.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    /// Nanoseconds since boot (the kernel's monotonic clock).
    pub time_ns: u64,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub direction: &'static str,
    /// The endpoint whose policy decided, and its pod.
    pub endpoint: u32,
    pub pod: Option<String>,
    pub source: String,
    pub source_pod: Option<String>,
    pub destination: String,
    pub destination_pod: Option<String>,
    pub protocol: String,
    pub source_port: u16,
    pub destination_port: u16,
    pub peer_identity: u32,
}

pub fn view(ev: &PolicyEvent, names: &Names) -> View {
    let src = addr(ev.saddr);
    let dst = addr(ev.daddr);
    View {
        time_ns: ev.timestamp_ns,
        verdict: if ev.verdict == verdict::ALLOWED {
            "ALLOWED"
        } else {
            "DENIED"
        },
        reason: if ev.reason == 0 {
            "policy-allowed"
        } else {
            drop_reason::name(ev.reason)
        },
        direction: if ev.direction == direction::INGRESS {
            "ingress"
        } else {
            "egress"
        },
        endpoint: ev.endpoint_id,
        pod: names.endpoints.get(&ev.endpoint_id).cloned(),
        source: src.to_string(),
        source_pod: names.addresses.get(&src).cloned(),
        destination: dst.to_string(),
        destination_pod: names.addresses.get(&dst).cloned(),
        protocol: proto_name(ev.protocol),
        source_port: u16::from_be(ev.sport),
        destination_port: u16::from_be(ev.dport),
        peer_identity: ev.peer_identity,
    }
}

impl View {
    /// Whether the event passes `f`.
    pub fn matches(&self, f: &Filter) -> bool {
        let pods = [&self.pod, &self.source_pod, &self.destination_pod];
        if let Some(p) = &f.pod
            && !pods.iter().any(|x| x.as_deref() == Some(p.as_str()))
        {
            return false;
        }
        if let Some(ns) = &f.namespace
            && !pods.iter().any(|x| {
                x.as_deref()
                    .is_some_and(|v| v.split('/').next() == Some(ns.as_str()))
            })
        {
            return false;
        }
        if let Some(a) = f.allowed
            && a != (self.verdict == "ALLOWED")
        {
            return false;
        }
        true
    }

    /// One readable line: `x/a 10.2.1.10:41000 -> 10.2.2.11:80 x/b TCP DENIED (policy-denied-
    /// ingress of x/b, peer identity 7)`.
    pub fn line(&self) -> String {
        let end = |a: &str, port: u16, pod: &Option<String>| {
            let hp = if self.protocol == "TCP" || self.protocol == "UDP" || self.protocol == "SCTP"
            {
                format!("{a}:{port}")
            } else {
                a.to_string()
            };
            match pod {
                Some(p) => format!("{p} ({hp})"),
                None => hp,
            }
        };
        format!(
            "{} -> {} {} {} ({} policy of {}, peer identity {}{})",
            end(&self.source, self.source_port, &self.source_pod),
            end(
                &self.destination,
                self.destination_port,
                &self.destination_pod
            ),
            self.protocol,
            self.verdict,
            self.direction,
            self.pod
                .clone()
                .unwrap_or_else(|| format!("endpoint {}", self.endpoint)),
            self.peer_identity,
            if self.verdict == "DENIED" {
                format!(", {}", self.reason)
            } else {
                String::new()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_and_prints_with_names() {
        let ev = PolicyEvent {
            timestamp_ns: 5,
            endpoint_id: 2,
            saddr: u32::from_ne_bytes([10, 2, 1, 10]),
            daddr: u32::from_ne_bytes([10, 2, 2, 11]),
            peer_identity: 77,
            sport: 41000u16.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            verdict: verdict::DENIED,
            direction: direction::INGRESS,
            _pad: 0,
            reason: drop_reason::POLICY_DENIED_INGRESS,
        };
        let bytes = unsafe {
            std::slice::from_raw_parts(
                &ev as *const PolicyEvent as *const u8,
                std::mem::size_of::<PolicyEvent>(),
            )
        };
        let back = decode(bytes).unwrap();
        assert_eq!(back, ev);
        assert!(decode(&bytes[..10]).is_none());
        let names = Names {
            endpoints: [(2, "x/b".to_string())].into_iter().collect(),
            addresses: [("10.2.2.11".parse().unwrap(), "x/b".to_string())]
                .into_iter()
                .collect(),
        };
        let v = view(&back, &names);
        let line = v.line();
        assert_eq!(
            line,
            "10.2.1.10:41000 -> x/b (10.2.2.11:80) TCP DENIED (ingress policy of x/b, peer \
             identity 77, policy-denied-ingress)"
        );
        assert!(v.matches(&Filter {
            namespace: Some("x".into()),
            allowed: Some(false),
            ..Default::default()
        }));
        assert!(!v.matches(&Filter {
            pod: Some("y/a".into()),
            ..Default::default()
        }));
    }
}
