//! Unit tests of the policy engine: selectors, identities, named ports, ipBlocks, policy types,
//! incremental differences, invalid policies, trace.
use super::identity::{IdentityAllocator, LabelSet, MAX};
use super::*;
use crate::cluster::{ClusterModel, Object};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{Value, json};

const NODE: &str = "n1";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(v: Value) -> Result<Selector> {
    let s: LabelSelector = serde_json::from_value(v).unwrap();
    Selector::parse(&s, "test")
}

#[test]
fn selectors() {
    let a = labels(&[("app", "web"), ("tier", "front")]);
    let b = labels(&[("app", "db")]);
    let none = labels(&[]);
    let cases = [
        (json!({}), [true, true, true]),
        (json!({"matchLabels": {"app": "web"}}), [true, false, false]),
        (
            json!({"matchLabels": {"app": "web", "tier": "front"}}),
            [true, false, false],
        ),
        (
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]}),
            [true, true, false],
        ),
        // NotIn matches a missing key.
        (
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}),
            [false, true, true],
        ),
        (
            json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            [true, false, false],
        ),
        (
            json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist", "values": []}]}),
            [false, true, true],
        ),
        // matchLabels AND matchExpressions.
        (
            json!({"matchLabels": {"app": "db"},
                "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
            [false, true, false],
        ),
    ];
    for (v, want) in cases {
        let s = sel(v.clone()).unwrap();
        let got = [s.matches(&a), s.matches(&b), s.matches(&none)];
        assert_eq!(got, want, "{v}");
    }
    assert!(sel(json!({})).unwrap().is_everything());
    assert_eq!(
        sel(json!({"matchLabels": {"a": "b"},
            "matchExpressions": [{"key": "c", "operator": "In", "values": ["e", "d"]},
                {"key": "f", "operator": "DoesNotExist"}]}))
        .unwrap()
        .to_string(),
        "a=b,c in (d,e),!f"
    );
    for (bad, why) in [
        (
            json!({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}),
            "unknown operator",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}),
            "needs values",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "NotIn"}]}),
            "needs values",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
            "takes no values",
        ),
        (
            json!({"matchExpressions": [{"key": "", "operator": "Exists"}]}),
            "empty key",
        ),
    ] {
        let e = sel(bad.clone()).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains("test"), "{bad}: {e}");
    }
}

fn set(ns: &str, pod: &[(&str, &str)]) -> LabelSet {
    LabelSet {
        namespace: ns.into(),
        pod_labels: labels(pod).into(),
        namespace_labels: labels(&[("kubernetes.io/metadata.name", ns)]).into(),
    }
}

#[test]
fn identities_are_deterministic_stable_and_collision_checked() {
    // The canonical form and hash are a cross-node contract: pin one value.
    let s = set("x", &[("pod", "a")]);
    assert_eq!(
        s.canonical(),
        "namespace:x\npod:pod=a\nns:kubernetes.io/metadata.name=x\n"
    );
    let pinned = s.hash_slot();
    assert_eq!(pinned, set("x", &[("pod", "a")]).hash_slot());
    assert!((FIRST_CLUSTER..=MAX).contains(&pinned));
    assert_eq!(
        pinned, 0x66_37_43,
        "the hash of a label set must never change"
    );

    let mut a = IdentityAllocator::new();
    let id = a.allocate(&s);
    assert_eq!(id, pinned);
    assert!(a.is_hash_derived(id));
    assert_eq!(a.allocate(&s), id, "same labels, same identity");
    assert_ne!(
        a.allocate(&set("y", &[("pod", "a")])),
        id,
        "namespace counts"
    );
    // Two allocators (two nodes) agree without talking.
    let mut b = IdentityAllocator::new();
    b.allocate(&set("y", &[("pod", "a")]));
    assert_eq!(b.allocate(&s), id);

    // Enough sets to force 24-bit collisions: every set still gets a distinct identity, probed
    // ones are flagged, and lookups are stable.
    let mut big = IdentityAllocator::new();
    let mut seen = BTreeSet::new();
    let mut probed = 0;
    for i in 0..20_000 {
        let s = set("big", &[("i", &i.to_string())]);
        let id = big.allocate(&s);
        assert!(seen.insert(id), "identity {id} given twice");
        assert!((FIRST_CLUSTER..=MAX).contains(&id));
        if !big.is_hash_derived(id) {
            probed += 1;
            assert_ne!(id, s.hash_slot());
        } else {
            assert_eq!(id, s.hash_slot());
        }
    }
    assert!(probed > 0, "20 000 sets in 24 bits collide (expected ~12)");
    for i in [0, 777, 19_999] {
        let s = set("big", &[("i", &i.to_string())]);
        assert_eq!(big.lookup(&s), Some(big.allocate(&s)));
    }
    // Release: only what is not in use goes.
    let keep: BTreeSet<Identity> = [big.lookup(&set("big", &[("i", "5")])).unwrap()].into();
    assert_eq!(big.retain(&keep).len(), 19_999);
    assert_eq!(big.len(), 1);
    assert_eq!(reserved_names(), ["any", "host", "world", "remote-node"]);
}

