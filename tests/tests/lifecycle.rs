//! Node registration and lifecycle under shortened timers: a control plane (tunnel server, node
//! API, lifecycle controller) and real tunnel agents talking gRPC over loopback; the test plays
//! the cloud (it fulfils the controller's provisioning requests by starting, restarting and
//! stopping agents). Every test runs twice: on the in-memory store and on a real etcd (Debian's
//! etcd-server, one member per test on ports it picks). Privileged suite: requires root like the
//! other end-to-end tests.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use berth_controlplane::{
    lifecycle::{
        NodeState, Plan, ProvisionRecord, ProvisionRequest, Strategy, UpgradeRequest,
        machine::{Pdb, Pod},
        registry::RegistryStatus,
    },
    serve::{Running, ServeArgs, start},
};
use berth_tests::{
    etcd::Etcd,
    netns::{require_root, unique_name},
    tunnel::{AgentGuard, TOKEN, TestDisk, agent_args, token_file},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A kubelet healthz stub whose answer the test flips.
async fn healthz(healthy: Arc<AtomicBool>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ok = healthy.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let resp: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(resp).await;
            });
        }
    });
    addr
}

/// Where the registry lives.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Etcd,
}

/// Runs each listed test on both stores (`<test>::in_memory`, `<test>::etcd`).
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_memory() {
                super::$name(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name(super::Backend::Etcd).await
            }
        }
    )*};
}

on_both_stores!(
    registration_lost_heartbeats_and_free_plan_reinstall_in_place,
    standard_plan_autoheal_replaces_the_node,
    failing_condition_marks_not_ready_and_recovers,
    drain_respects_the_pdb_then_forces_after_the_timeout,
    drain_with_a_pdb_evicts_one_pod_at_a_time,
    in_place_upgrade_strictly_one_node_at_a_time,
    rolling_upgrade_with_max_surge_and_max_unavailable,
);

struct Cluster {
    running: Option<Running>,
    prov: mpsc::UnboundedReceiver<ProvisionRecord>,
    dir: tempfile::TempDir,
    token: PathBuf,
    agents: HashMap<String, AgentGuard>,
    healthz: SocketAddr,
    healthy: Arc<AtomicBool>,
    handled: Vec<ProvisionRequest>,
    /// The filesystem every node's DiskPressure probe looks at (the test controls its fill).
    disk: TestDisk,
    /// The registry's etcd (dropped after the control plane).
    _etcd: Option<Etcd>,
}

