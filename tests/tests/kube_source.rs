//! The agent's Kubernetes state source (`berth_agent::cluster`, kube-rs) against the test API
//! server (`berth_tests::apiserver`): initial list, watch events, a Node re-created under the
//! same name, `410 Gone` in both forms, API server restarts, bookmarks, a burst of 1000 nodes.
//! No root needed. Every wait polls the model with a deadline; nothing asserts on timing.
use berth_agent::cluster::{self, ClusterModel, SourceArgs, SourceKind};
use berth_tests::apiserver::ApiServer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const NODE: &str = "n1";
const DEADLINE: Duration = Duration::from_secs(20);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "berth_agent=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn node(name: &str, cidrs: &[&str], ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {
            "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

fn pod(ns: &str, name: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
        "spec": spec})
}

struct Env {
    server: ApiServer,
    rx: watch::Receiver<Arc<ClusterModel>>,
    _dir: tempfile::TempDir,
}

/// Starts a server seeded by `seed`, then the agent's source against it, and waits for sync.
async fn setup(seed: impl FnOnce(&ApiServer)) -> Env {
    init_logs();
    let server = ApiServer::start().await;
    seed(&server);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let args = SourceArgs {
        source: SourceKind::Auto,
        kubeconfig: Some(kubeconfig),
        manifests: None,
    };
    assert_eq!(args.resolved(), SourceKind::Kubernetes);
    let rx = cluster::start(&args, NODE).await.unwrap();
    let mut env = Env {
        server,
        rx,
        _dir: dir,
    };
    env.wait("initial sync", |m| m.synced).await;
    env
}

impl Env {
    async fn wait(
        &mut self,
        what: &str,
        pred: impl Fn(&ClusterModel) -> bool,
    ) -> Arc<ClusterModel> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let cur = self.rx.borrow_and_update().clone();
            if pred(&cur) {
                return cur;
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("model channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; nodes {:?}, local pods {:?}, synced {}",
                    cur.node_views(),
                    cur.local_pods.keys().collect::<Vec<_>>(),
                    cur.synced
                ),
            }
        }
    }

    /// Polls a server-side condition (counters, open watches).
    async fn wait_server(&self, what: &str, pred: impl Fn(&ApiServer) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !pred(&self.server) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the source watches both kinds again (after a (re)connect).
    async fn wait_watching(&self) {
        self.wait_server("open watches of nodes and pods", |s| {
            s.open_watches("nodes") >= 1 && s.open_watches("pods") >= 1
        })
        .await;
    }
}