fn reserved_names() -> Vec<&'static str> {
    [WILDCARD, HOST, WORLD, REMOTE_NODE]
        .iter()
        .map(|id| identity::reserved_name(*id).unwrap())
        .collect()
}

#[test]
fn port_ranges_as_prefixes() {
    let expand = |r: PortRange| -> Vec<u16> {
        r.prefixes()
            .into_iter()
            .flat_map(|(p, len)| {
                let size = 1u32 << (16 - len);
                (u32::from(p)..u32::from(p) + size).map(|x| x as u16)
            })
            .collect()
    };
    assert_eq!(PortRange::ALL.prefixes(), [(0, 0)]);
    assert_eq!(PortRange::single(80).prefixes(), [(80, 16)]);
    assert_eq!(
        PortRange {
            first: 80,
            last: 81
        }
        .prefixes(),
        [(80, 15)]
    );
    for (first, last) in [
        (1, 65535),
        (81, 90),
        (1024, 2047),
        (1000, 1000),
        (65535, 65535),
        (3, 70000u32 as u16),
    ] {
        let r = PortRange { first, last };
        let ports = expand(r);
        assert_eq!(ports, (first..=last).collect::<Vec<_>>(), "{r}");
        assert!(r.prefixes().len() <= 30);
    }
}

// ---- a small cluster ----

fn ns(name: &str, extra: &[(&str, &str)]) -> Object {
    let mut l = labels(extra);
    l.insert("kubernetes.io/metadata.name".into(), name.into());
    Object::Namespace(
        serde_json::from_value(json!({"metadata": {"name": name, "labels": l}})).unwrap(),
    )
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> Object {
    pod_ports(
        ns,
        name,
        node,
        ip,
        l,
        json!([
            {"name": "http", "containerPort": 80},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}
        ]),
    )
}

fn pod_ports(
    ns: &str,
    name: &str,
    node: &str,
    ip: &str,
    l: &[(&str, &str)],
    ports: Value,
) -> Object {
    Object::Pod(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": labels(l)},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap(),
    )
}

fn policy(ns: &str, name: &str, spec: Value) -> Object {
    Object::NetworkPolicy(
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .unwrap(),
    )
}