impl Cluster {
    async fn new(backend: Backend, plan: Plan, autoheal_ms: u64, drain_timeout_ms: u64) -> Self {
        require_root();
        let (mut args, tokens) = ServeArgs::local(TOKEN);
        let etcd = match backend {
            Backend::Memory => None,
            Backend::Etcd => {
                let e = Etcd::start(1);
                args.etcd_endpoints = e.endpoints();
                args.etcd_prefix = format!("/berth/{}", unique_name("lc"));
                Some(e)
            }
        };
        args.plan = plan;
        args.heartbeat_interval_ms = 100;
        args.heartbeat_grace_ms = 2_000;
        args.autoheal_after_ms = autoheal_ms;
        args.drain_timeout_ms = drain_timeout_ms;
        args.pod_start_ms = 200;
        args.tick_ms = 50;
        let (running, prov) = start(&args, tokens).await.expect("control plane");
        assert!(
            running.registry.wait_loaded(LIMIT).await,
            "registry loaded from {}",
            running.registry.store().describe()
        );
        let dir = tempfile::tempdir().unwrap();
        let token = token_file(dir.path(), TOKEN);
        let healthy = Arc::new(AtomicBool::new(true));
        let healthz = healthz(healthy.clone()).await;
        Cluster {
            running: Some(running),
            prov,
            dir,
            token,
            agents: HashMap::new(),
            healthz,
            healthy,
            handled: Vec::new(),
            disk: TestDisk::mount(8),
            _etcd: etcd,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    fn status(&self) -> RegistryStatus {
        self.running().registry.status()
    }

    fn state_file(&self, instance: &str) -> PathBuf {
        self.dir.path().join(instance).join("node.json")
    }

    fn start_node(&mut self, name: &str, instance: &str, pool: &str, version: &str) {
        let ndir = self.dir.path().join(instance);
        std::fs::create_dir_all(&ndir).unwrap();
        let mut args = agent_args(
            vec![self.running().agent_addr.to_string()],
            &self.token,
            &ndir,
            vec![],
        );
        args.node_ip = None;
        args.node_instance_id = Some(instance.into());
        args.node_pool = pool.into();
        args.node_version = version.into();
        args.node_heartbeat_ms = None; // the control plane's hint (100 ms)
        args.node_kubelet_healthz = self.healthz.to_string();
        args.node_disk_path = self.disk.path().to_path_buf();
        args.node_disk_min_free_percent = 10.0;
        args.node_taints = vec!["dedicated=batch:NoSchedule".into()];
        args.node_upgrade_hook = Some(format!(
            "echo \"$BERTH_VERSION\" >> {}/upgrades",
            ndir.display()
        ));
        let g = AgentGuard::start(&tokio::runtime::Handle::current(), args, name);
        self.agents.insert(instance.into(), g);
    }

    async fn stop_node(&mut self, instance: &str) {
        if let Some(a) = self.agents.remove(instance) {
            a.stop().await;
        }
    }

    /// Plays the cloud for pending provisioning requests.
    async fn pump(&mut self) {
        while let Ok(rec) = self.prov.try_recv() {
            let req = rec.request;
            match &req {
                ProvisionRequest::Reinstall {
                    instance_id,
                    node_name,
                } => {
                    // Same identity comes back after the reinstall.
                    self.stop_node(instance_id).await;
                    let version = self
                        .status()
                        .nodes
                        .iter()
                        .find(|n| n.instance_id == *instance_id)
                        .map(|n| n.version.clone())
                        .unwrap_or_default();
                    let pool = self
                        .status()
                        .nodes
                        .iter()
                        .find(|n| n.instance_id == *instance_id)
                        .map(|n| n.pool.clone())
                        .unwrap_or_default();
                    self.start_node(node_name, instance_id, &pool, &version);
                }
                ProvisionRequest::Delete { instance_id, .. } => self.stop_node(instance_id).await,
                ProvisionRequest::Create {
                    instance_id,
                    node_name,
                    pool,
                    version,
                    ..
                } => self.start_node(node_name, instance_id, pool, version),
            }
            self.handled.push(req);
        }
    }

    /// Waits (pumping provisioning requests) until `f` holds.
    async fn wait(&mut self, what: &str, mut f: impl FnMut(&RegistryStatus) -> bool) {
        let end = tokio::time::Instant::now() + LIMIT;
        loop {
            self.pump().await;
            let s = self.status();
            if f(&s) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for: {what}\nstatus: {}",
                serde_json::to_string_pretty(&s).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        for (_, a) in self.agents.drain() {
            a.stop().await;
        }
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

fn node<'a>(
    s: &'a RegistryStatus,
    instance: &str,
) -> &'a berth_controlplane::lifecycle::registry::NodeStatus {
    s.nodes
        .iter()
        .find(|n| n.instance_id == instance)
        .unwrap_or_else(|| panic!("node {instance} not registered"))
}

fn state_of(s: &RegistryStatus, instance: &str) -> Option<NodeState> {
    s.nodes
        .iter()
        .find(|n| n.instance_id == instance)
        .map(|n| n.state)
}

async fn registration_lost_heartbeats_and_free_plan_reinstall_in_place(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Free, 3_000, 60_000).await;
    c.start_node("node-1", "i-0001", "pool-a", "1.0.0");
    c.wait("node-1 Ready", |s| {
        state_of(s, "i-0001") == Some(NodeState::Ready)
    })
    .await;
    let s = c.status();
    let n = node(&s, "i-0001");
    assert_eq!(
        (n.node_name.as_str(), n.pool.as_str(), n.flavor.as_str()),
        ("node-1", "pool-a", "b3-16")
    );
    assert_eq!(
        (n.reserved_cpu_millis, n.reserved_memory_bytes),
        (170, 1_590_000_000)
    );
    assert_eq!(n.reserved_storage_bytes, 30_000_000_000);
    assert_eq!(n.allocatable_cpu_millis, 3_830);
    assert_eq!(n.labels.get("role").map(String::as_str), Some("worker"));
    assert_eq!(n.taints, vec!["dedicated=batch:NoSchedule".to_string()]);
    assert_eq!(n.conditions.get("KubeletHealthy"), Some(&true));
    // The HTTP status view lists it too.
    let (code, body) = berth_controlplane::status::http_request(
        c.running().status_addr,
        "GET",
        "/v1/status",
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let table = berth_controlplane::status::format_status(&v);
    assert!(
        table.contains("node-1") && table.contains("Ready"),
        "{table}"
    );
    // berthctl node's view on the node side.
    let st = berth_agent::node::read_state(&c.state_file("i-0001")).unwrap();
    assert_eq!(
        st.servers.get("berth-server-1").map(String::as_str),
        Some("Ready")
    );

    // Heartbeats stop (the node dies): NotReady, then the Free plan reinstalls it in place.
    c.stop_node("i-0001").await;
    c.wait("node-1 NotReady", |s| {
        state_of(s, "i-0001") == Some(NodeState::NotReady)
    })
    .await;
    assert!(
        node(&c.status(), "i-0001")
            .reason
            .contains("heartbeats lost")
    );
    c.wait("reinstalled node back Ready", |s| {
        let n = node(s, "i-0001");
        n.reinstalls == 1 && n.state == NodeState::Ready
    })
    .await;
    assert!(c.handled.iter().any(|r| matches!(r,
        ProvisionRequest::Reinstall { instance_id, .. } if instance_id == "i-0001")));
    assert!(!c.handled.iter().any(|r| matches!(
        r,
        ProvisionRequest::Create { .. } | ProvisionRequest::Delete { .. }
    )));
    // Same identity, still one node.
    let s = c.status();
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(node(&s, "i-0001").node_name, "node-1");
    assert!(
        s.events
            .iter()
            .any(|e| e.message.contains("auto-heal: reinstall in place"))
    );
    c.shutdown().await;
}

async fn standard_plan_autoheal_replaces_the_node(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Standard, 3_000, 60_000).await;
    c.start_node("node-1", "i-0001", "pool-s", "1.0.0");
    c.start_node("node-2", "i-0002", "pool-s", "1.0.0");
    c.wait("both Ready", |s| {
        state_of(s, "i-0001") == Some(NodeState::Ready)
            && state_of(s, "i-0002") == Some(NodeState::Ready)
    })
    .await;
    c.stop_node("i-0001").await;
    c.wait("node-1 replaced", |s| {
        state_of(s, "i-0001") == Some(NodeState::Terminated)
            && s.nodes
                .iter()
                .filter(|n| n.state == NodeState::Ready)
                .count()
                == 2
    })
    .await;
    let s = c.status();
    let new: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.instance_id != "i-0001" && n.instance_id != "i-0002")
        .collect();
    assert_eq!(new.len(), 1, "exactly one replacement");
    assert_eq!(
        (new[0].pool.as_str(), new[0].version.as_str()),
        ("pool-s", "1.0.0")
    );
    assert_eq!(node(&s, "i-0001").reinstalls, 0);
    assert!(c.handled.iter().any(
        |r| matches!(r, ProvisionRequest::Delete { instance_id, .. } if instance_id == "i-0001")
    ));
    assert!(
        !c.handled
            .iter()
            .any(|r| matches!(r, ProvisionRequest::Reinstall { .. }))
    );
    assert_eq!(
        state_of(&s, "i-0002"),
        Some(NodeState::Ready),
        "the healthy node is untouched"
    );
    c.shutdown().await;
}

async fn failing_condition_marks_not_ready_and_recovers(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Free, 600_000, 60_000).await;
    c.start_node("node-1", "i-0001", "pool-a", "1.0.0");
    c.wait("Ready", |s| state_of(s, "i-0001") == Some(NodeState::Ready))
        .await;
    c.healthy.store(false, Ordering::Relaxed);
    c.wait("NotReady on kubelet failure", |s| {
        state_of(s, "i-0001") == Some(NodeState::NotReady)
    })
    .await;
    let s = c.status();
    assert!(
        node(&s, "i-0001").reason.contains("KubeletHealthy"),
        "{}",
        node(&s, "i-0001").reason
    );
    assert_eq!(
        node(&s, "i-0001").conditions.get("KubeletHealthy"),
        Some(&false)
    );
    c.healthy.store(true, Ordering::Relaxed);
    c.wait("Ready again", |s| {
        state_of(s, "i-0001") == Some(NodeState::Ready)
    })
    .await;
    // DiskPressure, as kubelet's default eviction threshold: under 10 % free.
    c.disk.fill_until_free_below(0.05);
    c.wait("NotReady on disk pressure", |s| {
        state_of(s, "i-0001") == Some(NodeState::NotReady)
    })
    .await;
    let s = c.status();
    assert!(
        node(&s, "i-0001").reason.contains("DiskPressure"),
        "{}",
        node(&s, "i-0001").reason
    );
    assert_eq!(
        node(&s, "i-0001").conditions.get("DiskPressure"),
        Some(&true)
    );
    c.disk.drain();
    c.wait("Ready after the disk is freed", |s| {
        state_of(s, "i-0001") == Some(NodeState::Ready)
    })
    .await;
    assert!(c.handled.is_empty(), "no auto-heal for a short NotReady");
    c.shutdown().await;
}

