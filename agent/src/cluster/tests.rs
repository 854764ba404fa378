//! Unit tests of the model, the manifest parser and the manifest source end to end.
use super::*;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn node_json(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn node(v: serde_json::Value) -> Node {
    serde_json::from_value(v).unwrap()
}

#[test]
fn node_view_pod_cidrs_preferred_over_pod_cidr() {
    let n = node(json!({
        "metadata": {"name": "n1"},
        "spec": {"podCIDR": "10.2.1.0/24", "podCIDRs": ["10.2.7.0/24", "fd00:1::/64", "10.2.8.0/24"]}
    }));
    let v = NodeView::from_node(&n);
    assert_eq!(v.name, "n1");
    assert_eq!(
        v.pod_cidrs,
        vec![
            "10.2.7.0/24".parse().unwrap(),
            "10.2.8.0/24".parse().unwrap()
        ]
    );
}

#[test]
fn node_view_falls_back_to_pod_cidr_and_ignores_ipv6() {
    let n = node(json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.2.1.0/24"}}));
    assert_eq!(
        NodeView::from_node(&n).pod_cidrs,
        vec!["10.2.1.0/24".parse().unwrap()]
    );
    let n = node(json!({"metadata": {"name": "n1"}, "spec": {"podCIDRs": []}}));
    assert!(NodeView::from_node(&n).pod_cidrs.is_empty());
    let n = node(json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "fd00::/64"}}));
    assert!(NodeView::from_node(&n).pod_cidrs.is_empty());
    let n = node(json!({"metadata": {"name": "n1"}}));
    let v = NodeView::from_node(&n);
    assert!(v.pod_cidrs.is_empty() && v.internal_ip.is_none() && !v.ready);
}

#[test]
fn node_view_internal_ip_and_readiness() {
    let n = node(json!({
        "metadata": {"name": "n1"},
        "status": {
            "addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "fd00::5"},
                {"type": "InternalIP", "address": "192.168.0.5"},
                {"type": "InternalIP", "address": "192.168.0.6"}
            ],
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True"}
            ]
        }
    }));
    let v = NodeView::from_node(&n);
    assert_eq!(v.internal_ip, Some("192.168.0.5".parse().unwrap()));
    assert!(v.ready);
    for status in ["False", "Unknown"] {
        let n = node(json!({
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": status}]}
        }));
        assert!(!NodeView::from_node(&n).ready, "{status}");
    }
}

#[test]
fn model_lookups() {
    let mut m = ClusterModel::default();
    for name in ["b", "a"] {
        m.upsert(Object::Node(node(node_json(name))), "a");
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"nodeName": "a", "containers": []}
    }))
    .unwrap();
    m.upsert(Object::Pod(pod), "a");
    let names: Vec<_> = m.node_views().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(m.node_view("a").is_some() && m.node_view("zz").is_none());
    assert_eq!(
        m.local_pod_by_uid("u-1").unwrap().metadata.name.as_deref(),
        Some("p")
    );
    assert!(m.local_pod_by_uid("u-2").is_none());
    assert_eq!(Kind::from_type("v1", "Pod"), Some(Kind::Pod));
    assert_eq!(Kind::from_type("apps/v1", "Pod"), None);
    // Policy needs every pod of the cluster: no kind is field-selected any more.
    for k in Kind::ALL {
        assert_eq!(k.field_selector("a"), None, "{k:?}");
    }
    assert_eq!(
        Kind::from_type("networking.k8s.io/v1", "NetworkPolicy"),
        Some(Kind::NetworkPolicy)
    );
    assert_eq!(Kind::from_type("v1", "NetworkPolicy"), None);
    assert_eq!(Kind::from_type("v1", "Namespace"), Some(Kind::Namespace));
    assert_eq!(Kind::NetworkPolicy.plural(), "networkpolicies");
    assert!(Kind::NetworkPolicy.namespaced() && !Kind::Namespace.namespaced());
}