fn node(name: &str, ip: &str) -> Object {
    Object::Node(
        serde_json::from_value(json!({"metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
        .unwrap(),
    )
}

fn model(objs: impl IntoIterator<Item = Object>) -> ClusterModel {
    let mut m = ClusterModel::default();
    for o in objs {
        m.upsert(o, NODE);
    }
    m
}

fn base() -> Vec<Object> {
    vec![
        node("n1", "192.168.0.1"),
        node("n2", "192.168.0.2"),
        ns("x", &[("ns", "x")]),
        ns("y", &[("ns", "y")]),
        pod("x", "a", "n1", "10.2.1.10", &[("pod", "a")]),
        pod("x", "b", "n1", "10.2.1.11", &[("pod", "b")]),
        pod("y", "a", "n2", "10.2.2.10", &[("pod", "a")]),
        pod("y", "b", "n2", "10.2.2.11", &[("pod", "b")]),
    ]
}

fn key(ns: &str, name: &str) -> PodKey {
    (ns.into(), name.into())
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn endpoints_ipcache_and_identities() {
    let mut objs = base();
    // Not endpoints: host network, terminated.
    objs.push(Object::Pod(
        serde_json::from_value(json!({"metadata": {"name": "hn", "namespace": "x"},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
            "status": {"podIP": "192.168.0.1"}}))
        .unwrap(),
    ));
    objs.push(Object::Pod(
        serde_json::from_value(json!({"metadata": {"name": "done", "namespace": "x"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.2.1.99"}}))
        .unwrap(),
    ));
    let m = model(objs);
    let mut e = PolicyEngine::new(NODE);
    let d = e.update(&m);
    let c = e.compiled();
    assert_eq!(
        c.endpoints.keys().cloned().collect::<Vec<_>>(),
        [key("x", "a"), key("x", "b")]
    );
    assert_eq!(d.endpoints.len(), 2);
    assert!(
        d.endpoints
            .values()
            .all(|e| e.change == EndpointChange::Added)
    );
    // Same labels in another namespace: another identity; same labels, same namespace: same.
    let xa = c.ipcache[&ip("10.2.1.10")];
    assert_ne!(xa, c.ipcache[&ip("10.2.2.10")]);
    assert_eq!(c.endpoints[&key("x", "a")].identity, xa);
    assert_eq!(c.identity_of(ip("192.168.0.1")), HOST);
    assert_eq!(c.identity_of(ip("192.168.0.2")), REMOTE_NODE);
    assert_eq!(
        c.identity_of(ip("10.2.1.99")),
        WORLD,
        "terminated pods hold no address"
    );
    assert_eq!(c.identity_of(ip("8.8.8.8")), WORLD);
    assert_eq!(c.identities.len(), 4);
    assert!(
        c.endpoints
            .values()
            .all(|e| !e.ingress.isolated && !e.egress.isolated)
    );

    // Recomputing the same model changes nothing; another pod with the same labels shares the
    // identity; a label change moves only that pod.
    assert!(e.update(&m).is_empty());
    let mut m2 = m.clone();
    m2.upsert(pod("x", "a2", "n2", "10.2.2.50", &[("pod", "a")]), NODE);
    let d = e.update(&m2);
    assert!(d.endpoints.is_empty(), "a remote pod is no endpoint here");
    assert_eq!(d.ipcache_upsert, BTreeMap::from([(ip("10.2.2.50"), xa)]));
    assert!(d.identities_added.is_empty());
    m2.upsert(
        pod("x", "a2", "n2", "10.2.2.50", &[("pod", "a"), ("v", "2")]),
        NODE,
    );
    let d = e.update(&m2);
    let new_id = d.ipcache_upsert[&ip("10.2.2.50")];
    assert_ne!(new_id, xa);
    assert_eq!(
        d.identities_added.keys().copied().collect::<Vec<_>>(),
        [new_id]
    );
    assert!(d.identities_removed.is_empty(), "x/a still uses it");
    assert_eq!(
        e.compiled().ipcache[&ip("10.2.1.10")],
        xa,
        "stable while in use"
    );
}

#[test]
fn policy_types_and_rules() {
    let mut e = PolicyEngine::new(NODE);
    let m = model(base().into_iter().chain([
        // Omitted policyTypes, no egress: ingress only (deny all).
        policy(
            "x",
            "deny-in",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
        ),
        // Omitted policyTypes with egress rules: both.
        policy(
            "x",
            "egress",
            json!({"podSelector": {"matchLabels": {"pod": "b"}},
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": 80, "endPort": 81}, {"protocol": "UDP"}]}]}),
        ),
        // Egress-only type: its ingress rules are ignored.
        policy(
            "y",
            "egress-only",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
            "ingress": [{}]}),
        ),
    ]));
    e.update(&m);
    let c = e.compiled();
    let xa = &c.endpoints[&key("x", "a")];
    assert!(xa.ingress.isolated && !xa.egress.isolated);
    assert_eq!(
        xa.ingress.entries.keys().copied().collect::<Vec<_>>(),
        [Entry::any_l4(Peer::Identity(HOST))],
        "deny all but the node"
    );
    let xb = &c.endpoints[&key("x", "b")];
    assert!(xb.ingress.isolated && xb.egress.isolated);
    let ya = c.ipcache[&ip("10.2.2.10")];
    let yb = c.ipcache[&ip("10.2.2.11")];
    let want: BTreeSet<Entry> = [ya, yb]
        .into_iter()
        .flat_map(|id| {
            [
                Entry {
                    peer: Peer::Identity(id),
                    proto: Some(Protocol::Tcp),
                    ports: PortRange {
                        first: 80,
                        last: 81,
                    },
                },
                Entry {
                    peer: Peer::Identity(id),
                    proto: Some(Protocol::Udp),
                    ports: PortRange::ALL,
                },
            ]
        })
        .collect();
    assert_eq!(
        xb.egress.entries.keys().copied().collect::<BTreeSet<_>>(),
        want
    );
    let origin = Origin::Rule {
        policy: Arc::new(PolicyName {
            namespace: "x".into(),
            name: "egress".into(),
        }),
        rule: 0,
    };
    assert!(
        xb.egress
            .entries
            .values()
            .all(|o| o == &BTreeSet::from([origin.clone()]))
    );
    assert!(
        xb.egress
            .allows(ya, Some(ip("10.2.2.10")), Protocol::Tcp, 81)
    );
    assert!(
        !xb.egress
            .allows(ya, Some(ip("10.2.2.10")), Protocol::Tcp, 82)
    );
    assert!(
        !xb.egress
            .allows(ya, Some(ip("10.2.2.10")), Protocol::Sctp, 80)
    );
    assert!(
        !xb.egress
            .allows(WORLD, Some(ip("1.1.1.1")), Protocol::Udp, 53)
    );
    // y's pods are remote; the egress-only policy shows in a trace.
    let t = e
        .trace(
            &TracePeer::parse("y/a").unwrap(),
            &TracePeer::parse("x/b").unwrap(),
            Protocol::Tcp,
            80,
        )
        .unwrap();
    assert!(!t.allowed);
    assert_eq!(t.egress.verdict, HalfVerdict::Denied);
    assert_eq!(
        t.ingress.verdict,
        HalfVerdict::Denied,
        "x/b: egress policy also isolates ingress"
    );
    assert!(
        t.to_string()
            .contains("DENIED by the egress policy of the source and"),
        "{t}"
    );
}

#[test]
fn ip_blocks_subtract_excepts_and_flatten_for_lpm() {
    let mut e = PolicyEngine::new(NODE);
    let m = model(base().into_iter().chain([policy(
        "x",
        "blocks",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                 "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": "10.2.0.0/16", "except": ["10.2.2.0/24"]}},
                          {"ipBlock": {"cidr": "fd00::/8"}}],
                 "ports": [{"port": 81}]},
                {"from": [{"ipBlock": {"cidr": "10.2.2.11/32"}}]},
            ]
        }),
    )]));
    e.update(&m);
    let xa = &e.compiled().endpoints[&key("x", "a")];
    let cidrs = |port: Option<u16>| -> Vec<String> {
        xa.ingress
            .entries
            .keys()
            .filter(|en| match port {
                Some(p) => en.proto == Some(Protocol::Tcp) && en.ports == PortRange::single(p),
                None => en.proto.is_none(),
            })
            .filter_map(|en| match en.peer {
                Peer::Cidr(n) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        cidrs(Some(80)),
        [
            "0.0.0.0/5",
            "8.0.0.0/7",
            "11.0.0.0/8",
            "12.0.0.0/6",
            "16.0.0.0/4",
            "32.0.0.0/3",
            "64.0.0.0/2",
            "128.0.0.0/1"
        ]
    );
    assert_eq!(
        cidrs(Some(81)),
        [
            "10.2.0.0/23",
            "10.2.3.0/24",
            "10.2.4.0/22",
            "10.2.8.0/21",
            "10.2.16.0/20",
            "10.2.32.0/19",
            "10.2.64.0/18",
            "10.2.128.0/17"
        ]
    );
    assert_eq!(cidrs(None), ["10.2.2.11/32"]);
    let allows = |a: &str, port| {
        xa.ingress.allows(
            e.compiled().identity_of(ip(a)),
            Some(ip(a)),
            Protocol::Tcp,
            port,
        )
    };
    assert!(allows("8.8.8.8", 80) && !allows("8.8.8.8", 81));
    assert!(!allows("10.2.1.11", 80) && allows("10.2.1.11", 81));
    assert!(!allows("10.2.2.10", 81), "except");
    assert!(allows("10.2.2.11", 443), "a pod address in a /32 block");
    // The LPM view: a covering prefix's rules are folded into the more specific ones.
    let lpm = xa.ingress.cidr_lpm();
    assert_eq!(lpm.len(), 17);
    let host: Ipv4Net = "10.2.2.11/32".parse().unwrap();
    assert_eq!(lpm[&host], BTreeSet::from([(None, PortRange::ALL)]));
    let p23: Ipv4Net = "10.2.0.0/23".parse().unwrap();
    assert_eq!(
        lpm[&p23],
        BTreeSet::from([(Some(Protocol::Tcp), PortRange::single(81))])
    );
}

#[test]
fn named_ports_resolve_per_pod() {
    let mut objs = base();
    // x/b calls its port "http" 8080; y/b has no "http" at all but a UDP "dns".
    objs.push(pod_ports(
        "x",
        "b",
        "n1",
        "10.2.1.11",
        &[("pod", "b")],
        json!([{"name": "http", "containerPort": 8080}]),
    ));
    objs.push(pod_ports(
        "y",
        "b",
        "n2",
        "10.2.2.11",
        &[("pod", "b")],
        json!([{"name": "dns", "containerPort": 5353, "protocol": "UDP"}]),
    ));
    objs.push(policy(
        "x",
        "named-in",
        json!({"podSelector": {},
        "ingress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "TCP"}]}]}),
    ));
    objs.push(policy("x", "named-out", json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]})));
    let mut e = PolicyEngine::new(NODE);
    e.update(&model(objs));
    let c = e.compiled();
    let ports_of =
        |d: &DirectionPolicy| -> Vec<String> { d.entries.keys().map(|e| e.to_string()).collect() };
    // Ingress: resolved against each endpoint's own ports; "dns" is UDP, asked as TCP: nothing.
    assert_eq!(
        ports_of(&c.endpoints[&key("x", "a")].ingress),
        ["any TCP/80", "identity 1 (host) any"]
    );
    assert_eq!(
        ports_of(&c.endpoints[&key("x", "b")].ingress),
        ["any TCP/8080", "identity 1 (host) any"]
    );
    // Egress: resolved against each destination pod: /32 entries.
    assert_eq!(
        ports_of(&c.endpoints[&key("x", "a")].egress),
        [
            "cidr 10.2.1.10/32 TCP/80",
            "cidr 10.2.1.10/32 UDP/53",
            "cidr 10.2.1.11/32 TCP/8080",
            "cidr 10.2.2.10/32 TCP/80",
            "cidr 10.2.2.10/32 UDP/53",
            "cidr 10.2.2.11/32 UDP/5353",
        ]
    );
}

#[test]
fn invalid_policies_are_rejected_and_change_nothing() {
    let good = policy(
        "x",
        "good",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let mut clean = PolicyEngine::new(NODE);
    clean.update(&model(base().into_iter().chain([good.clone()])));
    let bad = [
        (
            "op",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Has"}]}}),
            "spec.podSelector: matchExpressions[0] (key \"pod\"): unknown operator \"Has\"",
        ),
        (
            "peer-op",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "in", "values": ["y"]}]}}]}]}),
            "spec.ingress[0].from[0].namespaceSelector",
        ),
        (
            "cidr",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "except",
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "must be a strict subset",
        ),
        (
            "except-equal",
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]}),
            "must be a strict subset",
        ),
        (
            "port",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}),
            "spec.ingress[0].ports[0].port: 70000 is outside 1-65535",
        ),
        (
            "port0",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
            "outside 1-65535",
        ),
        (
            "endport-alone",
            json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}),
            "endPort: needs a numeric port",
        ),
        (
            "endport-below",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "endPort: 80 is below the port 90",
        ),
        (
            "endport-named",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "not allowed with a named port",
        ),
        (
            "proto",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "\"ICMP\" is not TCP, UDP or SCTP",
        ),
        (
            "proto-case",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "tcp", "port": 80}]}]}),
            "is not TCP",
        ),
        (
            "name",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "Not_A-Name"}]}]}),
            "not a valid port name",
        ),
        (
            "peer-empty",
            json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
            "a peer needs",
        ),
        (
            "peer-both",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "cannot be combined",
        ),
        (
            "type",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Sideways"]}),
            "spec.policyTypes[1]",
        ),
    ];
    for (name, spec, why) in bad {
        let mut e = PolicyEngine::new(NODE);
        let d = e.update(&model(
            base()
                .into_iter()
                .chain([good.clone(), policy("x", name, spec)]),
        ));
        let pn = PolicyName {
            namespace: "x".into(),
            name: name.into(),
        };
        let reason = &e.compiled().rejected[&pn];
        assert!(
            reason.contains(why) && reason.starts_with(&format!("invalid request: x/{name}: ")),
            "{name}: {reason}"
        );
        assert_eq!(d.rejected.keys().collect::<Vec<_>>(), [&pn]);
        // The rejected policy isolates nothing and allows nothing.
        assert_eq!(e.compiled().endpoints, clean.compiled().endpoints, "{name}");
    }
    // Fixing a policy lifts the rejection.
    let mut e = PolicyEngine::new(NODE);
    e.update(&model(base().into_iter().chain([policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
    )])));
    let d = e.update(&model(base().into_iter().chain([policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 1}]}]}),
    )])));
    assert_eq!(d.unrejected.len(), 1);
    assert!(e.compiled().rejected.is_empty());
    assert!(e.compiled().endpoints[&key("x", "a")].ingress.isolated);
}