fn cidrs(m: &ClusterModel, name: &str) -> Vec<String> {
    m.node_view(name)
        .map(|v| v.pod_cidrs.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

fn pod_names(m: &ClusterModel) -> Vec<String> {
    m.local_pods
        .keys()
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect()
}

fn seed_basic(s: &ApiServer) {
    s.apply(node(
        NODE,
        &["10.2.1.0/24", "fd00:1::/64"],
        "192.168.10.1",
        true,
    ));
    s.apply(node("n2", &["10.2.2.0/24"], "192.168.10.2", false));
    s.apply(pod("default", "web", Some(NODE)));
    s.apply(pod("kube-system", "dns", Some(NODE)));
    s.apply(pod("default", "other-node", Some("n2")));
    s.apply(pod("default", "pending", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_and_watch_events() {
    let mut env = setup(seed_basic).await;
    let m = env.rx.borrow().clone();
    // Initial list: every node with its routing view, only this node's pods.
    let v1 = m.node_view(NODE).unwrap();
    assert_eq!(
        v1.pod_cidrs,
        vec!["10.2.1.0/24".parse::<ipnet::Ipv4Net>().unwrap()]
    );
    assert_eq!(v1.internal_ip, Some("192.168.10.1".parse().unwrap()));
    assert!(v1.ready);
    let v2 = m.node_view("n2").unwrap();
    assert_eq!(cidrs(&m, "n2"), ["10.2.2.0/24"]);
    assert!(!v2.ready);
    assert_eq!(m.node_views().len(), 2);
    assert_eq!(pod_names(&m), ["default/web", "kube-system/dns"]);
    assert!(m.local_pod_by_uid("uid-default-web").is_some());
    assert!(m.local_pod_by_uid("uid-default-other-node").is_none());
    assert_eq!(env.server.list_count("nodes"), 1);
    assert_eq!(env.server.list_count("pods"), 1);
    let r0 = m.revision;

    // ADDED, MODIFIED, DELETED.
    env.server
        .apply(node("n3", &["10.2.3.0/24"], "192.168.10.3", true));
    env.wait("n3 added", |m| cidrs(m, "n3") == ["10.2.3.0/24"])
        .await;
    env.server
        .apply(node("n2", &["10.2.2.0/24"], "192.168.10.2", true));
    env.wait("n2 ready", |m| m.node_view("n2").is_some_and(|v| v.ready))
        .await;
    env.server.apply(pod("default", "web2", Some(NODE)));
    env.server.apply(pod("default", "elsewhere", Some("n2")));
    env.server.delete("Pod", Some("kube-system"), "dns");
    let m = env
        .wait("pods changed", |m| {
            pod_names(m) == ["default/web", "default/web2"]
        })
        .await;
    assert!(m.revision > r0);

    // A pod bound to this node after creation enters the field-selected watch as ADDED.
    env.server.apply(pod("default", "pending", Some(NODE)));
    env.wait("pending pod bound here", |m| {
        m.local_pods
            .contains_key(&("default".into(), "pending".into()))
    })
    .await;

    // A node deleted and re-created under the same name with another pod CIDR.
    env.server.delete("Node", None, "n3");
    env.wait("n3 deleted", |m| !m.nodes.contains_key("n3"))
        .await;
    env.server
        .apply(node("n3", &["10.2.33.0/24"], "192.168.10.33", true));
    let m = env
        .wait("n3 re-created", |m| cidrs(m, "n3") == ["10.2.33.0/24"])
        .await;
    assert_eq!(
        m.node_view("n3").unwrap().internal_ip,
        Some("192.168.10.33".parse().unwrap())
    );
    // Delete + re-create in one burst converges too.
    env.server.delete("Node", None, "n3");
    env.server
        .apply(node("n3", &["10.2.34.0/24"], "192.168.10.34", true));
    env.wait("n3 re-created at once", |m| {
        cidrs(m, "n3") == ["10.2.34.0/24"]
    })
    .await;
    // Deleting this node's own Node object.
    env.server.delete("Node", None, NODE);
    env.wait("n1 deleted", |m| m.node_view(NODE).is_none())
        .await;
    // No relist was needed for any of it.
    assert_eq!(env.server.list_count("nodes"), 1);
    assert_eq!(env.server.list_count("pods"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_event_relists() {
    let mut env = setup(seed_basic).await;
    env.wait_watching().await;
    let lists = env.server.list_count("nodes");

    // The watch cache falls behind: open watches get an ERROR 410 Expired event; a change made
    // right after is not replayable from history.
    env.server.expire_history();
    env.server
        .apply(node("n5", &["10.2.5.0/24"], "192.168.10.5", true));
    env.server.delete("Pod", Some("default"), "web");
    env.wait_server("a relist of nodes", |s| s.list_count("nodes") > lists)
        .await;
    env.wait("model after relist", |m| {
        cidrs(m, "n5") == ["10.2.5.0/24"] && pod_names(m) == ["kube-system/dns"]
    })
    .await;

    // Changes made while the source was disconnected AND the history expired: the resumed watch
    // gets 410 (an ERROR event in the stream), the source relists and converges.
    env.wait_watching().await;
    let lists = env.server.list_count("nodes");
    let pod_lists = env.server.list_count("pods");
    env.server.stop().await;
    env.server
        .apply(node("n2", &["10.2.22.0/24"], "192.168.10.2", true));
    env.server.delete("Node", None, "n5");
    env.server.apply(pod("default", "new", Some(NODE)));
    env.server.expire_history();
    env.server.resume().await;
    env.wait("model after disconnected changes", |m| {
        cidrs(m, "n2") == ["10.2.22.0/24"]
            && !m.nodes.contains_key("n5")
            && pod_names(m) == ["default/new", "kube-system/dns"]
    })
    .await;
    assert!(env.server.list_count("nodes") > lists);
    assert!(env.server.list_count("pods") > pod_lists);

    // Events flow again after the relist.
    env.server
        .apply(node("n6", &["10.2.6.0/24"], "192.168.10.6", true));
    env.wait("n6 after relist", |m| m.nodes.contains_key("n6"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_http_status_relists() {
    // Some servers (and proxies) refuse the watch itself with HTTP 410; kube-rs alone would retry
    // the same resourceVersion forever. The source must relist.
    let mut env = setup(seed_basic).await;
    env.wait_watching().await;
    env.server.set_gone_as_http(true);
    let lists = env.server.list_count("nodes");
    env.server.stop().await;
    env.server
        .apply(node("n7", &["10.2.7.0/24"], "192.168.10.7", true));
    env.server.delete("Pod", Some("default"), "web");
    env.server.expire_history();
    env.server.resume().await;
    env.wait("model after HTTP 410", |m| {
        m.nodes.contains_key("n7") && pod_names(m) == ["kube-system/dns"]
    })
    .await;
    assert!(env.server.list_count("nodes") > lists);
    env.server.apply(pod("default", "after", Some(NODE)));
    env.wait("events after the relist", |m| {
        m.local_pods
            .contains_key(&("default".into(), "after".into()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restart_reconnects() {
    let mut env = setup(seed_basic).await;
    env.wait_watching().await;
    let watches = env.server.watch_count("nodes");

    // A restart drops every connection; the source reconnects and resumes from its version.
    env.server.restart().await;
    env.server
        .apply(node("n8", &["10.2.8.0/24"], "192.168.10.8", true));
    env.wait("n8 after restart", |m| m.nodes.contains_key("n8"))
        .await;
    assert!(env.server.watch_count("nodes") > watches);

    // Down for a while, with changes meanwhile (history kept: replayed on reconnect).
    env.wait_watching().await;
    env.server.stop().await;
    env.server.delete("Node", None, "n8");
    env.server
        .apply(node("n2", &["10.2.2.0/24"], "192.168.10.2", true));
    env.server.apply(pod("default", "while-down", Some(NODE)));
    tokio::time::sleep(Duration::from_millis(1500)).await; // let reconnects fail and back off
    env.server.resume().await;
    env.wait("converged after downtime", |m| {
        !m.nodes.contains_key("n8")
            && m.node_view("n2").is_some_and(|v| v.ready)
            && m.local_pods
                .contains_key(&("default".into(), "while-down".into()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_are_harmless() {
    let mut env = setup(seed_basic).await;
    env.wait_watching().await;
    let lists = (
        env.server.list_count("nodes"),
        env.server.list_count("pods"),
    );
    let r0 = env.rx.borrow().revision;
    for _ in 0..3 {
        assert!(
            env.server.bookmark() >= 2,
            "both watches asked for bookmarks"
        );
    }
    // Unrelated changes (other nodes' pods) move the version on; bookmarks carry it.
    env.server.apply(pod("default", "far-away", Some("n2")));
    assert!(env.server.bookmark() >= 2);
    env.server
        .apply(node("n9", &["10.2.9.0/24"], "192.168.10.9", true));
    env.wait("n9 after bookmarks", |m| m.nodes.contains_key("n9"))
        .await;
    // A resumed watch starts from the bookmarked version (nothing replayed twice, nothing lost).
    env.server.restart().await;
    env.server.apply(pod("default", "after-bm", Some(NODE)));
    let m = env
        .wait("pod after restart", |m| {
            m.local_pods
                .contains_key(&("default".into(), "after-bm".into()))
        })
        .await;
    assert!(m.revision > r0);
    assert!(
        !m.local_pods
            .contains_key(&("default".into(), "far-away".into()))
    );
    assert_eq!(
        (
            env.server.list_count("nodes"),
            env.server.list_count("pods")
        ),
        lists,
        "bookmarks and a reconnect within history cause no relist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_nodes_cost_few_publications() {
    let mut env = setup(seed_basic).await;
    env.wait_watching().await;
    let r0 = env.rx.borrow().revision;
    for i in 0..1000u32 {
        let name = format!("burst-{i:04}");
        let cidr = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
        env.server
            .apply(node(&name, &[&cidr], "192.168.20.1", true));
    }
    let m = env.wait("1000 nodes", |m| m.nodes.len() == 1002).await;
    let publications = m.revision - r0;
    eprintln!("1000 node ADDED events -> {publications} publications");
    // Coalescing: far fewer publications than events (the exact number depends on scheduling).
    assert!(publications < 500, "{publications} publications");
    assert_eq!(cidrs(&m, "burst-0999"), ["10.103.231.0/24"]);
}

/// The test server itself, spoken to with a plain HTTP/1.1 client: list format, field-selected
/// watch transitions, bookmarks, both forms of 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_apiserver_protocol() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    async fn get(
        server: &ApiServer,
        path_and_query: &str,
    ) -> (hyper::StatusCode, hyper::body::Incoming) {
        let stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path_and_query)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        (resp.status(), resp.into_body())
    }
    async fn body_json(body: hyper::body::Incoming) -> Value {
        serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap()
    }
    /// Reads the next complete JSON line of a watch stream.
    async fn next_event(body: &mut hyper::body::Incoming, buf: &mut Vec<u8>) -> Value {
        loop {
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let frame = tokio::time::timeout(DEADLINE, body.frame())
                .await
                .expect("watch event")
                .expect("stream open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
        }
    }

    let server = ApiServer::start().await;
    seed_basic(&server);
    let (code, body) = get(&server, "/api/v1/nodes?limit=500").await;
    assert_eq!(code, 200);
    let list = body_json(body).await;
    assert_eq!(list["kind"], "NodeList");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(rv, server.resource_version().to_string());
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(list["items"][0].get("kind").is_none());

    let (_, body) = get(&server, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1").await;
    let pods = body_json(body).await;
    let names: Vec<_> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "dns"]);
    let (_, body) = get(&server, "/api/v1/namespaces/kube-system/pods").await;
    assert_eq!(body_json(body).await["items"].as_array().unwrap().len(), 1);

    // A field-selected watch: binding a pod here is ADDED, a pod of another node is unseen,
    // deleting is DELETED; bookmarks carry the version.
    let (code, mut body) = get(
        &server,
        &format!(
            "/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true\
             &fieldSelector=spec.nodeName%3Dn1&timeoutSeconds=60"
        ),
    )
    .await;
    assert_eq!(code, 200);
    let mut buf = Vec::new();
    server.apply(pod("default", "pending", Some(NODE)));
    server.apply(pod("default", "far", Some("n2")));
    server.delete("Pod", Some("default"), "web");
    server.bookmark();
    let e = next_event(&mut body, &mut buf).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("pending"))
    );
    let e = next_event(&mut body, &mut buf).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("web"))
    );
    let e = next_event(&mut body, &mut buf).await;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    // Replay from history: a new watch from the old version sees the same events.
    let (_, mut replay) = get(
        &server,
        &format!("/api/v1/pods?watch=1&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dn1"),
    )
    .await;
    let mut rbuf = Vec::new();
    assert_eq!(next_event(&mut replay, &mut rbuf).await["type"], "ADDED");
    assert_eq!(next_event(&mut replay, &mut rbuf).await["type"], "DELETED");

    // Expiry: open watches get ERROR 410 and end; a new watch from the old version gets the
    // ERROR event, or HTTP 410 when so configured.
    server.expire_history();
    let e = next_event(&mut body, &mut buf).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(body.frame().await.is_none(), "the expired watch ends");
    let (code, mut body) = get(
        &server,
        &format!("/api/v1/nodes?watch=1&resourceVersion={rv}"),
    )
    .await;
    assert_eq!(code, 200);
    let e = next_event(&mut body, &mut Vec::new()).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
    server.set_gone_as_http(true);
    let (code, body) = get(
        &server,
        &format!("/api/v1/nodes?watch=1&resourceVersion={rv}"),
    )
    .await;
    assert_eq!(code, 410);
    assert_eq!(body_json(body).await["reason"], "Expired");
    assert!(server.list_count("nodes") >= 1 && server.watch_count("nodes") >= 2);
    let (code, _) = get(&server, "/version").await;
    assert_eq!(code, 200);
}