fn pod_v(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

#[test]
fn all_pods_kept_as_policy_view_local_ones_whole() {
    let mut m = ClusterModel::default();
    let here = pod_v(json!({
        "metadata": {"name": "a", "namespace": "x", "uid": "u-a", "labels": {"pod": "a"},
            "annotations": {"big": "annotation"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "ports": [
            {"name": "http", "containerPort": 80},
            {"containerPort": 81},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "bad", "containerPort": 70000}]}]},
        "status": {"phase": "Running", "podIP": "10.2.1.5",
            "podIPs": [{"ip": "10.2.1.5"}, {"ip": "fd00::5"}, {"ip": "10.2.1.5"}]}
    }));
    let there = pod_v(json!({
        "metadata": {"name": "b", "namespace": "x", "uid": "u-b", "labels": {"pod": "b"},
            "annotations": {"big": "annotation"}},
        "spec": {"nodeName": "n2", "hostNetwork": false, "containers": [{"name": "c", "image": "i",
            "env": [{"name": "A", "value": "B"}], "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": "10.2.2.7", "hostIP": "192.168.0.2"}
    }));
    for p in [&here, &there] {
        m.upsert(Object::Pod(p.clone()).slim("n1"), "n1");
    }
    assert_eq!(m.count(Kind::Pod), 2);
    assert_eq!(
        m.local_pods.keys().cloned().collect::<Vec<_>>(),
        [("x".to_string(), "a".to_string())]
    );
    // The local pod is whole (but without managedFields), the other one is stripped.
    let local = &m.local_pods[&("x".into(), "a".into())];
    assert!(local.metadata.annotations.is_some());
    assert!(local.metadata.managed_fields.is_none());
    let a = &m.pods[&("x".into(), "a".into())];
    assert_eq!(a.ips, ["10.2.1.5".parse::<std::net::Ipv4Addr>().unwrap()]);
    assert_eq!(a.node_name.as_deref(), Some("n1"));
    assert_eq!(a.labels.get("pod").map(String::as_str), Some("a"));
    assert_eq!(
        *a.named_ports,
        [
            NamedPort {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into()
            },
            NamedPort {
                name: "dns".into(),
                port: 53,
                protocol: "UDP".into()
            }
        ]
    );
    assert!(!a.host_network && !a.terminated);
    // Pods with the same labels and ports share one copy of them.
    let twin = PodInfo::from_pod(&here);
    assert!(std::sync::Arc::ptr_eq(&twin.labels, &a.labels));
    assert!(std::sync::Arc::ptr_eq(&twin.named_ports, &a.named_ports));
    // Stripping keeps exactly the policy view.
    let stripped = match Object::Pod(there.clone()).slim("n1") {
        Object::Pod(p) => p,
        _ => unreachable!(),
    };
    assert!(stripped.metadata.annotations.is_none());
    assert!(stripped.status.as_ref().unwrap().host_ip.is_none());
    assert_eq!(PodInfo::from_pod(&stripped), PodInfo::from_pod(&there));

    // A pod moving off this node leaves local_pods but stays in pods; deletion removes both.
    let mut moved = here.clone();
    moved.spec.as_mut().unwrap().node_name = Some("n3".into());
    m.upsert(Object::Pod(moved.clone()), "n1");
    assert!(m.local_pods.is_empty());
    assert_eq!(
        m.pods[&("x".into(), "a".into())].node_name.as_deref(),
        Some("n3")
    );
    m.remove(&Object::Pod(moved));
    assert_eq!(m.pods.len(), 1);

    // A status-only change keeps the shared PodInfo (no new allocation, same content).
    let before = m.pods[&("x".into(), "b".into())].clone();
    let mut status_only = there.clone();
    status_only.status.as_mut().unwrap().host_ip = Some("192.168.0.22".into());
    m.upsert(Object::Pod(status_only), "n1");
    assert!(std::sync::Arc::ptr_eq(
        &before,
        &m.pods[&("x".into(), "b".into())]
    ));

    // Terminated and host-network pods are flagged.
    let done = pod_v(json!({"metadata": {"name": "d", "namespace": "x"},
        "spec": {"hostNetwork": true, "containers": []}, "status": {"phase": "Succeeded"}}));
    let d = PodInfo::from_pod(&done);
    assert!(d.terminated && d.host_network && d.ips.is_empty() && d.node_name.is_none());

    // A relist replaces the kind and keeps unchanged PodInfos shared.
    let b_before = m.pods[&("x".into(), "b".into())].clone();
    m.replace_kind(
        Kind::Pod,
        vec![Object::Pod(there.clone()), Object::Pod(here.clone())],
        "n1",
    );
    assert_eq!(m.pods.len(), 2);
    assert!(std::sync::Arc::ptr_eq(
        &b_before,
        &m.pods[&("x".into(), "b".into())]
    ));
    assert_eq!(m.local_pods.len(), 1);
    m.replace_kind(Kind::Pod, vec![], "n1");
    assert!(m.pods.is_empty() && m.local_pods.is_empty());
}

#[test]
fn namespaces_and_network_policies_in_the_model() {
    let mut m = ClusterModel::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "x",
        "labels": {"ns": "x", "kubernetes.io/metadata.name": "x"}}}))
    .unwrap();
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "deny", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    }))
    .unwrap();
    m.upsert(Object::Namespace(ns.clone()), "n1");
    m.upsert(Object::NetworkPolicy(np.clone()), "n1");
    assert_eq!(m.count(Kind::Namespace), 1);
    assert_eq!(m.count(Kind::NetworkPolicy), 1);
    assert!(
        m.network_policies
            .contains_key(&("x".to_string(), "deny".to_string()))
    );
    let copy = m.clone();
    assert!(copy.same_content(&m));
    let mut ns2 = ns.clone();
    ns2.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "t".into());
    m.upsert(Object::Namespace(ns2), "n1");
    assert!(
        !copy.same_content(&m),
        "a namespace label change is a change"
    );
    m.remove(&Object::NetworkPolicy(np));
    m.remove(&Object::Namespace(ns));
    assert_eq!(m.count(Kind::Namespace) + m.count(Kind::NetworkPolicy), 0);
}