#[test]
fn diffs_touch_only_what_changed() {
    let p1 = |port: u16| {
        policy(
            "x",
            "p1",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": port}]}]}),
        )
    };
    let p2 = policy(
        "x",
        "p2",
        json!({"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]},
                    {"from": [{"podSelector": {}}]}]}),
    );
    let m1 = model(base().into_iter().chain([p1(80), p2.clone()]));
    let mut e = PolicyEngine::new(NODE);
    e.update(&m1);
    let before = e.compiled().clone();
    let (ya, yb) = (
        before.ipcache[&ip("10.2.2.10")],
        before.ipcache[&ip("10.2.2.11")],
    );
    let e80 = |id| Entry {
        peer: Peer::Identity(id),
        proto: Some(Protocol::Tcp),
        ports: PortRange::single(80),
    };
    let e81 = |id| Entry {
        peer: Peer::Identity(id),
        proto: Some(Protocol::Tcp),
        ports: PortRange::single(81),
    };
    let p1n = Arc::new(PolicyName {
        namespace: "x".into(),
        name: "p1".into(),
    });
    let p2n = Arc::new(PolicyName {
        namespace: "x".into(),
        name: "p2".into(),
    });
    assert_eq!(
        before.endpoints[&key("x", "a")].ingress.entries[&e80(ya)],
        BTreeSet::from([
            Origin::Rule {
                policy: p1n.clone(),
                rule: 0
            },
            Origin::Rule {
                policy: p2n.clone(),
                rule: 0
            }
        ]),
        "one entry, two origins"
    );

    // p1 moves to port 81: x/a gains the 81 entries; its 80 entries stay (p2 still gives them)
    // and are only re-attributed; x/b (not selected by p1) is untouched.
    let d = e.update(&model(base().into_iter().chain([p1(81), p2.clone()])));
    assert_eq!(
        d.endpoints.keys().cloned().collect::<Vec<_>>(),
        [key("x", "a")]
    );
    let dd = &d.endpoints[&key("x", "a")];
    assert_eq!(dd.change, EndpointChange::Changed);
    assert!(dd.egress.is_empty());
    assert_eq!(
        dd.ingress.add.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([e81(ya), e81(yb)])
    );
    assert!(dd.ingress.remove.is_empty());
    assert_eq!(
        dd.ingress
            .reattributed
            .keys()
            .copied()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([e80(ya), e80(yb)])
    );
    assert!(dd.ingress.reattributed.values().all(|o| o
        == &BTreeSet::from([Origin::Rule {
            policy: p2n.clone(),
            rule: 0
        }])));
    assert!(d.ipcache_upsert.is_empty() && d.ipcache_remove.is_empty());
    let mut mirror = before.clone();
    mirror.apply(&d);
    assert_eq!(&mirror, e.compiled());

    // Deleting p1 removes exactly its 81 entries.
    let d = e.update(&model(base().into_iter().chain([p2.clone()])));
    let dd = &d.endpoints[&key("x", "a")];
    assert_eq!(dd.ingress.remove, BTreeSet::from([e81(ya), e81(yb)]));
    assert!(dd.ingress.add.is_empty());
    assert_eq!(d.entry_writes(), 2);
    mirror.apply(&d);
    assert_eq!(&mirror, e.compiled());

    // A label change of a remote pod: its identity changes; entries follow in every endpoint
    // that selects it, and the ipcache moves. Nothing else.
    let mut objs = base();
    objs.push(pod(
        "y",
        "b",
        "n2",
        "10.2.2.11",
        &[("pod", "b"), ("new", "label")],
    ));
    objs.push(p2.clone());
    let d = e.update(&model(objs));
    let yb2 = d.ipcache_upsert[&ip("10.2.2.11")];
    assert_eq!(d.ipcache_upsert.len(), 1);
    assert_eq!(d.identities_removed, BTreeSet::from([yb]));
    for k in [key("x", "a"), key("x", "b")] {
        let dd = &d.endpoints[&k].ingress;
        assert_eq!(dd.add.keys().copied().collect::<Vec<_>>(), [e80(yb2)]);
        assert_eq!(dd.remove.iter().copied().collect::<Vec<_>>(), [e80(yb)]);
    }
    mirror.apply(&d);
    assert_eq!(&mirror, e.compiled());

    // An endpoint leaving: all its entries in `remove`.
    let objs: Vec<Object> = base()
        .into_iter()
        .filter(|o| o.display_name() != "x/b")
        .chain([p2])
        .collect();
    let d = e.update(&model(objs));
    let dd = &d.endpoints[&key("x", "b")];
    assert_eq!(dd.change, EndpointChange::Removed);
    assert_eq!(
        dd.ingress.remove.len(),
        mirror.endpoints[&key("x", "b")].ingress.entries.len()
    );
    mirror.apply(&d);
    assert_eq!(&mirror, e.compiled());
}

