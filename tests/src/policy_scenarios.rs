//! The NetworkPolicy scenarios shared by the engine test (`policy_engine.rs`, no root) and the
//! datapath test (`policy.rs`, privileged): the connectivity matrix of Kubernetes' network-policy
//! e2e suite — namespaces x, y, z with pods a, b, c each (labels `pod=<name>`; namespace labels
//! `ns=<name>` and `kubernetes.io/metadata.name=<name>`), spread over three nodes, servers on TCP,
//! UDP and SCTP 80 and 81 — and the scenarios, each a list of steps of object changes.
use berth_agent::policy::Protocol;
use serde_json::{Value, json};

pub const NODES: [(&str, &str); 3] = [
    ("n1", "192.168.50.1"),
    ("n2", "192.168.50.2"),
    ("n3", "192.168.50.3"),
];
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const OUTSIDE: &str = "203.0.113.7";
pub const PROBES: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 80),
    (Protocol::Udp, 81),
    (Protocol::Sctp, 80),
    (Protocol::Sctp, 81),
];

pub fn node_index(ns: &str, pod: &str) -> usize {
    let i = NAMESPACES.iter().position(|n| *n == ns).unwrap();
    let j = PODS.iter().position(|p| *p == pod).unwrap_or(0);
    (i + j) % 3
}

pub fn default_ip(ns: &str, pod: &str) -> String {
    let i = NAMESPACES.iter().position(|n| *n == ns).unwrap_or(0);
    let j = PODS.iter().position(|p| *p == pod).unwrap_or(3);
    format!("10.2.{}.{}", node_index(ns, pod) + 1, 10 + i * 4 + j)
}

pub fn serve_ports() -> Value {
    let mut ports = Vec::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(
                json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                "containerPort": port, "protocol": proto}),
            );
        }
    }
    Value::Array(ports)
}

// ---- objects and changes ----

#[derive(Clone, Debug)]
pub enum Change {
    Apply(Value),
    Delete(&'static str, String, String),
}

pub fn pod_full(ns: &str, name: &str, labels: Value, ip: &str, ports: Value, node: &str) -> Change {
    Change::Apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "agnhost", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
}

pub fn pod_labeled(ns: &str, name: &str, labels: Value) -> Change {
    let node = NODES[node_index(ns, name)].0;
    pod_full(ns, name, labels, &default_ip(ns, name), serve_ports(), node)
}

pub fn pod_ports(ns: &str, name: &str, ports: Value) -> Change {
    let node = NODES[node_index(ns, name)].0;
    pod_full(
        ns,
        name,
        json!({"pod": name}),
        &default_ip(ns, name),
        ports,
        node,
    )
}

pub fn namespace(name: &str, extra: Value) -> Change {
    let mut labels = json!({"ns": name, "kubernetes.io/metadata.name": name});
    for (k, v) in extra.as_object().into_iter().flatten() {
        labels[k] = v.clone();
    }
    Change::Apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels}}))
}

pub fn np(ns: &str, name: &str, spec: Value) -> Change {
    Change::Apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
}

pub fn del_np(ns: &str, name: &str) -> Change {
    Change::Delete("NetworkPolicy", ns.into(), name.into())
}

pub fn base() -> Vec<Change> {
    let mut out = Vec::new();
    for (name, ip) in NODES {
        out.push(Change::Apply(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "spec": {"podCIDR": format!("10.2.{}.0/24", &name[1..])},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}})));
    }
    for ns in NAMESPACES {
        out.push(namespace(ns, json!({})));
        for p in PODS {
            out.push(pod_labeled(ns, p, json!({"pod": p})));
        }
    }
    out
}

// ---- the scenarios ----

pub struct Scenario {
    pub name: &'static str,
    pub steps: Vec<Vec<Change>>,
}

pub fn sc(name: &'static str, steps: Vec<Vec<Change>>) -> Scenario {
    Scenario { name, steps }
}

pub fn one(name: &'static str, changes: Vec<Change>) -> Scenario {
    sc(name, vec![changes])
}

pub fn pod_a() -> Value {
    json!({"matchLabels": {"pod": "a"}})
}

