//! The policy engine (`berth_agent::policy`) against the independent reference evaluator
//! (`berth_tests::policy_ref`) on the connectivity matrix of Kubernetes' network-policy e2e suite:
//! namespaces x, y, z with pods a, b, c each (labels `pod=<name>`; namespace labels `ns=<name>`
//! and `kubernetes.io/metadata.name=<name>`), spread over three nodes, servers on TCP, UDP and
//! SCTP 80 and 81. Sources: the nine pods, an address outside the cluster and each node's own
//! stack; destinations: the nine pods, the outside address and a node address.
//!
//! For every scenario step, every node's engine is updated and its diff applied to a mirror of
//! that node's maps (the mirror is built from diffs only, never from a full state). Each cell is
//! evaluated as the datapath will: the source's egress on the source's node AND the
//! destination's ingress on the destination's node, the peer's identity looked up in that
//! node's ipcache, identity entries matched by identity (or wildcard) and port prefix, CIDR
//! entries by one longest-prefix lookup. The answer — and the answer of `trace` — must equal the
//! reference's in every cell. No root needed.
use berth_agent::cluster::{self, ClusterModel, Kind, Object, SourceArgs, SourceKind};
use berth_agent::policy::{
    self, Compiled, Direction, EndpointPolicy, HOST, IdentityAllocator, Peer, PolicyEngine,
    Protocol, TracePeer,
};
use berth_tests::apiserver::ApiServer;
use berth_tests::policy_ref::{Objects, Party};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use berth_tests::policy_scenarios::*;
type ObjKey = (String, String, String);
/// A pod's node and its endpoint key (namespace, name).
type Placed = (String, (String, String));

fn obj_key(v: &Value) -> ObjKey {
    (
        v["kind"].as_str().unwrap().to_string(),
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        v["metadata"]["name"].as_str().unwrap().to_string(),
    )
}

// ---- one node's engine and its mirror of the maps ----

struct NodeState {
    name: &'static str,
    engine: PolicyEngine,
    /// The maps as the datapath would hold them: built from diffs only.
    mirror: Compiled,
}

struct World {
    objects: BTreeMap<ObjKey, Value>,
    nodes: Vec<NodeState>,
    /// Map writes over all steps (for the log).
    writes: usize,
}

impl World {
    fn new() -> World {
        World {
            objects: BTreeMap::new(),
            nodes: NODES
                .iter()
                .map(|(n, _)| NodeState {
                    name: n,
                    engine: PolicyEngine::new(*n),
                    mirror: Compiled {
                        node: n.to_string(),
                        ..Default::default()
                    },
                })
                .collect(),
            writes: 0,
        }
    }

    fn model(&self) -> ClusterModel {
        let mut m = ClusterModel::default();
        for v in self.objects.values() {
            let kind = Kind::from_type(
                v["apiVersion"].as_str().unwrap(),
                v["kind"].as_str().unwrap(),
            )
            .unwrap();
            let obj = Object::from_value(kind, v.clone()).unwrap();
            m.upsert(obj.slim("n1"), "n1");
        }
        m.synced = true;
        m
    }

    fn reference(&self) -> Objects {
        let mut o = Objects {
            nodes: NODES
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
                .collect(),
            ..Default::default()
        };
        for v in self.objects.values() {
            match v["kind"].as_str().unwrap() {
                "Pod" => o.pods.push(serde_json::from_value(v.clone()).unwrap()),
                "Namespace" => o
                    .namespaces
                    .push(serde_json::from_value(v.clone()).unwrap()),
                "NetworkPolicy" => o.policies.push(serde_json::from_value(v.clone()).unwrap()),
                _ => {}
            }
        }
        o
    }