const MULTI: &str = r#"
# a comment
apiVersion: v1
kind: Node
metadata:
  name: n1
spec:
  podCIDR: 10.2.1.0/24
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.1}
  conditions:
  - type: Ready
    status: "True"
---
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, uid: uid-web}
spec:
  nodeName: n1
  containers: [{name: c, image: nginx}]
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: default}
spec: {nodeName: n2, containers: []}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
spec: {selector: {}, template: {}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
data: {a: b}
"#;

fn parse(name: &str, text: &str) -> Result<Vec<Object>, String> {
    parse_manifest(Path::new(name), text.as_bytes())
}

fn names(objs: &[Object]) -> Vec<String> {
    objs.iter()
        .map(|o| format!("{}:{}", o.kind().kind(), o.display_name()))
        .collect()
}

#[test]
fn parses_multi_document_yaml_and_ignores_other_kinds() {
    let objs = parse("a.yaml", MULTI).unwrap();
    assert_eq!(
        names(&objs),
        ["Node:n1", "Pod:default/web", "Pod:default/elsewhere"]
    );
    let Object::Node(n) = &objs[0] else { panic!() };
    let v = NodeView::from_node(n);
    assert_eq!(v.pod_cidrs, vec!["10.2.1.0/24".parse().unwrap()]);
    assert_eq!(v.internal_ip, Some("192.168.0.1".parse().unwrap()));
    assert!(v.ready);
}

#[test]
fn parses_lists_and_json() {
    let list = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1}}
- {apiVersion: v1, kind: Service, metadata: {name: s}}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: ns}
  spec: {nodeName: n1, containers: []}