#[test]
fn trace_explains() {
    let mut e = PolicyEngine::new(NODE);
    e.update(&model(base().into_iter().chain([policy("x", "from-y-b", json!({
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}],
                     "ports": [{"port": 80}]}]}))])));
    let t = |src: &str, dst: &str, port| {
        e.trace(
            &TracePeer::parse(src).unwrap(),
            &TracePeer::parse(dst).unwrap(),
            Protocol::Tcp,
            port,
        )
        .unwrap()
    };
    let ok = t("y/b", "x/a", 80);
    assert!(ok.allowed, "{ok}");
    assert_eq!(ok.egress.verdict, HalfVerdict::NotIsolated);
    assert_eq!(ok.ingress.verdict, HalfVerdict::Allowed);
    assert!(ok.to_string().contains("[x/from-y-b rule 0]"), "{ok}");
    let no = t("y/a", "x/a", 80);
    assert!(!no.allowed);
    assert!(
        no.to_string()
            .contains("DENIED by the ingress policy of the destination"),
        "{no}"
    );
    assert!(!t("y/b", "x/a", 81).allowed);
    // By address, from the node, from outside.
    assert!(t("10.2.2.11", "x/a", 80).allowed);
    let host = t("host", "x/a", 9999);
    assert!(host.allowed, "{host}");
    assert!(
        host.to_string().contains("node access to its pods"),
        "{host}"
    );
    assert!(
        !t("192.168.0.2", "x/a", 80).allowed,
        "another node is no exception"
    );
    assert!(!t("8.8.8.8", "x/a", 80).allowed);
    assert!(t("x/a", "8.8.8.8", 80).allowed);
    assert!(
        e.trace(
            &TracePeer::parse("x/zz").unwrap(),
            &TracePeer::Host,
            Protocol::Tcp,
            1
        )
        .is_err()
    );
    assert!(TracePeer::parse("a/b/c").is_err() && TracePeer::parse("").is_err());
}

#[test]
fn a_policy_selecting_nothing_costs_nothing() {
    let mut e = PolicyEngine::new(NODE);
    e.update(&model(base()));
    let before = e.compiled().clone();
    let d = e.update(&model(base().into_iter().chain([policy("x", "nobody", json!({
        "podSelector": {"matchLabels": {"pod": "nobody"}}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}))])));
    assert!(d.is_empty());
    assert_eq!(&before, e.compiled());
}