    /// Applies changes to the objects, updates every engine and its mirror, and checks that the
    /// mirror (diffs applied) equals the engine's state and a from-scratch compilation.
    fn step(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Apply(v) => {
                    self.objects.insert(obj_key(v), v.clone());
                }
                Change::Delete(kind, ns, name) => {
                    self.objects
                        .remove(&(kind.to_string(), ns.clone(), name.clone()));
                }
            }
        }
        let model = self.model();
        for n in &mut self.nodes {
            let d = n.engine.update(&model);
            self.writes += d.entry_writes();
            n.mirror.apply(&d);
            assert_eq!(
                &n.mirror,
                n.engine.compiled(),
                "{}: diffs reproduce the state",
                n.name
            );
            let scratch = policy::compile(&model, n.name, &mut IdentityAllocator::new());
            assert_eq!(
                &scratch,
                n.engine.compiled(),
                "{}: incremental == from scratch",
                n.name
            );
        }
    }

    fn node(&self, name: &str) -> &NodeState {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// The pod's node and address, from the objects.
    fn pod_place(&self, ns: &str, name: &str) -> Option<(String, Ipv4Addr)> {
        let v = self.objects.get(&("Pod".into(), ns.into(), name.into()))?;
        Some((
            v["spec"]["nodeName"].as_str()?.to_string(),
            v["status"]["podIP"].as_str()?.parse().ok()?,
        ))
    }

    fn node_ip(name: &str) -> Ipv4Addr {
        NODES
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
            .parse()
            .unwrap()
    }

    /// The verdict as the datapaths of the nodes involved compute it from their mirrors.
    fn datapath_allows(&self, src: &Party, dst: &Party, proto: Protocol, port: u16) -> bool {
        // (node, endpoint key) of a pod party, and the party's address.
        let place = |p: &Party| -> (Option<Placed>, Option<Ipv4Addr>) {
            match p {
                Party::Pod { namespace, name } => {
                    let (node, ip) = self.pod_place(namespace, name).unwrap();
                    (Some((node, (namespace.clone(), name.clone()))), Some(ip))
                }
                Party::Ip(a) => (None, Some(*a)),
                Party::Host(n) => (None, Some(World::node_ip(n))),
            }
        };
        let (src_ep, src_addr) = place(src);
        let (dst_ep, dst_addr) = place(dst);
        if let Some((node, key)) = &src_ep {
            let m = &self.node(node).mirror;
            let ep = &m.endpoints[key];
            let id = m.identity_of(dst_addr.unwrap());
            if !side_allows(ep, Direction::Egress, id, dst_addr, proto, port) {
                return false;
            }
        }
        if let Some((node, key)) = &dst_ep {
            let m = &self.node(node).mirror;
            let ep = &m.endpoints[key];
            // The node's own stack is recognised by its path, not by an ipcache lookup.
            let id = match src {
                Party::Host(h) if h == node => HOST,
                _ => m.identity_of(src_addr.unwrap()),
            };
            if !side_allows(ep, Direction::Ingress, id, src_addr, proto, port) {
                return false;
            }
        }
        true
    }

    fn trace(&self, src: &Party, dst: &Party, proto: Protocol, port: u16) -> policy::Trace {
        let (engine, src) = match src {
            Party::Host(n) => (&self.node(n).engine, TracePeer::Host),
            other => (&self.node("n1").engine, trace_peer(other)),
        };
        engine.trace(&src, &trace_peer(dst), proto, port).unwrap()
    }

    /// Every cell of the matrix against the reference.
    fn check(&self, label: &str) -> usize {
        let reference = self.reference();
        // Every pod present (scenarios add and delete some).
        let mut sources: Vec<Party> = self
            .objects
            .keys()
            .filter(|(kind, _, _)| kind == "Pod")
            .map(|(_, ns, name)| Party::pod(ns, name))
            .collect();
        let mut dests = sources.clone();
        dests.push(Party::Ip(OUTSIDE.parse().unwrap()));
        dests.push(Party::Ip(World::node_ip("n2")));
        sources.push(Party::Ip(OUTSIDE.parse().unwrap()));
        for (n, _) in NODES {
            sources.push(Party::Host(n.into()));
        }
        let mut bad = Vec::new();
        let mut cells = 0;
        for src in &sources {
            for dst in &dests {
                if !matches!(src, Party::Pod { .. }) && !matches!(dst, Party::Pod { .. }) {
                    continue;
                }
                for (proto, port) in PROBES {
                    cells += 1;
                    let want = reference.allowed(src, dst, proto.as_k8s(), port);
                    let got = self.datapath_allows(src, dst, proto, port);
                    let trace = self.trace(src, dst, proto, port);
                    if got != want || trace.allowed != want {
                        bad.push(format!(
                            "{src} -> {dst} {proto}/{port}: reference {want}, datapath {got}, \
                             trace {}\n    {}",
                            trace.allowed,
                            trace.explanation().join("\n    ")
                        ));
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{label}: {} of {cells} cells differ:\n{}",
            bad.len(),
            bad.iter().take(12).cloned().collect::<Vec<_>>().join("\n")
        );
        cells
    }
}

fn trace_peer(p: &Party) -> TracePeer {
    match p {
        Party::Pod { namespace, name } => TracePeer::Pod {
            namespace: namespace.clone(),
            name: name.clone(),
        },
        Party::Ip(a) => TracePeer::Ip(*a),
        Party::Host(_) => TracePeer::Host,
    }
}

/// One side, as the datapath evaluates it: identity entries keyed by (identity or wildcard,
/// protocol, port prefix); CIDR entries through one longest-prefix match.
fn side_allows(
    ep: &EndpointPolicy,
    dir: Direction,
    peer_id: u32,
    peer_addr: Option<Ipv4Addr>,
    proto: Protocol,
    port: u16,
) -> bool {
    let side = ep.direction(dir);
    if !side.isolated {
        return true;
    }
    let port_hit = |proto_e: Option<Protocol>, ports: policy::PortRange| {
        proto_e.is_none_or(|p| p == proto)
            && ports.prefixes().iter().any(|&(p, len)| {
                let shift = 16 - u32::from(len);
                u32::from(port) >> shift == u32::from(p) >> shift
            })
    };
    for e in side.entries.keys() {
        let id_hit = match e.peer {
            Peer::Any => true,
            Peer::Identity(id) => id == peer_id,
            Peer::Cidr(_) => false,
        };
        if id_hit && port_hit(e.proto, e.ports) {
            return true;
        }
    }
    let Some(addr) = peer_addr else { return false };
    let lpm = side.cidr_lpm();
    let best = lpm
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len());
    best.is_some_and(|(_, rules)| rules.iter().any(|(p, r)| port_hit(*p, *r)))
}

#[test]
fn scenarios_match_the_reference() {
    let all = scenarios();
    assert!(all.len() >= 50, "{} scenarios", all.len());
    let mut cells = 0;
    let mut steps = 0;
    for s in &all {
        let mut w = World::new();
        w.step(&base());
        for (i, changes) in s.steps.iter().enumerate() {
            w.step(changes);
            cells += w.check(&format!("{} (step {})", s.name, i + 1));
            steps += 1;
        }
    }
    eprintln!(
        "{} scenarios, {steps} steps, {cells} cells checked",
        all.len()
    );
}

/// All scenarios through one set of engines, never reset: every transition between unrelated
/// policy sets is a diff the mirrors apply.
#[test]
fn marathon_through_every_scenario() {
    let mut w = World::new();
    w.step(&base());
    let mut cells = 0;
    for s in scenarios() {
        // Back to the base objects, then the scenario's steps.
        let stale: Vec<Change> = w
            .objects
            .keys()
            .filter(|(k, _, _)| k == "NetworkPolicy" || k == "Pod")
            .map(|(k, ns, n)| {
                Change::Delete(
                    if k == "Pod" { "Pod" } else { "NetworkPolicy" },
                    ns.clone(),
                    n.clone(),
                )
            })
            .collect();
        let mut reset = stale;
        reset.extend(base());
        w.step(&reset);
        for (i, changes) in s.steps.iter().enumerate() {
            w.step(changes);
            cells += w.check(&format!("marathon: {} (step {})", s.name, i + 1));
        }
    }
    eprintln!("marathon: {cells} cells, {} map writes", w.writes);
}

/// With many policies in force, changing one touches only entries it produces (before or after)
/// and only endpoints it selects.
#[test]
fn changing_one_policy_touches_only_its_entries() {
    let mut w = World::new();
    w.step(&base());
    let mut changes = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, p) in PODS.iter().enumerate() {
            changes.push(np(ns, &format!("p-{p}"), json!({"podSelector": {"matchLabels": {"pod": p}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80 + ((i + j) % 2) as i32}]}],
                "egress": [{"to": [{"podSelector": {}}]}, {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]})));
        }
    }
    changes.push(np("x", "shared", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]})));
    w.step(&changes);
    w.check("many policies");
    let before: Vec<Compiled> = w
        .nodes
        .iter()
        .map(|n| n.engine.compiled().clone())
        .collect();
    let target = "p-b";
    let model = {
        w.objects.insert(
            ("NetworkPolicy".into(), "x".into(), target.into()),
            match np("x", target, json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}], "ports": [{"port": 81, "protocol": "UDP"}]}],
                "egress": [{"to": [{"podSelector": {}}]}]})) {
                Change::Apply(v) => v,
                Change::Delete(..) => unreachable!(),
            },
        );
        w.model()
    };
    let by_target = |o: &BTreeSet<policy::Origin>| {
        o.iter().any(|o| matches!(o, policy::Origin::Rule { policy, .. } if policy.namespace == "x" && policy.name == target))
    };
    let mut touched = 0;
    for (n, old) in w.nodes.iter_mut().zip(&before) {
        let d = n.engine.update(&model);
        for (key, ed) in &d.endpoints {
            assert_eq!(
                key,
                &("x".to_string(), "b".to_string()),
                "{}: only x/b is selected by {target}",
                n.name
            );
            for dir in [Direction::Ingress, Direction::Egress] {
                let dd = ed.direction(dir);
                for e in &dd.remove {
                    assert!(
                        by_target(&old.endpoints[key].direction(dir).entries[e]),
                        "removed {e} was {target}'s"
                    );
                }
                for (e, o) in dd.add.iter().chain(&dd.reattributed) {
                    let was = old.endpoints[key].direction(dir).entries.get(e);
                    assert!(
                        by_target(o) || was.is_some_and(by_target),
                        "added/changed {e} concerns {target}"
                    );
                }
                touched += dd.writes();
            }
        }
        n.mirror.apply(&d);
    }
    assert!(touched > 0);
    eprintln!("changing {target} wrote {touched} entries");
    w.check("after changing one policy");
}