"#;
    assert_eq!(
        names(&parse("l.yml", list).unwrap()),
        ["Node:n1", "Pod:ns/p"]
    );
    // A pod without a namespace is in "default", as kubectl applies it.
    let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\nspec: {containers: []}\n";
    assert_eq!(names(&parse("p.yaml", bare).unwrap()), ["Pod:default/bare"]);
    // A typed list whose items omit apiVersion/kind, as `kubectl get nodes -o json` writes.
    let node_list = json!({
        "apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "7"},
        "items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    });
    assert_eq!(
        names(&parse("nodes.json", &node_list.to_string()).unwrap()),
        ["Node:a", "Node:b"]
    );
    let single = node_json("j").to_string();
    assert_eq!(names(&parse("n.json", &single).unwrap()), ["Node:j"]);
    // JSON is YAML too.
    assert_eq!(names(&parse("n.yaml", &single).unwrap()), ["Node:j"]);
    assert!(parse("empty.yaml", "").unwrap().is_empty());
}

const POLICY_KINDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {ns: x, kubernetes.io/metadata.name: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: ["y"]}]  # a bare y is a YAML 1.1 boolean
    ports: [{port: 80, endPort: 81}, {port: serve-80-udp, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: defaulted}
spec: {podSelector: {}}
---
apiVersion: extensions/v1beta1
kind: NetworkPolicy
metadata: {name: ignored-old-api}
spec: {podSelector: {}}
"#;

#[test]
fn parses_namespaces_and_network_policies() {
    let objs = parse("policy.yaml", POLICY_KINDS).unwrap();
    assert_eq!(
        names(&objs),
        [
            "Namespace:x",
            "NetworkPolicy:x/allow-from-y",
            "NetworkPolicy:default/defaulted"
        ]
    );
    let Object::NetworkPolicy(np) = &objs[1] else {
        panic!()
    };
    let spec = np.spec.as_ref().unwrap();
    let ports = spec.ingress.as_ref().unwrap()[0].ports.as_ref().unwrap();
    assert_eq!(ports[0].end_port, Some(81));
    // A NetworkPolicy with a field of the wrong type fails its file.
    let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\nspec: {podSelector: 3}\n";
    assert!(parse("bad.yaml", bad).is_err());
}

#[test]
fn broken_manifests_are_errors() {
    for (name, text) in [
        (
            "bad.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: [unclosed\n",
        ),
        ("bad.json", "{\"apiVersion\": \"v1\","),
        ("nokind.yaml", "apiVersion: v1\nmetadata: {name: x}\n"),
        ("noname.yaml", "apiVersion: v1\nkind: Node\nmetadata: {}\n"),
        ("scalar.yaml", "just a string\n"),
        // A watched kind whose fields have the wrong type.
        (
            "typed.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: x}\nspec: {podCIDRs: 5}\n",
        ),
        (
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Node, metadata: {name: 1x}, spec: 3}]\n",
        ),
    ] {
        let r = parse(name, text);
        assert!(r.is_err(), "{name}: {r:?}");
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    // Written as a generator would: temp file, then rename over the target.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn manifest_source_reads_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", MULTI);
    write(dir.path(), "b.json", &node_json("n3").to_string());
    write(dir.path(), "broken.yaml", "kind: [\n");
    write(
        dir.path(),
        "notes.txt",
        "apiVersion: v1\nkind: Node\nmetadata: {name: txt}\n",
    );
    write(dir.path(), ".hidden.yaml", &node_json("hidden").to_string());
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    let (_src, model) = ManifestSource::open(dir.path(), "n1").unwrap();
    assert!(model.synced);
    assert_eq!(model.revision, 1);
    assert_eq!(model.nodes.keys().collect::<Vec<_>>(), ["n1", "n3"]);
    assert_eq!(
        model.local_pods.keys().cloned().collect::<Vec<_>>(),
        [("default".to_string(), "web".to_string())]
    );
    assert!(model.local_pod_by_uid("uid-web").is_some());

    let missing = dir.path().join("nope");
    assert!(ManifestSource::open(&missing, "n1").is_err());
    assert!(ManifestSource::open(&dir.path().join("b.json"), "n1").is_err());
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<ClusterModel>>,
    what: &str,
    pred: impl Fn(&ClusterModel) -> bool,
) -> std::sync::Arc<ClusterModel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let cur = rx.borrow_and_update().clone();
        if pred(&cur) {
            return cur;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; model: {cur:#?}");
        }
    }
}