fn pod(name: &str, app: &str, node: &str) -> Pod {
    Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        node: Some(node.into()),
        ready: true,
    }
}

fn pdb(app: &str, min_available: Option<u32>, max_unavailable: Option<u32>) -> Pdb {
    Pdb {
        namespace: "default".into(),
        name: app.into(),
        selector: [("app".to_string(), app.to_string())].into(),
        min_available,
        max_unavailable,
    }
}

async fn drain_respects_the_pdb_then_forces_after_the_timeout(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Free, 600_000, 4_000).await;
    c.start_node("node-1", "i-0001", "pool-a", "1.0.0");
    c.start_node("node-2", "i-0002", "pool-a", "1.0.0");
    c.wait("both Ready", |s| {
        s.nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count()
            == 2
    })
    .await;
    let reg = c.running().registry.clone();
    reg.set_pods(vec![
        pod("web-0", "web", "node-1"),
        pod("web-1", "web", "node-1"),
    ])
    .await
    .unwrap();
    reg.set_pdbs(vec![pdb("web", Some(2), None)]).await.unwrap();
    reg.drain("node-1", false).await.unwrap();
    c.wait("drain blocked by the PDB", |s| {
        node(s, "i-0001").draining.as_deref() == Some("blocked by PodDisruptionBudget default/web")
    })
    .await;
    let s = c.status();
    assert_eq!(node(&s, "i-0001").state, NodeState::Draining);
    assert!(
        s.pods.iter().all(|p| p.node.as_deref() == Some("node-1")),
        "nothing evicted yet"
    );
    c.wait("drain forced after the timeout, pods moved", |s| {
        node(s, "i-0001").draining.is_none()
            && s.pods
                .iter()
                .all(|p| p.node.as_deref() == Some("node-2") && p.ready)
    })
    .await;
    let s = c.status();
    assert!(
        s.events
            .iter()
            .any(|e| e.message.contains("forced eviction of 2 pods")),
        "{:?}",
        s.events
    );
    // The node saw cordon and drain.
    c.wait("commands acknowledged", |s| {
        node(s, "i-0001").pending_commands.is_empty()
    })
    .await;
    let st = berth_agent::node::read_state(&c.state_file("i-0001")).unwrap();
    assert!(st.cordoned);
    let kinds: Vec<&str> = st.last_commands.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds, vec!["cordon", "drain"]);
    c.shutdown().await;
}