/// Bigger cluster: cost of a full compile and of an incremental update (logged; bounds loose).
#[test]
fn thousand_pods_hundred_policies() {
    let mut m = ClusterModel::default();
    let add = |m: &mut ClusterModel, c: Change| {
        if let Change::Apply(v) = c {
            let kind = Kind::from_type(
                v["apiVersion"].as_str().unwrap(),
                v["kind"].as_str().unwrap(),
            )
            .unwrap();
            m.upsert(Object::from_value(kind, v).unwrap().slim("n1"), "n1");
        }
    };
    for c in base() {
        add(&mut m, c);
    }
    for i in 0..1000u32 {
        let ns = NAMESPACES[(i % 3) as usize];
        let node = NODES[(i % 3) as usize].0;
        let ip = format!("10.3.{}.{}", i / 250, i % 250 + 1);
        add(
            &mut m,
            pod_full(
                ns,
                &format!("w{i}"),
                json!({"app": format!("app{}", i % 50), "pod": "w"}),
                &ip,
                serve_ports(),
                node,
            ),
        );
    }
    for i in 0..100u32 {
        let ns = NAMESPACES[(i % 3) as usize];
        add(
            &mut m,
            np(
                ns,
                &format!("p{i}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app{}", i % 50)}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("app{}", (i + 1) % 50)}}}],
                "ports": [{"port": 80}, {"port": "serve-81-udp", "protocol": "UDP"}]}]}),
            ),
        );
    }
    let mut e = PolicyEngine::new("n1");
    let t = std::time::Instant::now();
    let d = e.update(&m);
    let full = t.elapsed();
    let entries = e.compiled().entry_count();
    let t = std::time::Instant::now();
    let again = e.update(&m);
    let noop = t.elapsed();
    assert!(again.is_empty());
    add(
        &mut m,
        np(
            "x",
            "p0",
            json!({"podSelector": {"matchLabels": {"app": "app0"}},
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app1"}}}], "ports": [{"port": 81}]}]}),
        ),
    );
    let t = std::time::Instant::now();
    let one = e.update(&m);
    let incr = t.elapsed();
    eprintln!(
        "1000 pods, 100 policies: {} endpoints, {entries} entries, {} identities; full {full:?} ({} writes), \
         unchanged {noop:?}, one policy changed {incr:?} ({} writes)",
        e.compiled().endpoints.len(),
        e.compiled().identities.len(),
        d.entry_writes(),
        one.entry_writes()
    );
    assert!(one.entry_writes() > 0 && one.entry_writes() < d.entry_writes() / 10);
}

// ---- the engine fed by the Kubernetes source ----

async fn wait_model(
    rx: &mut tokio::sync::watch::Receiver<Arc<ClusterModel>>,
    what: &str,
    mut pred: impl FnMut(&ClusterModel) -> bool,
) -> Arc<ClusterModel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let cur = rx.borrow_and_update().clone();
        if pred(&cur) {
            return cur;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!(
                "timed out waiting for {what}: {} pods, {} namespaces, {} policies",
                cur.pods.len(),
                cur.namespaces.len(),
                cur.network_policies.len()
            ),
        }
    }
}

