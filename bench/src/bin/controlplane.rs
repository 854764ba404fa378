//! Control-plane registry benchmark (issue 14 §4), on a real 3-member etcd (Debian's
//! etcd-server, loopback, data on tmpfs):
//!
//! * heartbeat handling: simulated nodes (gRPC `berth.node.v1` clients, as the agents use it)
//!   send unchanged heartbeats to a control plane (in this process) as fast as it answers, with
//!   100 and 1 000 registered nodes;
//! * etcd writes per heartbeat: the etcd revision (one per write transaction, reports included)
//!   counted across 10 s of nodes heartbeating at a steady pace, with the production ratio of
//!   heartbeat interval to grace period (1 s / 4 s here, 10 s / 40 s by default), and during the
//!   full-speed run; the operations of the paced window are read back from etcd's history and
//!   counted by kind of key (reports, history trimming, node records …);
//! * failover: three `berth-controlplane serve` processes (release build) with the default lease
//!   (3 s) and tick (1 s); the leader is killed (SIGKILL) and a drain is requested from a
//!   survivor: the time from the kill to the drain's completion by the next leader (the next
//!   lifecycle decision), three times.
//!
//! Writes `bench/results/controlplane.json`. Run as root (tmpfs for etcd's data).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use berth_bench::{median, write_result};
use berth_proto::node::{
    Condition, HeartbeatRequest, NodeRegistration, RegisterRequest,
    node_service_client::NodeServiceClient,
};
use berth_tests::{etcd::Etcd, replicas::Replicas};
use tonic::transport::Channel;

const TOKEN: &str = "berth-test-token-3f9a";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[derive(Clone)]
struct Client {
    c: NodeServiceClient<Channel>,
}

impl Client {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(Client {
            c: NodeServiceClient::new(ch),
        })
    }

    fn req<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN}").parse().expect("header"),
        );
        r
    }

    async fn register(&mut self, i: usize) -> anyhow::Result<()> {
        self.c
            .register(Self::req(RegisterRequest {
                node: Some(NodeRegistration {
                    node_name: format!("sim-{i:04}"),
                    instance_id: format!("i-sim-{i:04}"),
                    node_pool: "sim".into(),
                    flavor: "b3-16".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                }),
                agent_start_ms: 1,
                sequence: 0,
            }))
            .await?;
        Ok(())
    }

    async fn heartbeat(&mut self, i: usize, seq: u64) -> anyhow::Result<()> {
        let c = |t: &str, status: bool| Condition {
            r#type: t.into(),
            status,
            message: String::new(),
        };
        let rsp = self
            .c
            .heartbeat(Self::req(HeartbeatRequest {
                instance_id: format!("i-sim-{i:04}"),
                conditions: vec![
                    c("KubeletHealthy", true),
                    c("ContainerRuntimeHealthy", true),
                    c("DatapathLoaded", true),
                    c("DiskPressure", false),
                ],
                version: "1.0.0".into(),
                acks: Vec::new(),
                shutting_down: false,
                agent_start_ms: 1,
                sequence: seq,
            }))
            .await?
            .into_inner();
        if !rsp.known {
            bail!("node {i} unknown");
        }
        Ok(())
    }
}