fn cidrs(m: &ClusterModel, name: &str) -> Vec<String> {
    m.node_view(name)
        .map(|v| v.pod_cidrs.iter().map(|c| c.to_string()).collect())
        .unwrap_or_default()
}

fn node_yaml(name: &str, cidr: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n")
}

#[tokio::test]
async fn manifest_watcher_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let args = SourceArgs {
        source: SourceKind::Manifests,
        manifests: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let mut rx = start(&args, "n1").await.unwrap();
    let m0 = rx.borrow_and_update().clone();
    assert!(m0.synced && m0.nodes.is_empty());

    // Add a node file: the model shows it within a second (the timing is logged, not asserted,
    // so a loaded machine does not fail the test).
    let t = Instant::now();
    std::fs::write(dir.path().join("n1.yaml"), node_yaml("n1", "10.2.1.0/24")).unwrap();
    let m1 = wait_for(&mut rx, "n1 added", |m| m.nodes.contains_key("n1")).await;
    eprintln!("added node seen after {:?}", t.elapsed());
    assert!(m1.revision > m0.revision);
    assert_eq!(cidrs(&m1, "n1"), ["10.2.1.0/24"]);

    // Modify in place, then by atomic rename.
    std::fs::write(dir.path().join("n1.yaml"), node_yaml("n1", "10.2.2.0/24")).unwrap();
    wait_for(&mut rx, "n1 modified", |m| {
        cidrs(m, "n1") == ["10.2.2.0/24"]
    })
    .await;
    write(dir.path(), "n1.yaml", &node_yaml("n1", "10.2.3.0/24"));
    wait_for(&mut rx, "n1 renamed over", |m| {
        cidrs(m, "n1") == ["10.2.3.0/24"]
    })
    .await;

    // A second file, and a broken file that changes nothing.
    write(dir.path(), "n2.yaml", &node_yaml("n2", "10.2.4.0/24"));
    let m2 = wait_for(&mut rx, "n2", |m| m.nodes.len() == 2).await;
    write(dir.path(), "zz-broken.yaml", "kind: [\n");
    // Breaking a file that parsed before keeps its previous content.
    std::fs::write(
        dir.path().join("n2.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: [\n",
    )
    .unwrap();
    // A marker change proves the broken writes were processed.
    write(dir.path(), "n3.yaml", &node_yaml("n3", "10.2.5.0/24"));
    let m3 = wait_for(&mut rx, "n3", |m| m.nodes.contains_key("n3")).await;
    assert_eq!(cidrs(&m3, "n2"), ["10.2.4.0/24"]);
    assert!(m3.revision > m2.revision);

    // Delete: the objects go.
    std::fs::remove_file(dir.path().join("n1.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("n2.yaml")).unwrap();
    let m4 = wait_for(&mut rx, "n1, n2 deleted", |m| {
        !m.nodes.contains_key("n1") && !m.nodes.contains_key("n2")
    })
    .await;
    assert_eq!(m4.nodes.keys().collect::<Vec<_>>(), ["n3"]);

    // Pods: only this node's.
    write(
        dir.path(),
        "pods.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {nodeName: n1, containers: []}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\nspec: {nodeName: n3, containers: []}\n",
    );
    let m5 = wait_for(&mut rx, "local pod", |m| !m.local_pods.is_empty()).await;
    assert_eq!(
        m5.local_pods.keys().cloned().collect::<Vec<_>>(),
        [("x".to_string(), "a".to_string())]
    );
    // ... while every pod is in the policy view.
    assert_eq!(m5.pods.len(), 2);

    // Namespaces and NetworkPolicies come and go with their file.
    write(dir.path(), "policy.yaml", POLICY_KINDS);
    let m6 = wait_for(&mut rx, "policies", |m| m.network_policies.len() == 2).await;
    assert!(m6.namespaces.contains_key("x"));
    std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
    wait_for(&mut rx, "policies gone", |m| {
        m.network_policies.is_empty() && m.namespaces.is_empty()
    })
    .await;
}

#[tokio::test]
async fn manifest_directory_swapped_by_rename() {
    // A symlink swapped atomically to a new directory (as ConfigMap volumes and deploy tools do).
    let root = tempfile::tempdir().unwrap();
    let v1 = root.path().join("v1");
    let v2 = root.path().join("v2");
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("n.yaml"), node_yaml("old", "10.2.1.0/24")).unwrap();
    std::fs::write(v2.join("n.yaml"), node_yaml("new", "10.2.2.0/24")).unwrap();
    let link = root.path().join("manifests");
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let args = SourceArgs {
        source: SourceKind::Manifests,
        manifests: Some(link.clone()),
        ..Default::default()
    };
    let mut rx = start(&args, "n1").await.unwrap();
    assert!(rx.borrow_and_update().nodes.contains_key("old"));
    let tmp = root.path().join(".manifests.tmp");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    wait_for(&mut rx, "swapped directory", |m| {
        m.nodes.contains_key("new") && !m.nodes.contains_key("old")
    })
    .await;
    // Changes inside the new directory are seen too.
    std::fs::write(v2.join("m.yaml"), node_yaml("more", "10.2.3.0/24")).unwrap();
    wait_for(&mut rx, "file in the new directory", |m| {
        m.nodes.contains_key("more")
    })
    .await;
}

#[tokio::test]
async fn none_and_error_sources() {
    let args = SourceArgs {
        source: SourceKind::None,
        ..Default::default()
    };
    let rx = start(&args, "n1").await.unwrap();
    let m = rx.borrow().clone();
    assert!(m.synced && m.nodes.is_empty() && m.local_pods.is_empty());
    assert!(!rx.has_changed().unwrap(), "the channel stays open");

    let missing = SourceArgs {
        source: SourceKind::Manifests,
        manifests: Some("/nonexistent/berth-manifests".into()),
        ..Default::default()
    };
    assert!(start(&missing, "n1").await.is_err());
    let no_dir = SourceArgs {
        source: SourceKind::Manifests,
        ..Default::default()
    };
    assert!(start(&no_dir, "n1").await.is_err());

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kubeconfig");
    std::fs::write(&bad, "this: [is not a kubeconfig\n").unwrap();
    let bad_kube = SourceArgs {
        source: SourceKind::Kubernetes,
        kubeconfig: Some(bad),
        ..Default::default()
    };
    assert!(start(&bad_kube, "n1").await.is_err());
    let missing_kube = SourceArgs {
        kubeconfig: Some(dir.path().join("absent")),
        ..Default::default()
    };
    assert_eq!(missing_kube.resolved(), SourceKind::Kubernetes);
    assert!(start(&missing_kube, "n1").await.is_err());
}

#[test]
fn source_args_from_the_command_line() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        source: SourceArgs,
    }
    let cli = Cli::try_parse_from(["x", "--source", "manifests", "--manifests", "/m"]).unwrap();
    assert_eq!(cli.source.source, SourceKind::Manifests);
    assert_eq!(cli.source.manifests.as_deref(), Some(Path::new("/m")));
    let cli = Cli::try_parse_from(["x", "--kubeconfig", "/k", "--manifests", "/m"]).unwrap();
    assert_eq!(cli.source.resolved(), SourceKind::Kubernetes);
    assert!(Cli::try_parse_from(["x", "--source", "etcd"]).is_err());
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let args = SourceArgs {
            manifests: Some("/m".into()),
            ..Default::default()
        };
        assert_eq!(args.resolved(), SourceKind::Manifests);
        assert_eq!(SourceArgs::default().resolved(), SourceKind::None);
    }
}