/// The agent's Kubernetes source watches every pod, namespace and policy (also across a relist
/// after 410 Gone), and the engine compiled from its model agrees with the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_feeds_the_engine() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "berth_agent=info".into()),
        )
        .with_test_writer()
        .try_init();
    let server = ApiServer::start().await;
    let mut w = World::new();
    let mut seed = base();
    seed.push(np("x", "from-y", json!({"podSelector": pod_a(),
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]})));
    let apply = |w: &mut World, changes: &[Change]| {
        for c in changes {
            match c {
                Change::Apply(v) => {
                    server.apply(v.clone());
                }
                Change::Delete(kind, ns, name) => {
                    server.delete(kind, Some(ns), name);
                }
            }
        }
        w.step(changes);
    };
    apply(&mut w, &seed);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let args = SourceArgs {
        source: SourceKind::Kubernetes,
        kubeconfig: Some(kubeconfig),
        manifests: None,
    };
    let mut rx = cluster::start(&args, "n1").await.unwrap();
    let m = wait_model(&mut rx, "initial sync", |m| {
        m.synced && m.network_policies.len() == 1
    })
    .await;
    assert_eq!((m.pods.len(), m.namespaces.len(), m.nodes.len()), (9, 3, 3));
    assert_eq!(m.local_pods.len(), 3, "n1's pods whole");
    assert_eq!(server.list_count("networkpolicies"), 1);
    // The engine on the source's model equals the engine on the test's own model.
    let mut live = PolicyEngine::new("n1");
    live.update(&m);
    assert_eq!(live.compiled(), w.node("n1").engine.compiled());
    w.check("kube source: initial");

    // Policy update, pod label change, namespace label change: each arrives and compiles the same.
    let steps: Vec<Vec<Change>> = vec![
        vec![np(
            "x",
            "from-y",
            json!({"podSelector": pod_a(),
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 81}]}]}),
        )],
        vec![pod_labeled("x", "b", json!({"pod": "a"}))],
        vec![namespace("z", json!({"ns": "y"}))],
    ];
    for (i, s) in steps.iter().enumerate() {
        apply(&mut w, s);
        let want = w.node("n1").engine.compiled().clone();
        let mut probe = PolicyEngine::new("n1");
        wait_model(&mut rx, &format!("step {i}"), |m| {
            probe.update(m);
            probe.compiled() == &want
        })
        .await;
        w.check(&format!("kube source: step {i}"));
    }

    // Changes while disconnected with the history expired: every kind relists and converges.
    let lists = server.list_count("networkpolicies");
    server.stop().await;
    apply(
        &mut w,
        &[
            del_np("x", "from-y"),
            np("y", "deny", json!({"podSelector": {}})),
            namespace("z", json!({})),
            Change::Delete("Pod", "z".into(), "c".into()),
        ],
    );
    server.expire_history();
    server.resume().await;
    let want = w.node("n1").engine.compiled().clone();
    let mut probe = PolicyEngine::new("n1");
    let m = wait_model(&mut rx, "relisted", |m| {
        probe.update(m);
        probe.compiled() == &want
    })
    .await;
    assert_eq!(m.pods.len(), 8);
    assert!(server.list_count("networkpolicies") > lists);
    assert!(server.list_count("namespaces") > 1);
    w.check("kube source: after relist");
}