async fn drain_with_a_pdb_evicts_one_pod_at_a_time(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Free, 600_000, 60_000).await;
    c.start_node("node-1", "i-0001", "pool-a", "1.0.0");
    c.start_node("node-2", "i-0002", "pool-a", "1.0.0");
    c.wait("both Ready", |s| {
        s.nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count()
            == 2
    })
    .await;
    let reg = c.running().registry.clone();
    reg.set_pods(
        (0..4)
            .map(|i| pod(&format!("api-{i}"), "api", "node-1"))
            .collect(),
    )
    .await
    .unwrap();
    reg.set_pdbs(vec![pdb("api", None, Some(1))]).await.unwrap();
    reg.drain("node-1", false).await.unwrap();
    let mut max_unready = 0;
    c.wait("all api pods moved and ready", |s| {
        let unready = s.pods.iter().filter(|p| !p.ready).count();
        max_unready = max_unready.max(unready);
        s.pods
            .iter()
            .all(|p| p.node.as_deref() == Some("node-2") && p.ready)
    })
    .await;
    assert_eq!(max_unready, 1, "the PDB allowed one disruption at a time");
    let s = c.status();
    assert!(!s.events.iter().any(|e| e.message.contains("forced")));
    c.shutdown().await;
}

async fn in_place_upgrade_strictly_one_node_at_a_time(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Free, 600_000, 60_000).await;
    for i in 1..=3 {
        c.start_node(
            &format!("node-{i}"),
            &format!("i-000{i}"),
            "pool-u",
            "1.0.0",
        );
    }
    c.wait("three Ready", |s| {
        s.nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count()
            == 3
    })
    .await;
    c.running()
        .registry
        .upgrade(UpgradeRequest {
            pool: "pool-u".into(),
            version: "2.0.0".into(),
            strategy: Strategy::InPlace,
        })
        .await
        .unwrap();
    let mut max_down = 0;
    c.wait("in-place upgrade done", |s| {
        let down = s
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Ready || n.cordoned)
            .count();
        max_down = max_down.max(down);
        s.upgrade.as_ref().is_some_and(|u| u.done)
    })
    .await;
    let s = c.status();
    assert_eq!(max_down, 1, "never more than one node out of service");
    assert_eq!(s.max_concurrent_in_place, 1);
    for n in &s.nodes {
        assert_eq!(
            (n.state, n.version.as_str(), n.cordoned),
            (NodeState::Ready, "2.0.0", false),
            "{}",
            n.node_name
        );
        let hook =
            std::fs::read_to_string(c.dir.path().join(&n.instance_id).join("upgrades")).unwrap();
        assert_eq!(
            hook.trim(),
            "2.0.0",
            "the upgrade hook ran once on {}",
            n.node_name
        );
    }
    // Strict order: each node's upgrade finished before the next one's drain started.
    let order: Vec<&str> = s
        .events
        .iter()
        .filter(|e| {
            e.message.starts_with("drain started") || e.message.starts_with("upgraded in place")
        })
        .map(|e| e.node.as_str())
        .collect();
    assert_eq!(
        order,
        vec!["node-1", "node-1", "node-2", "node-2", "node-3", "node-3"]
    );
    assert_eq!(s.nodes.len(), 3, "in place: no node created");
    c.shutdown().await;
}