/// Unchanged heartbeats as fast as they are answered: (heartbeats, seconds, etcd writes).
async fn full_speed(
    clients: &[Client],
    nodes: usize,
    secs: f64,
    etcd: &Etcd,
    seq: &Arc<AtomicU64>,
) -> anyhow::Result<(u64, f64, i64)> {
    const WORKERS: usize = 64;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rev0 = etcd.revision();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut c = clients[w % clients.len()].clone();
        let (done, stop, seq) = (done.clone(), stop.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                c.heartbeat(i % nodes, seq.fetch_add(1, Ordering::Relaxed) + 1)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += WORKERS;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((
        done.load(Ordering::Relaxed),
        elapsed,
        etcd.revision() - rev0,
    ))
}

/// Every node heartbeats once per `interval` for `secs`: (heartbeats, etcd writes).
async fn paced(
    clients: &[Client],
    nodes: usize,
    interval: Duration,
    secs: u64,
    etcd: &Etcd,
    seq: &Arc<AtomicU64>,
) -> anyhow::Result<(u64, i64)> {
    let rev0 = etcd.revision();
    let done = Arc::new(AtomicU64::new(0));
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let mut c = clients[i % clients.len()].clone();
        let (done, seq) = (done.clone(), seq.clone());
        // Spread the nodes over the interval.
        let offset = interval.mul_f64(i as f64 / nodes as f64);
        tasks.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
            loop {
                iv.tick().await;
                if tokio::time::Instant::now() >= end {
                    return anyhow::Ok(());
                }
                c.heartbeat(i, seq.fetch_add(1, Ordering::Relaxed) + 1)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((done.load(Ordering::Relaxed), etcd.revision() - rev0))
}

struct HeartbeatFigures {
    per_second: f64,
    writes_full_speed: f64,
    paced_heartbeats: u64,
    paced_writes: i64,
    /// `PUT replicas` (reports), `DELETE events` (history trimming), …
    paced_by_kind: std::collections::BTreeMap<String, usize>,
}

async fn heartbeats(etcd: &Etcd, nodes: usize) -> anyhow::Result<HeartbeatFigures> {
    let (mut args, tokens) = berth_controlplane::serve::ServeArgs::local(TOKEN);
    args.etcd_endpoints = etcd.endpoints();
    args.etcd_prefix = format!("/berth/bench-{nodes}");
    // The production ratio of heartbeat interval to grace (10 s / 40 s), ten times faster.
    args.heartbeat_interval_ms = 1_000;
    args.heartbeat_grace_ms = 4_000;
    let (cp, _prov) = berth_controlplane::serve::start(&args, tokens).await?;
    if !cp.registry.wait_loaded(Duration::from_secs(30)).await {
        bail!("registry not loaded");
    }
    let addr = cp.agent_addr.to_string();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(&addr).await?);
    }
    let seq = Arc::new(AtomicU64::new(0));
    // Register every node (64 at a time), then two rounds of heartbeats: all Ready.
    let regs: Vec<_> = (0..64)
        .map(|w| {
            let mut c = clients[w % clients.len()].clone();
            tokio::spawn(async move {
                for i in (w..nodes).step_by(64) {
                    c.register(i).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for r in regs {
        r.await??;
    }
    for _ in 0..2 {
        let beats: Vec<_> = (0..64)
            .map(|w| {
                let mut c = clients[w % clients.len()].clone();
                let seq = seq.clone();
                tokio::spawn(async move {
                    for i in (w..nodes).step_by(64) {
                        c.heartbeat(i, seq.fetch_add(1, Ordering::Relaxed) + 1)
                            .await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for b in beats {
            b.await??;
        }
    }
    let ready = cp
        .registry
        .status()
        .nodes
        .iter()
        .filter(|n| n.state == berth_controlplane::lifecycle::NodeState::Ready)
        .count();
    if ready != nodes {
        bail!("{ready} of {nodes} nodes Ready");
    }
    let (n, secs, writes) = full_speed(&clients, nodes, 5.0, etcd, &seq).await?;
    let rev0 = etcd.revision();
    let (paced_n, paced_writes) =
        paced(&clients, nodes, Duration::from_secs(1), 10, etcd, &seq).await?;
    // What was written in the window, by kind of key (from etcd's history).
    let mut paced_by_kind = std::collections::BTreeMap::<String, usize>::new();
    let root = format!("{}/v1/", args.etcd_prefix);
    for (_, op, key) in etcd.history("/berth/", rev0, rev0 + paced_writes) {
        let rest = key.strip_prefix(&root).unwrap_or(&key);
        let kind = match rest.split('/').next().unwrap_or("") {
            "state" => rest.split('/').take(2).collect::<Vec<_>>().join("/"),
            k => k.to_string(),
        };
        *paced_by_kind.entry(format!("{op} {kind}")).or_default() += 1;
    }
    eprintln!(
        "{nodes} nodes: {:.0} heartbeats/s ({n} in {secs:.1} s, {writes} etcd writes); paced: {paced_n} heartbeats, {paced_writes} writes {paced_by_kind:?}",
        n as f64 / secs
    );
    cp.stop().await;
    Ok(HeartbeatFigures {
        per_second: n as f64 / secs,
        writes_full_speed: writes as f64 / n as f64,
        paced_heartbeats: paced_n,
        paced_writes,
        paced_by_kind,
    })
}

async fn status(cps: &Replicas, i: usize) -> Option<serde_json::Value> {
    cps.status(i).await
}

/// Kill → next lifecycle decision, `rounds` times: (failover seconds, election seconds).
async fn failover(etcd: &Etcd, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    // The defaults of `berth-controlplane serve` (the test harness shortens them otherwise).
    let mut cps = Replicas::start(
        dir.path(),
        3,
        3,
        &etcd.endpoints_arg(),
        "/berth/bench-failover",
        &[
            "--lease-ttl-secs",
            "3",
            "--tick-ms",
            "1000",
            "--heartbeat-interval-ms",
            "10000",
            "--heartbeat-grace-ms",
            "40000",
        ],
    );
    for i in 0..3 {
        cps.wait_loaded(i).await;
    }
    // Nodes to drain, one per round, kept alive through every replica.
    let mut c = Client::connect(&cps.list[0].agent.to_string()).await?;
    for i in 0..rounds {
        c.register(i).await?;
        c.heartbeat(i, 1).await?;
    }
    let addrs = cps.agent_addrs();
    let alive = Arc::new(AtomicBool::new(true));
    let keep = {
        let alive = alive.clone();
        tokio::spawn(async move {
            let mut seq = 10;
            while alive.load(Ordering::Relaxed) {
                for a in &addrs {
                    if let Ok(mut c) = Client::connect(a).await {
                        for i in 0..rounds {
                            seq += 1;
                            let _ = c.heartbeat(i, seq).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for round in 0..rounds {
        let end = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            if let Some(i) = cps.leader().await {
                break i;
            }
            if Instant::now() > end {
                bail!("no leader");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let node = format!("sim-{round:04}");
        let survivor = (leader + 1) % 3;
        let killed_ms = now_ms();
        cps.kill(leader);
        // The request lands at once (any replica writes it); carrying it out is the leader's.
        loop {
            let (code, body) = cps
                .admin(
                    survivor,
                    "/v1/drain",
                    serde_json::json!({ "node": node, "terminate": false }),
                )
                .await;
            if code == 200 {
                break;
            }
            if Instant::now() > end {
                bail!("drain request refused: {code} {body}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (decided, elected) = loop {
            if let Some(v) = status(&cps, survivor).await {
                let events = v["registry"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let at = |f: &dyn Fn(&serde_json::Value) -> bool| {
                    events
                        .iter()
                        .filter(|e| e["unix_ms"].as_u64().unwrap_or(0) >= killed_ms)
                        .find(|e| f(e))
                        .and_then(|e| e["unix_ms"].as_u64())
                };
                let decided = at(&|e| e["node"] == node.as_str() && e["message"] == "drained");
                let elected = at(&|e| {
                    e["message"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("elected leader"))
                });
                if let (Some(d), Some(e)) = (decided, elected) {
                    break (d, e);
                }
            }
            if Instant::now() > end {
                bail!(
                    "no decision after the failover:\n{}",
                    cps.log_tail(survivor)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let f = (decided - killed_ms) as f64 / 1000.0;
        let e = (elected - killed_ms) as f64 / 1000.0;
        eprintln!("failover {round}: elected after {e:.2} s, first decision after {f:.2} s");
        failovers.push(f);
        elections.push(e);
        cps.restart(leader);
        cps.wait_loaded(leader).await;
    }
    alive.store(false, Ordering::Relaxed);
    let _ = keep.await;
    Ok((failovers, elections))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // etcd's data lives on a tmpfs the benchmark mounts.
    berth_tests::netns::require_root();
    let etcd = Etcd::start(3);
    let h100 = heartbeats(&etcd, 100).await.context("100 nodes")?;
    let h1000 = heartbeats(&etcd, 1000)
        .await
        .map_err(|e| anyhow::anyhow!("1000 nodes: {e:?}"))?;
    let (failovers, elections) = failover(&etcd, 3).await.context("failover")?;
    let w100 = h100.paced_writes as f64 / h100.paced_heartbeats as f64;
    let w1000 = h1000.paced_writes as f64 / h1000.paced_heartbeats as f64;
    let result = serde_json::json!({
        "heartbeats_per_second_100_nodes": h100.per_second,
        "heartbeats_per_second_1000_nodes": h1000.per_second,
        "etcd_writes_per_heartbeat": w100.max(w1000),
        "etcd_writes_per_heartbeat_100_nodes": w100,
        "etcd_writes_per_heartbeat_1000_nodes": w1000,
        "etcd_writes_per_heartbeat_full_speed_100_nodes": h100.writes_full_speed,
        "etcd_writes_per_heartbeat_full_speed_1000_nodes": h1000.writes_full_speed,
        "paced": {
            "heartbeat_interval_ms": 1000,
            "heartbeat_grace_ms": 4000,
            "seconds": 10,
            "heartbeats_100_nodes": h100.paced_heartbeats,
            "etcd_writes_100_nodes": h100.paced_writes,
            "heartbeats_1000_nodes": h1000.paced_heartbeats,
            "etcd_writes_1000_nodes": h1000.paced_writes,
            "etcd_operations_by_kind_100_nodes": h100.paced_by_kind,
            "etcd_operations_by_kind_1000_nodes": h1000.paced_by_kind,
        },
        "failover_seconds": median(&failovers),
        "failover_seconds_max": failovers.iter().cloned().fold(0.0, f64::max),
        "failover_seconds_runs": failovers,
        "election_seconds_runs": elections,
        "lease_ttl_secs": 3,
        "tick_ms": 1000,
        "etcd": "3 members, etcd-server 3.4 (Debian), loopback, data on tmpfs",
        "targets": {
            "heartbeats_per_second_1000_nodes_min": 1000.0,
            "etcd_writes_per_heartbeat_max": 0.1,
            "failover_seconds_max": 5.0,
        },
    });
    let path = write_result("controlplane", &result)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