// ---- memory at scale ----

/// Counts the bytes each thread holds (allocated minus freed on it), so one test can measure
/// what it keeps while others run in parallel.
struct Counting;

thread_local! {
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        count(-(layout.size() as isize));
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        count(new as isize - layout.size() as isize);
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.with(|c| c.get())
}

/// A pod as a real API server returns it (managedFields, annotations, env, volumes, conditions):
/// what the source receives; the model keeps only the policy view of pods of other nodes.
fn realistic_pod(i: u32, nodes: u32) -> Value {
    let deploy = i / 10;
    let ns = format!("team-{}", deploy % 50);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("app-{deploy}-7d9c8b6f5-{i:05}"), "namespace": ns,
            "uid": format!("3f2b1c4d-0000-4000-8000-{i:012}"),
            "resourceVersion": "123456789", "generateName": format!("app-{deploy}-7d9c8b6f5-"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": format!("app-{deploy}"), "pod-template-hash": "7d9c8b6f5",
                "app.kubernetes.io/part-of": format!("system-{}", deploy % 20), "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("app-{deploy}-7d9c8b6f5"), "uid": "aaaaaaaa-0000-4000-8000-000000000000",
                "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:containers": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {}, "f:podIPs": {}}}}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % nodes),
            "serviceAccountName": "default",
            "containers": [{
                "name": "app", "image": "registry.example.com/team/app:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10}
            }, {
                "name": "sidecar", "image": "registry.example.com/proxy:2.0",
                "ports": [{"name": "proxy", "containerPort": 15001}]
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "192.168.0.10", "podIP": format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256),
            "podIPs": [{"ip": format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)}],
            "qosClass": "Burstable", "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.example.com/team/app:1.2.3",
                "imageID": "registry.example.com/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "containerID": "containerd://0000000000000000000000000000000000000000000000000000000000000000",
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]
        }
    })
}

