//! Control-plane replicas sharing one registry in a real 3-member etcd (Debian's etcd-server on
//! loopback ports the test picks): registrations through different replicas, leader failover in
//! the middle of upgrades and of an auto-heal clock, a stalled leader fenced off, etcd members
//! lost and restored. Replicas are `berth-controlplane serve` processes (SIGKILL is a crash),
//! nodes are real tunnel agents, and the test plays the cloud from the replicas' provision hook.
//! Every check of "exactly once" and "one at a time" reads the history stored in etcd.
//! Privileged suite (tmpfs for etcd's data): requires root like the other end-to-end tests.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use berth_tests::{
    etcd::{Etcd, free_port},
    netns::{require_root, unique_name, workspace_bin},
    replicas::{ProvisionLine, Replicas, Spool},
    tunnel::{
        AgentGuard, TOKEN, agent_args, check_pattern, connect_via_http, start_chatter, token_file,
    },
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(90);

struct Harness {
    cps: Replicas,
    spool: Spool,
    handled: Vec<ProvisionLine>,
    dir: tempfile::TempDir,
    token: PathBuf,
    agents: HashMap<String, AgentGuard>,
    /// instance → (name, pool, servers it dials)
    nodes: HashMap<String, (String, String, Vec<String>)>,
    // Last: the replicas die before etcd.
    etcd: Etcd,
}

impl Harness {
    fn new(replicas: usize, server_count: u32, extra: &[&str]) -> Self {
        require_root();
        let etcd = Etcd::start(3);
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("/berth/{}", unique_name("ha"));
        let cps = Replicas::start(
            dir.path(),
            replicas,
            server_count,
            &etcd.endpoints_arg(),
            &prefix,
            extra,
        );
        let token = token_file(dir.path(), TOKEN);
        Harness {
            spool: Spool::new(&cps.spool),
            cps,
            handled: Vec::new(),
            token,
            dir,
            agents: HashMap::new(),
            nodes: HashMap::new(),
            etcd,
        }
    }

    /// Starts a node agent dialling `servers` (all replicas by default).
    fn start_node(
        &mut self,
        name: &str,
        instance: &str,
        pool: &str,
        version: &str,
        servers: Option<Vec<String>>,
    ) {
        let servers = servers.unwrap_or_else(|| self.cps.agent_addrs());
        let ndir = self.dir.path().join(instance);
        std::fs::create_dir_all(&ndir).unwrap();
        let mut args = agent_args(servers.clone(), &self.token, &ndir, vec![]);
        args.node_ip = None;
        args.node_instance_id = Some(instance.into());
        args.node_pool = pool.into();
        args.node_version = version.into();
        args.node_heartbeat_ms = None; // the control plane's hint (200 ms)
        args.tunnel_allow = vec!["127.0.0.1:*".into()];
        args.node_upgrade_hook = Some(format!(
            "echo \"$BERTH_VERSION\" >> {}/upgrades",
            ndir.display()
        ));
        let g = AgentGuard::start(&tokio::runtime::Handle::current(), args, name);
        self.agents.insert(instance.into(), g);
        self.nodes
            .insert(instance.into(), (name.into(), pool.into(), servers));
    }

    async fn stop_node(&mut self, instance: &str) {
        if let Some(a) = self.agents.remove(instance) {
            a.stop().await;
        }
    }