pub fn scenarios() -> Vec<Scenario> {
    let deny_in_x = np(
        "x",
        "deny-in",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    let deny_out_x = np(
        "x",
        "deny-out",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    vec![
        one("no policies", vec![]),
        one("default deny ingress in x", vec![deny_in_x.clone()]),
        one("default deny egress in x", vec![deny_out_x.clone()]),
        one("default deny both in x", vec![np("x", "deny", json!({"podSelector": {},
            "policyTypes": ["Ingress", "Egress"]}))]),
        one("policyTypes omitted, no rules: ingress deny", vec![np("x", "p", json!({"podSelector": {}}))]),
        one("allow all ingress (empty rule) beside a deny", vec![deny_in_x.clone(),
            np("x", "allow-all", json!({"podSelector": {}, "ingress": [{}]}))]),
        one("allow all egress (empty rule) beside a deny", vec![deny_out_x.clone(),
            np("x", "allow-all", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}))]),
        one("deny ingress to x/a only", vec![np("x", "p", json!({"podSelector": pod_a(), "ingress": []}))]),
        one("allow from the same namespace", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"podSelector": {}}]}]}))]),
        one("allow from pod b of the same namespace", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))]),
        one("allow from namespace y", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}))]),
        one("namespace y AND pod b (one peer)", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "b"}}}]}]}))]),
        one("namespace y OR pod b (two peers)", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))]),
        one("namespace by kubernetes.io/metadata.name In [z]", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["z"]}]}}]}]}))]),
        one("namespace NotIn [x]", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}))]),
        one("namespace In [y, z] for egress", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "In", "values": ["y", "z"]}]}}]}]}))]),
        sc("namespace label Exists / DoesNotExist", vec![
            vec![namespace("y", json!({"team": "blue"})),
                np("x", "p", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {
                    "matchExpressions": [{"key": "team", "operator": "Exists"}]}}]}]})),
                np("x", "q", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"namespaceSelector": {
                    "matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}]}]}))],
            // The label moves to z: both policies follow.
            vec![namespace("y", json!({})), namespace("z", json!({"team": "red"}))],
        ]),
        sc("NotIn matches a missing key (namespaces and pods)", vec![
            vec![namespace("y", json!({"team": "blue"})), namespace("z", json!({"team": "red"})),
                pod_labeled("y", "a", json!({"pod": "a", "role": "db"})),
                np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
                    "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["blue"]}]}}]}]})),
                np("y", "q", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["web"]}]}}]}]}))],
            vec![namespace("z", json!({})), pod_labeled("y", "a", json!({"pod": "a", "role": "web"}))],
        ]),
        one("pod In [a, b]", vec![np("y", "p", json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}}]}]}))]),
        one("pod NotIn [a]", vec![np("y", "p", json!({"podSelector": {}, "ingress": [{"from": [
            {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}}]}]}))]),
        sc("pod label Exists / DoesNotExist, then the label moves", vec![
            vec![pod_labeled("x", "b", json!({"pod": "b", "role": "db"})),
                np("z", "p", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}}]}]})),
                np("z", "q", json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {},
                        "podSelector": {"matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]}}]}]}))],
            vec![pod_labeled("x", "b", json!({"pod": "b"})), pod_labeled("y", "c", json!({"pod": "c", "role": "x"}))],
        ]),
        one("matchLabels AND matchExpressions", vec![np("x", "p", json!({
            "podSelector": {"matchLabels": {"pod": "a"}, "matchExpressions": [{"key": "pod", "operator": "Exists"}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["z"]}]},
                "podSelector": {"matchLabels": {"pod": "c"}, "matchExpressions": [{"key": "pod", "operator": "In", "values": ["c", "b"]}]}}]}]}))]),
        one("empty namespaceSelector with a podSelector: pod a anywhere", vec![np("y", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": pod_a()}]}]}))]),
        one("empty namespaceSelector alone: every pod, not the outside", vec![np("y", "p", json!({"podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": {}}]}], "egress": [{"to": [{"namespaceSelector": {}}]}]}))]),
        one("ports: TCP 80", vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}))]),
        one("ports: TCP 81 and every UDP port", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 81, "protocol": "TCP"}, {"protocol": "UDP"}]}]}))]),
        one("ports: SCTP 80 egress", vec![np("y", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}))]),
        one("endPort 80-81", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80, "endPort": 81}]}]}))]),
        one("endPort 81-81 UDP beside TCP 80", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"ports": [{"port": 81, "endPort": 81, "protocol": "UDP"}, {"port": 80}]}]}))]),
        one("endPort egress range 1-80", vec![np("z", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": 1, "endPort": 80, "protocol": "SCTP"}]}]}))]),
        one("named port ingress serve-80-tcp", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}))]),
        one("named port with the wrong protocol matches nothing", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"ports": [{"port": "serve-80-udp", "protocol": "TCP"}]}]}))]),
        one("named port ingress UDP and SCTP", vec![np("y", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                "ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": "serve-80-sctp", "protocol": "SCTP"}]}]}))]),
        one("named port egress to namespace y", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": "serve-81-tcp"}]}]}))]),
        sc("named port resolved per destination pod (ingress and egress)", vec![
            vec![np("x", "in", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})),
                np("z", "out", json!({"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}))],
            // x/a now serves "serve-80-tcp" on 81, y/b has no such port at all.
            vec![pod_ports("x", "a", json!([{"name": "serve-80-tcp", "containerPort": 81},
                    {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}])),
                pod_ports("y", "b", json!([{"name": "other", "containerPort": 80}]))],
            vec![pod_ports("x", "a", serve_ports()), pod_ports("y", "b", serve_ports())],
        ]),
        one("named port egress through an ipBlock peer", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.2.2.0/24"}}], "ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": 80}]}]}))]),
        one("ipBlock ingress from outside", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}))]),
        one("ipBlock pod CIDRs with an except (pod addresses too)", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16", "except": ["10.2.2.0/24"]}}], "ports": [{"port": 80}]}]}))]),
        one("ipBlock of one pod's address", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{}/32", default_ip("y", "b"))}}]}]}))]),
        one("ipBlock except a single address", vec![np("y", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16", "except": [format!("{}/32", default_ip("x", "a")), "10.2.3.0/25"]}}]}]}))]),
        one("egress to everything but the cluster", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.2.0.0/16"]}}]}]}))]),
        one("egress to node addresses", vec![np("z", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "192.168.50.0/24"}}], "ports": [{"port": 81}]}]}))]),
        one("ingress from another node's address", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.50.2/32"}}], "ports": [{"port": 80}]}]}))]),
        one("ipBlock host bits and an IPv6 block", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.3.77/24"}}, {"ipBlock": {"cidr": "fd00::/8"}}]}]}))]),
        one("egress to namespace y on TCP 80 only", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}))]),
        one("policyTypes omitted with egress rules: both directions", vec![np("x", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}))]),
        one("policyTypes omitted with an empty egress list: ingress only", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}], "egress": []}))]),
        one("policyTypes Egress ignores ingress rules", vec![np("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{"to": [{"podSelector": {}}]}]}))]),
        one("policyTypes both, no rules: isolated both ways", vec![np("z", "p", json!({"podSelector": pod_a(),
            "policyTypes": ["Egress", "Ingress"]}))]),
        one("several policies on one pod: union of peers", vec![
            np("x", "from-y", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})),
            np("x", "from-z", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}))]),
        one("several policies: different peers on different ports", vec![
            np("x", "y80", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]})),
            np("x", "z81", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}], "ports": [{"port": 81, "protocol": "UDP"}]}]})),
            np("x", "a-egress", json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {}}]}]}))]),
        one("explicit empty from list allows every source", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [], "ports": [{"port": 80, "protocol": "UDP"}]}]}))]),
        one("explicit empty ports list allows every port", vec![np("x", "p", json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": []}]}))]),
        one("source egress AND destination ingress", vec![
            np("x", "a-out", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})),
            np("y", "b-in", json!({"podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}))]),
        one("rules of one policy are ORed", vec![np("z", "p", json!({"podSelector": {}, "ingress": [
            {"from": [{"podSelector": pod_a()}], "ports": [{"port": 80}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": 81, "protocol": "SCTP"}]},
            {"from": [{"ipBlock": {"cidr": "203.0.113.0/28"}}], "ports": [{"port": 81}]}]}))]),
        one("invalid operator beside a valid policy", vec![deny_in_x.clone(),
            np("x", "bad", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                {"key": "pod", "operator": "Matches", "values": ["a"]}]}}]}]}))]),
        one("invalid CIDR and invalid except", vec![deny_in_x.clone(),
            np("x", "bad1", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/40"}}]}]})),
            np("x", "bad2", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16", "except": ["10.3.0.0/24"]}}]}]}))]),
        one("invalid endPort below port / without port", vec![
            np("y", "bad1", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 80}]}]})),
            np("y", "bad2", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"endPort": 80}]}]}))]),
        one("invalid protocol and port out of range", vec![
            np("z", "bad1", json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]})),
            np("z", "bad2", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 65536}]}]})),
            np("z", "good", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {}}]}]}))]),
        one("invalid peers: empty, and ipBlock with a selector", vec![deny_out_x.clone(),
            np("x", "bad1", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{}]}]})),
            np("x", "bad2", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
                {"ipBlock": {"cidr": "0.0.0.0/0"}, "namespaceSelector": {}}]}]}))]),
        one("invalid operator in the policy's own podSelector", vec![
            np("x", "bad", json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists", "values": ["a"]}]}}))]),
        sc("a pod relabelled into and out of a selection", vec![
            vec![np("x", "p", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))],
            vec![pod_labeled("x", "c", json!({"pod": "b"}))],
            vec![pod_labeled("x", "b", json!({"pod": "a"}))],
            vec![pod_labeled("x", "c", json!({"pod": "c"})), pod_labeled("x", "b", json!({"pod": "b"}))],
        ]),
        sc("a namespace relabelled", vec![
            vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}))],
            vec![namespace("y", json!({"ns": "q"}))],
            vec![namespace("z", json!({"ns": "y"}))],
        ]),
        sc("a policy updated, then deleted", vec![
            vec![np("y", "p", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": 80}]}]}))],
            vec![np("y", "p", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": 81}]}]}))],
            vec![np("y", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}))],
            vec![del_np("y", "p")],
        ]),
        sc("a pod added, moved to another address, removed", vec![
            vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "d"}}}]}]})),
                np("y", "q", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.2.1.0/24"}}]}]}))],
            vec![pod_full("x", "d", json!({"pod": "d"}), "10.2.1.99", serve_ports(), "n1")],
            vec![pod_full("x", "d", json!({"pod": "d"}), "10.2.3.99", serve_ports(), "n3")],
            vec![Change::Delete("Pod", "x".into(), "d".into())],
        ]),
        sc("a policy turns invalid, then valid again", vec![
            vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}))],
            vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "In", "values": []}]}}]}]}))],
            vec![np("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "In", "values": ["z", "x"]}]}}]}]}))],
        ]),
        sc("deny, allow, deny again", vec![
            vec![deny_in_x.clone(), deny_out_x.clone()],
            vec![np("x", "allow", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}))],
            vec![del_np("x", "allow")],
            vec![del_np("x", "deny-in"), del_np("x", "deny-out")],
        ]),
        one("every namespace isolated, intra-namespace allowed", NAMESPACES.iter().map(|ns| np(ns, "same-ns",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{"to": [{"podSelector": {}}]}]}))).collect()),
        one("egress DNS-like UDP to one pod plus TCP to a namespace", vec![np("z", "p", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "c"}}}],
                "ports": [{"port": 80, "protocol": "UDP"}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 81}]}]}))]),
        one("a policy selecting nothing", vec![np("x", "p", json!({"podSelector": {"matchLabels": {"pod": "nobody"}}}))]),
        one("a policy in another namespace does not select x's pods", vec![np("y", "p", json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"podSelector": {}}]}]}))]),
        one("overlapping CIDR rules on different ports", vec![np("x", "p", json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]},
            {"from": [{"ipBlock": {"cidr": "10.2.2.0/24"}}], "ports": [{"port": 81}]},
            {"from": [{"ipBlock": {"cidr": format!("{}/32", default_ip("z", "c"))}}], "ports": [{"protocol": "SCTP"}]}]}))]),
    ]
}