/// 10 000 pods (100 nodes, 1 000 deployments in 50 namespaces) and 1 000 policies: what the
/// model and the engine keep (issue 9 budget: agent RSS ≤ 64 MB with 10 000 pods).
#[test]
fn ten_thousand_pods_memory() {
    let start = live_bytes();
    let mut m = ClusterModel::default();
    for t in 0..50 {
        let name = format!("team-{t}");
        m.upsert(
            Object::Namespace(
                serde_json::from_value(json!({"metadata": {"name": name,
                "labels": {"team": name, "kubernetes.io/metadata.name": name}}}))
                .unwrap(),
            ),
            "node-0",
        );
    }
    let before_pods = live_bytes();
    for i in 0..10_000 {
        // As the source does: parse, slim (pods of other nodes keep only their policy view).
        let pod = Object::from_value(Kind::Pod, realistic_pod(i, 100)).unwrap();
        m.upsert(pod.slim("node-0"), "node-0");
    }
    let pods_bytes = live_bytes() - before_pods;
    let before_np = live_bytes();
    for p in 0..1000u32 {
        let ns = format!("team-{}", p % 50);
        let v = json!({"metadata": {"name": format!("p{p}"), "namespace": ns}, "spec": {
            "podSelector": {"matchLabels": {"app": format!("app-{}", p)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (p + 1) % 50)}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": format!("system-{}", p % 20)}}}],
                "ports": [{"port": "http"}, {"port": 9090}]}],
            "egress": [{"to": [{"podSelector": {}}]}, {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                "ports": [{"port": 443}]}]}});
        m.upsert(
            Object::NetworkPolicy(serde_json::from_value(v).unwrap()),
            "node-0",
        );
    }
    let policy_bytes = live_bytes() - before_np;
    let model_bytes = live_bytes() - start;
    // A published revision shares the pods.
    let before_clone = live_bytes();
    let published = m.clone();
    let clone_bytes = live_bytes() - before_clone;
    let before_engine = live_bytes();
    let mut e = PolicyEngine::new("node-0");
    let t = std::time::Instant::now();
    let first = e.update(&m);
    let compile = t.elapsed();
    // The diff is transient (handed to the datapath, then dropped).
    drop(first);
    let engine_bytes = live_bytes() - before_engine;
    let mb = |b: isize| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "10 000 pods, 1 000 policies (heap bytes requested): model {:.1} MB (pods {:.1} MB incl. {} \
         local pods whole, policies {:.1} MB), published revision {:.1} MB more, engine {:.1} MB \
         ({} endpoints, {} entries, {} identities); first compile {compile:?}",
        mb(model_bytes),
        mb(pods_bytes),
        m.local_pods.len(),
        mb(policy_bytes),
        mb(clone_bytes),
        mb(engine_bytes),
        e.compiled().endpoints.len(),
        e.compiled().entry_count(),
        e.compiled().identities.len()
    );
    assert_eq!(m.pods.len(), 10_000);
    // Budgets with headroom over what this layout needs (9, 3 and 6 MB when written).
    assert!(mb(model_bytes) < 14.0, "model {:.1} MB", mb(model_bytes));
    assert!(
        mb(clone_bytes) < 5.0,
        "published revision {:.1} MB",
        mb(clone_bytes)
    );
    assert!(mb(engine_bytes) < 10.0, "engine {:.1} MB", mb(engine_bytes));
    drop(published);
}