    /// Upgrade hook runs on a node (one line per run).
    fn upgrades(&self, instance: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(instance).join("upgrades"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Plays the cloud for the requests the leaders' hooks wrote.
    async fn pump(&mut self, versions: &BTreeMap<String, String>) {
        for line in self.spool.take_new() {
            match line.action.as_str() {
                "reinstall" => {
                    self.stop_node(&line.instance).await;
                    let (name, pool, servers) = self.nodes[&line.instance].clone();
                    let version = versions
                        .get(&line.instance)
                        .cloned()
                        .unwrap_or_else(|| "1.0.0".into());
                    self.start_node(&name, &line.instance, &pool, &version, Some(servers));
                }
                "delete" => self.stop_node(&line.instance).await,
                "create" => {
                    let (inst, name, pool, ver) = (
                        line.instance.clone(),
                        line.name.clone(),
                        line.pool.clone(),
                        line.version.clone(),
                    );
                    self.start_node(&name, &inst, &pool, &ver, None);
                }
                other => panic!("unknown provisioning action {other}"),
            }
            self.handled.push(line);
        }
    }

    /// The status of the first replica that answers.
    async fn status(&self) -> Option<Value> {
        for i in 0..self.cps.list.len() {
            if let Some(v) = self.cps.status(i).await {
                return Some(v);
            }
        }
        None
    }

    /// Waits (playing the cloud) until `f` holds on the status of a live replica.
    async fn wait(&mut self, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
        let end = tokio::time::Instant::now() + LIMIT;
        loop {
            let st = self.status().await;
            let versions: BTreeMap<String, String> = st
                .as_ref()
                .map(|v| {
                    nodes(v)
                        .iter()
                        .map(|n| {
                            (
                                n["instance_id"].as_str().unwrap_or("").to_string(),
                                n["version"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.pump(&versions).await;
            if let Some(v) = &st
                && f(v)
            {
                return v.clone();
            }
            if tokio::time::Instant::now() > end {
                let logs: Vec<String> = (0..self.cps.list.len())
                    .map(|i| format!("--- cp-{i}:\n{}", self.cps.log_tail(i)))
                    .collect();
                panic!(
                    "timed out waiting for: {what}\nstatus: {}\n{}",
                    st.map(|v| serde_json::to_string_pretty(&v["registry"]).unwrap())
                        .unwrap_or_default(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a replica leads and returns its index.
    async fn leader(&mut self) -> usize {
        let end = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(i) = self.cps.leader().await {
                return i;
            }
            assert!(tokio::time::Instant::now() < end, "no leader elected");
            self.pump(&BTreeMap::new()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        for (_, a) in self.agents.drain() {
            a.stop().await;
        }
    }
}

fn nodes(v: &Value) -> Vec<Value> {
    v["registry"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn node<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["registry"]["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node_name"] == name))
        .unwrap_or_else(|| panic!("node {name} not in status"))
}

fn state(v: &Value, name: &str) -> String {
    v["registry"]["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node_name"] == name))
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn count_ready(v: &Value, pool: &str) -> usize {
    nodes(v)
        .iter()
        .filter(|n| n["pool"] == pool && n["state"] == "Ready")
        .count()
}

/// The stored history: (unix ms, node, message, replica).
fn events(v: &Value) -> Vec<(u64, String, String, String)> {
    v["registry"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["unix_ms"].as_u64().unwrap_or(0),
                e["node"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
                e["server"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn upgrade_done(v: &Value) -> bool {
    v["registry"]["upgrade"]["done"] == true
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Nodes registered through different replicas (each agent dials one replica only) show the same
/// registry on every replica; liveness of a node only one replica hears reaches the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_show_one_registry() {
    // server count 1: an agent keeps one connection, to the first replica it reaches.
    let mut h = Harness::new(3, 1, &["--autoheal-after-ms", "600000"]);
    for (i, addr) in h.cps.agent_addrs().into_iter().enumerate() {
        h.start_node(
            &format!("node-{i}"),
            &format!("i-000{i}"),
            "pool-a",
            "1.0.0",
            Some(vec![addr]),
        );
    }
    // Every replica shows all three nodes Ready, each registered through a different one.
    for r in 0..3 {
        let end = tokio::time::Instant::now() + LIMIT;
        loop {
            let v = h.cps.status(r).await;
            if let Some(v) = &v
                && (0..3).all(|i| state(v, &format!("node-{i}")) == "Ready")
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "cp-{r} never showed the three nodes Ready: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in 0..3 {
        let agent = &h.agents[&format!("i-000{i}")];
        assert_eq!(agent.handle.connected_servers(), vec![format!("cp-{i}")]);
    }
    // `berth-controlplane status` on each replica: same nodes, states, registry and leader.
    let mut views = Vec::new();
    for r in 0..3 {
        let out = std::process::Command::new(workspace_bin("berth-controlplane"))
            .args(["status", "--status-addr", &h.cps.list[r].status.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        for i in 0..3 {
            assert!(
                table
                    .lines()
                    .any(|l| l.starts_with(&format!("node-{i} ")) && l.contains("Ready")),
                "cp-{r}:\n{table}"
            );
        }
        assert!(table.contains("controller: this replica"), "{table}");
        let out = std::process::Command::new(workspace_bin("berth-controlplane"))
            .args(["status", "--json", "--status-addr"])
            .arg(h.cps.list[r].status.to_string())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ns: Vec<(String, String, String, bool)> = nodes(&v)
            .iter()
            .map(|n| {
                (
                    n["node_name"].as_str().unwrap().to_string(),
                    n["state"].as_str().unwrap().to_string(),
                    n["version"].as_str().unwrap().to_string(),
                    n["cordoned"].as_bool().unwrap(),
                )
            })
            .collect();
        ns.sort();
        views.push((
            ns,
            v["registry"]["store"]["registry_id"].clone(),
            v["registry"]["controller"]["leader"].clone(),
        ));
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    assert!(views[0].1.is_string() && views[0].2.is_string());
    let leader = h.leader().await;
    // The leader decides from every replica's heartbeats: a node another replica hears stays
    // Ready, the node whose agent stops turns NotReady, everywhere.
    let silent = (leader + 1) % 3;
    h.stop_node(&format!("i-000{silent}")).await;
    for r in 0..3 {
        let end = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(v) = h.cps.status(r).await
                && state(&v, &format!("node-{silent}")) == "NotReady"
            {
                for i in (0..3).filter(|i| *i != silent) {
                    assert_eq!(state(&v, &format!("node-{i}")), "Ready", "cp-{r}");
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "NotReady not seen on cp-{r}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // An admin request through a follower: the leader carries the drain out.
    let follower = (leader + 2) % 3;
    let target = format!("node-{}", (leader + 2) % 3);
    let (code, body) = h
        .cps
        .admin(
            follower,
            "/v1/drain",
            serde_json::json!({ "node": target, "terminate": false }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let v = h
        .wait("drain done", |v| {
            events(v).iter().any(|e| e.1 == target && e.2 == "drained")
        })
        .await;
    let drained_by = events(&v)
        .into_iter()
        .find(|e| e.1 == target && e.2 == "drained")
        .unwrap()
        .3;
    assert_eq!(drained_by, format!("cp-{leader}"), "the leader decides");
    // Unknown keys and layout: the registry lives under the cluster's prefix, values carry their
    // schema version.
    let dump = h.etcd.dump("/berth/");
    assert!(dump.contains("/v1/state/nodes/i-0000"), "{dump}");
    assert!(dump.contains("\"schema\":1"), "{dump}");
    h.shutdown().await;
}

/// The leader dies in the middle of an in-place upgrade of five nodes, then (a new leader) in the
/// middle of a rolling upgrade with maxSurge 2: each finishes under the next leader, every node
/// upgraded exactly once, never two nodes in place at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_upgrades() {
    let mut h = Harness::new(
        3,
        3,
        &["--plan", "standard", "--autoheal-after-ms", "600000"],
    );
    for i in 1..=5 {
        h.start_node(
            &format!("node-u{i}"),
            &format!("i-u{i}"),
            "pool-u",
            "1.0.0",
            None,
        );
    }
    for i in 1..=4 {
        h.start_node(
            &format!("node-r{i}"),
            &format!("i-r{i}"),
            "pool-r",
            "1.0.0",
            None,
        );
    }
    h.wait("nine nodes Ready", |v| {
        count_ready(v, "pool-u") == 5 && count_ready(v, "pool-r") == 4
    })
    .await;
    // Every agent holds a connection to each replica: each delivers the same commands.
    for a in h.agents.values() {
        assert_eq!(a.handle.connected_servers(), vec!["cp-0", "cp-1", "cp-2"]);
    }
    let first = h.leader().await;
    let (code, body) = h
        .cps
        .admin(
            (first + 1) % 3,
            "/v1/upgrade",
            serde_json::json!({"pool": "pool-u", "version": "2.0.0", "strategy": "in_place"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let mut max_out = 0;
    h.wait("two nodes upgraded in place", |v| {
        let out = nodes(v)
            .iter()
            .filter(|n| n["pool"] == "pool-u" && (n["state"] != "Ready" || n["cordoned"] == true))
            .count();
        max_out = max_out.max(out);
        events(v)
            .iter()
            .filter(|e| e.2.starts_with("upgraded in place"))
            .count()
            >= 2
    })
    .await;
    h.cps.kill(first);
    let killed_at = now_ms();
    let v = h
        .wait("in-place upgrade finished by the next leader", |v| {
            let out = nodes(v)
                .iter()
                .filter(|n| {
                    n["pool"] == "pool-u" && (n["state"] != "Ready" || n["cordoned"] == true)
                })
                .count();
            max_out = max_out.max(out);
            upgrade_done(v)
        })
        .await;
    assert!(
        max_out <= 1,
        "never more than one node out of service ({max_out})"
    );
    let second = h.leader().await;
    assert_ne!(second, first);
    assert!(v["registry"]["upgrade"]["failed"].is_null());
    assert_eq!(v["registry"]["max_concurrent_in_place"], 1);
    // From the stored history: strictly drain → upgraded for one node after the other, each once.
    let hist = events(&v);
    let seq: Vec<(String, &str)> = hist
        .iter()
        .filter_map(|e| {
            if e.2.starts_with("drain started (then Upgrade") {
                Some((e.1.clone(), "start"))
            } else if e.2.starts_with("upgraded in place to 2.0.0") {
                Some((e.1.clone(), "done"))
            } else {
                None
            }
        })
        .collect();
    let expect: Vec<(String, &str)> = (1..=5)
        .flat_map(|i| {
            [
                (format!("node-u{i}"), "start"),
                (format!("node-u{i}"), "done"),
            ]
        })
        .collect();
    assert_eq!(seq, expect, "one node at a time, each exactly once");
    let decided_after: Vec<&String> = hist
        .iter()
        .filter(|e| e.0 > killed_at && e.2.starts_with("upgraded in place"))
        .map(|e| &e.3)
        .collect();
    assert!(
        !decided_after.is_empty(),
        "the new leader finished the upgrade"
    );
    assert!(decided_after.iter().all(|s| **s == format!("cp-{second}")));
    for i in 1..=5 {
        let n = node(&v, &format!("node-u{i}"));
        assert_eq!(
            (
                n["state"].as_str(),
                n["version"].as_str(),
                n["cordoned"].as_bool()
            ),
            (Some("Ready"), Some("2.0.0"), Some(false))
        );
        // The agent ran the upgrade once although three replicas delivered it.
        assert_eq!(h.upgrades(&format!("i-u{i}")), vec!["2.0.0"], "node-u{i}");
    }

    // The killed replica comes back and remembers everything; then a rolling upgrade, and its
    // leader dies too once the first old node is gone.
    h.cps.restart(first);
    h.cps.wait_loaded(first).await;
    let (code, body) = h
        .cps
        .admin(
            first,
            "/v1/upgrade",
            serde_json::json!({"pool": "pool-r", "version": "2.0.0", "strategy": "rolling",
                               "max_surge": 2, "max_unavailable": 0}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let mut min_available = usize::MAX;
    let sample = |v: &Value, min: &mut usize| {
        if !upgrade_done(v) {
            let avail = nodes(v)
                .iter()
                .filter(|n| {
                    n["pool"] == "pool-r" && n["state"] == "Ready" && n["cordoned"] == false
                })
                .count();
            *min = (*min).min(avail);
        }
    };
    h.wait("first old node terminated", |v| {
        sample(v, &mut min_available);
        nodes(v)
            .iter()
            .any(|n| n["pool"] == "pool-r" && n["state"] == "Terminated")
    })
    .await;
    let rolling_leader = h.leader().await;
    h.cps.kill(rolling_leader);
    let v = h
        .wait("rolling upgrade finished by the next leader", |v| {
            sample(v, &mut min_available);
            upgrade_done(v)
        })
        .await;
    let third = h.leader().await;
    assert_ne!(third, rolling_leader);
    assert!(
        min_available >= 4,
        "maxUnavailable 0: never fewer than four available ({min_available})"
    );
    let live: Vec<Value> = nodes(&v)
        .into_iter()
        .filter(|n| n["pool"] == "pool-r" && n["state"] != "Terminated")
        .collect();
    assert_eq!(live.len(), 4);
    assert!(
        live.iter()
            .all(|n| n["version"] == "2.0.0" && n["state"] == "Ready")
    );
    // History: each old node terminated once, never more than 4 + 2 nodes, one create per node.
    let hist = events(&v);
    let start = hist
        .iter()
        .position(|e| e.2.starts_with("upgrade of pool to 2.0.0") && e.1 == "pool-r")
        .expect("rolling start in history");
    let mut count = 4i64;
    let mut max_count = count;
    let mut terminated: BTreeMap<String, usize> = BTreeMap::new();
    let mut created = 0;
    for e in &hist[start..] {
        if e.2 == "create requested (rolling upgrade)" {
            count += 1;
            created += 1;
        } else if e.2.ends_with("-> Terminated (drained for removal)") {
            count -= 1;
            *terminated.entry(e.1.clone()).or_default() += 1;
        }
        max_count = max_count.max(count);
    }
    assert!(
        max_count <= 6,
        "maxSurge 2: at most six nodes ({max_count})"
    );
    assert_eq!(created, 4, "one new node per old node");
    assert_eq!(
        terminated,
        (1..=4)
            .map(|i| (format!("node-r{i}"), 1))
            .collect::<BTreeMap<_, _>>()
    );
    let creates: Vec<&ProvisionLine> = h.handled.iter().filter(|l| l.action == "create").collect();
    let mut ids: Vec<&str> = creates.iter().map(|l| l.instance.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((creates.len(), ids.len()), (4, 4), "{creates:?}");
    assert_eq!(
        h.handled.iter().filter(|l| l.action == "delete").count(),
        4,
        "{:?}",
        h.handled
    );
    h.shutdown().await;
}

/// A node NotReady for 8 of its 10 (shortened) seconds when the leader dies: the next leader
/// auto-heals it once, 10 s after it turned NotReady (the clock is stored, not restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_a_node_is_not_ready() {
    let mut h = Harness::new(3, 3, &["--plan", "free", "--autoheal-after-ms", "10000"]);
    h.start_node("node-1", "i-0001", "pool-a", "1.0.0", None);
    h.start_node("node-2", "i-0002", "pool-a", "1.0.0", None);
    h.wait("both Ready", |v| count_ready(v, "pool-a") == 2)
        .await;
    h.stop_node("i-0001").await;
    let v = h
        .wait("node-1 NotReady", |v| state(v, "node-1") == "NotReady")
        .await;
    let since = node(&v, "node-1")["not_ready_since_ms"]
        .as_u64()
        .expect("stored NotReady clock");
    let leader = h.leader().await;
    // Wait until the node has been NotReady for 8 of its 10 seconds, then kill the leader.
    while now_ms() < since + 8_000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.cps.kill(leader);
    let killed_at = now_ms();
    let v = h
        .wait("node-1 reinstalled and Ready again", |v| {
            state(v, "node-1") == "Ready" && node(v, "node-1")["reinstalls"] == 1
        })
        .await;
    let heals: Vec<(u64, String, String, String)> = events(&v)
        .into_iter()
        .filter(|e| e.1 == "node-1" && e.2.contains("auto-heal"))
        .collect();
    assert_eq!(heals.len(), 1, "auto-heal fired once: {heals:?}");
    let healed_at = heals[0].0;
    assert!(
        healed_at >= since + 10_000,
        "not shortened: healed {} ms after NotReady",
        healed_at - since
    );
    assert!(
        healed_at < killed_at + 10_000,
        "not restarted by the failover: healed {} ms after the kill",
        healed_at - killed_at
    );
    assert_ne!(
        heals[0].3,
        format!("cp-{leader}"),
        "healed by the new leader"
    );
    let reinstalls: Vec<&ProvisionLine> = h
        .handled
        .iter()
        .filter(|l| l.action == "reinstall")
        .collect();
    assert_eq!(reinstalls.len(), 1, "{reinstalls:?}");
    assert_eq!(reinstalls[0].instance, "i-0001");
    assert_eq!(state(&v, "node-2"), "Ready");
    // Still once, a while later.
    let v = h
        .wait("a few more controller passes", |v| {
            v["registry"]["store"]["revision"].as_i64().unwrap_or(0) > 0
        })
        .await;
    assert_eq!(node(&v, "node-1")["heals"], 1);
    h.shutdown().await;
}

/// A leader that stalls (SIGSTOP) past its lease is replaced; when it wakes up it still
/// believes it leads, but its term is over: it makes no decision, and the upgrade goes on
/// strictly one node at a time under the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_is_fenced_off() {
    let mut h = Harness::new(2, 2, &["--autoheal-after-ms", "600000"]);
    for i in 1..=4 {
        h.start_node(
            &format!("node-{i}"),
            &format!("i-000{i}"),
            "pool-f",
            "1.0.0",
            None,
        );
    }
    h.wait("four Ready", |v| count_ready(v, "pool-f") == 4)
        .await;
    let old = h.leader().await;
    let (code, body) = h
        .cps
        .admin(
            old,
            "/v1/upgrade",
            serde_json::json!({"pool": "pool-f", "version": "2.0.0", "strategy": "in_place"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    h.wait("first node upgraded", |v| {
        events(v)
            .iter()
            .any(|e| e.2.starts_with("upgraded in place"))
    })
    .await;
    h.cps.signal(old, nix::sys::signal::Signal::SIGSTOP);
    let stopped_at = now_ms();
    let new = 1 - old;
    h.wait("the other replica leads", |v| {
        v["registry"]["controller"]["leader"] == format!("cp-{new}")
    })
    .await;
    // Let the new leader make progress, then wake the old one up in the middle of it.
    h.wait("another node upgraded", |v| {
        events(v)
            .iter()
            .filter(|e| e.2.starts_with("upgraded in place"))
            .count()
            >= 2
    })
    .await;
    h.cps.signal(old, nix::sys::signal::Signal::SIGCONT);
    let v = h.wait("upgrade done", upgrade_done).await;
    let hist = events(&v);
    let elected = hist
        .iter()
        .find(|e| e.2 == format!("cp-{new} elected leader"))
        .expect("election in history")
        .0;
    let stale: Vec<&(u64, String, String, String)> = hist
        .iter()
        .filter(|e| e.0 >= elected && e.3 == format!("cp-{old}") && e.1 != "controlplane")
        .filter(|e| !e.2.starts_with("registered"))
        .collect();
    assert!(
        stale.is_empty(),
        "the stalled leader decided after its term: {stale:?}"
    );
    let order: Vec<&str> = hist
        .iter()
        .filter(|e| {
            e.2.starts_with("drain started (then Upgrade") || e.2.starts_with("upgraded in place")
        })
        .map(|e| e.1.as_str())
        .collect();
    let expect: Vec<String> = (1..=4)
        .flat_map(|i| [format!("node-{i}"), format!("node-{i}")])
        .collect();
    assert_eq!(order, expect);
    for i in 1..=4 {
        assert_eq!(h.upgrades(&format!("i-000{i}")), vec!["2.0.0"]);
    }
    // The woken replica found out: it follows now, and its log says why.
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(v) = h.cps.status(old).await
            && v["registry"]["controller"]["role"] == "follower"
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "old leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        h.cps.log(old).contains("lost leadership"),
        "{}",
        h.cps.log_tail(old)
    );
    assert!(stopped_at < elected);
    h.shutdown().await;
}

/// One etcd member down: nothing changes. Two down: tunnels keep working, the leader pauses its
/// decisions and says so, writes fail cleanly. Members back: decisions resume and the state
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_members_lost_and_restored() {
    let mut h = Harness::new(2, 2, &["--plan", "free", "--autoheal-after-ms", "3000"]);
    let chatter_port = free_port();
    let chatter_addr = format!("127.0.0.1:{chatter_port}");
    start_chatter(chatter_addr.parse().unwrap()).await;
    h.start_node("node-1", "i-0001", "pool-e", "1.0.0", None);
    h.start_node("node-2", "i-0002", "pool-e", "1.0.0", None);
    h.wait("both Ready", |v| count_ready(v, "pool-e") == 2)
        .await;
    async fn tunnel_ok(uds: &std::path::Path, target: &str, id: &str) -> Result<(), String> {
        let mut s = connect_via_http(uds, target).await?;
        s.write_all(format!("{id} 65536\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        match (buf.len(), check_pattern(0, &buf)) {
            (65536, None) => Ok(()),
            (n, bad) => Err(format!("{n} bytes, mismatch at {bad:?}")),
        }
    }
    // One member down: a new node registers, a drain is carried out.
    h.etcd.stop(0);
    h.start_node("node-3", "i-0003", "pool-e", "1.0.0", None);
    h.wait("node-3 Ready with one member down", |v| {
        state(v, "node-3") == "Ready"
    })
    .await;
    let (code, body) = h
        .cps
        .admin(
            0,
            "/v1/drain",
            serde_json::json!({"node": "node-3", "terminate": true}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    h.wait("node-3 drained and terminated", |v| {
        state(v, "node-3") == "Terminated"
    })
    .await;
    // Two members down: no quorum.
    let leader = h.leader().await;
    h.etcd.stop(1);
    h.stop_node("i-0002").await;
    let end = tokio::time::Instant::now() + LIMIT;
    let paused = loop {
        if let Some(v) = h.cps.status(leader).await
            && let Some(p) = v["registry"]["controller"]["paused"].as_str()
        {
            break p.to_string();
        }
        assert!(tokio::time::Instant::now() < end, "the leader never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        paused.contains("unreachable") || paused.contains("not following"),
        "{paused}"
    );
    assert!(
        h.cps.log(leader).contains("lifecycle decisions paused"),
        "{}",
        h.cps.log_tail(leader)
    );
    // Tunnels through both replicas keep working.
    for (i, r) in h.cps.list.iter().enumerate() {
        tunnel_ok(&r.connect_uds, &chatter_addr, &format!("nq-{i}"))
            .await
            .unwrap_or_else(|e| panic!("tunnel through cp-{i} without etcd quorum: {e}"));
    }
    // Writes fail with a clear error and change nothing.
    let (code, body) = h
        .cps
        .admin(leader, "/v1/cordon", serde_json::json!({"node": "node-1"}))
        .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("registry store unavailable"), "{body}");
    let v = h.cps.status(leader).await.expect("status without quorum");
    assert_eq!(v["registry"]["store"]["reachable"], false);
    // node-2 stopped heartbeating: nobody may act on it while decisions are paused (its
    // auto-heal would be due 3 s after NotReady; wait past the grace period and that).
    let hold_until = now_ms() + 2_000 + 3_000 + 1_000;
    while now_ms() < hold_until {
        h.pump(&BTreeMap::new()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        h.handled.iter().all(|l| l.action != "reinstall"),
        "no decision without quorum: {:?}",
        h.handled
    );
    // Members back: decisions resume, node-2 goes NotReady then is reinstalled; node-1 still Ready.
    h.etcd.restart(0);
    h.etcd.restart(1);
    h.etcd.wait_healthy(&[0, 1, 2]);
    let v = h
        .wait("node-2 reinstalled after quorum returned", |v| {
            node(v, "node-2")["reinstalls"] == 1 && state(v, "node-2") == "Ready"
        })
        .await;
    assert_eq!(state(&v, "node-1"), "Ready");
    let leader = h.leader().await;
    let v = h.cps.status(leader).await.unwrap();
    assert!(v["registry"]["controller"]["paused"].is_null(), "{v}");
    let log = h.cps.log(leader);
    if log.contains("lifecycle decisions paused") {
        assert!(
            log.contains("lifecycle decisions resumed"),
            "{}",
            h.cps.log_tail(leader)
        );
    }
    // Every replica converges on the same view.
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        let a = h.cps.status(0).await;
        let b = h.cps.status(1).await;
        if let (Some(a), Some(b)) = (a, b) {
            let view = |v: &Value| {
                let mut n: Vec<(String, String)> = nodes(v)
                    .iter()
                    .map(|n| (n["node_name"].to_string(), n["state"].to_string()))
                    .collect();
                n.sort();
                n
            };
            if view(&a) == view(&b)
                && a["registry"]["store"]["revision"] == b["registry"]["store"]["revision"]
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "replicas never converged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.shutdown().await;
}

/// etcd with TLS and client certificates (as a provider runs it): a replica with the client
/// certificate serves from it; one without is refused by etcd, says so, and keeps serving its
/// tunnel endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pki = berth_tests::tunnel::Pki::new(
        dir.path(),
        "etcd",
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    );
    let etcd = Etcd::start_tls(1, &pki);
    let prefix = format!("/berth/{}", unique_name("tls"));
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.client_cert.to_str().unwrap(),
        pki.client_key.to_str().unwrap(),
    );
    let good = Replicas::start(
        &dir.path().join("good"),
        1,
        1,
        &etcd.endpoints_arg(),
        &prefix,
        &[
            "--etcd-ca-file",
            ca,
            "--etcd-cert-file",
            cert,
            "--etcd-key-file",
            key,
        ],
    );
    good.wait_loaded(0).await;
    let v = good.status(0).await.unwrap();
    assert!(
        v["registry"]["store"]["backend"]
            .as_str()
            .unwrap()
            .contains("https://127.0.0.1"),
        "{v}"
    );
    let token = token_file(dir.path(), TOKEN);
    let mut args = agent_args(good.agent_addrs(), &token, dir.path(), vec![]);
    args.node_ip = None;
    args.node_instance_id = Some("i-tls".into());
    let agent = AgentGuard::start(&tokio::runtime::Handle::current(), args, "node-tls");
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(v) = good.status(0).await
            && state(&v, "node-tls") == "Ready"
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "node never Ready over TLS etcd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(etcd.dump(&prefix).contains("i-tls"));
    // Without a client certificate etcd refuses the replica; it reports the store unreachable.
    let bad = Replicas::start(
        &dir.path().join("bad"),
        1,
        1,
        &etcd.endpoints_arg(),
        &prefix,
        &["--etcd-ca-file", ca],
    );
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(v) = bad.status(0).await
            && v["registry"]["store"]["reachable"] == false
        {
            assert!(v["registry"]["store"]["registry_id"].is_null());
            assert!(v["registry"]["nodes"].as_array().unwrap().is_empty());
            break;
        }
        assert!(tokio::time::Instant::now() < end, "refusal never reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
}