async fn rolling_upgrade_with_max_surge_and_max_unavailable(backend: Backend) {
    let mut c = Cluster::new(backend, Plan::Standard, 600_000, 60_000).await;
    c.start_node("node-1", "i-0001", "pool-r", "1.0.0");
    c.start_node("node-2", "i-0002", "pool-r", "1.0.0");
    c.wait("two Ready", |s| {
        s.nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count()
            == 2
    })
    .await;
    c.running()
        .registry
        .upgrade(UpgradeRequest {
            pool: "pool-r".into(),
            version: "2.0.0".into(),
            strategy: Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
            },
        })
        .await
        .unwrap();
    let mut min_available = usize::MAX;
    let mut max_live = 0;
    c.wait("rolling upgrade done", |s| {
        let available = s
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready && !n.cordoned)
            .count();
        let live = s
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Terminated)
            .count()
            + s.upgrade.as_ref().map_or(0, |u| u.creating.len());
        min_available = min_available.min(available);
        max_live = max_live.max(live);
        s.upgrade.as_ref().is_some_and(|u| u.done)
    })
    .await;
    assert!(
        min_available >= 2,
        "maxUnavailable 0: never below two available nodes ({min_available})"
    );
    assert!(
        max_live <= 3,
        "maxSurge 1: never more than three nodes ({max_live})"
    );
    let s = c.status();
    let live: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Terminated)
        .collect();
    assert_eq!(live.len(), 2);
    assert!(
        live.iter()
            .all(|n| n.version == "2.0.0" && n.state == NodeState::Ready)
    );
    assert_eq!(state_of(&s, "i-0001"), Some(NodeState::Terminated));
    assert_eq!(state_of(&s, "i-0002"), Some(NodeState::Terminated));
    let creates = c
        .handled
        .iter()
        .filter(|r| matches!(r, ProvisionRequest::Create { .. }))
        .count();
    assert_eq!(creates, 2, "new nodes first, one per old node");
    // An invalid request is refused.
    let err = c
        .running()
        .registry
        .upgrade(UpgradeRequest {
            pool: "pool-r".into(),
            version: "3.0.0".into(),
            strategy: Strategy::Rolling {
                max_surge: 0,
                max_unavailable: 0,
            },
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot both be 0"));
    c.shutdown().await;
}
