//! CSI benchmark: time and peak RSS of the node plugin to create, attach, stage (mkfs.ext4 +
//! mount) and publish 100 volumes on one node through the OpenStack simulator, then
//! NodePublish/NodeUnpublish latency. Writes `bench/results/csi.json` and prints a table.
//!
//! Run as root after building the driver in the same profile:
//! `cargo build --release -p berth-csi -p berth-bench && target/release/csi`
//!
//! No peer runs here: the upstream cinder-csi-plugin is a Go binary that is not packaged for
//! Debian and cannot be fetched on this machine, so the figures are reported against the issue's
//! target (node plugin < 20 MB RSS) rather than as a side-by-side ratio.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use berth_bench::{median, percentile, write_result};
use berth_proto::csi;
use berth_tests::csi::{Clients, CsiEnv, EnvOptions, GIB, connect, mount_cap};
use tokio::{sync::Semaphore, task::JoinSet};

const VOLUMES: usize = 100;
const PARALLEL: usize = 8;
const LATENCY_ROUNDS: usize = 50;
const RSS_TARGET_MB: f64 = 20.0;

/// The node plugin process, killed on drop.
struct NodePlugin(Child);

impl Drop for NodePlugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
    Ok(kb)
}

fn driver_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join("berth-csi");
    if !p.exists() {
        bail!(
            "{} is missing: build it in the same profile (`cargo build --release -p berth-csi`)",
            p.display()
        );
    }
    Ok(p)
}

fn start_node_plugin(env: &CsiEnv, bin: &Path) -> anyhow::Result<(NodePlugin, PathBuf)> {
    let sock = env.dir.path().join("node/csi.sock");
    let log = std::fs::File::create(env.dir.path().join("node.log"))?;
    let child = Command::new(bin)
        .args([
            "--role",
            "node",
            "--metadata-search-order",
            "metadataService",
        ])
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .arg("--device-dir")
        .arg(&env.by_id)
        .arg("--metadata-url")
        .arg(env.sim().metadata_url(&env.node_id))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let plugin = NodePlugin(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("node plugin did not create {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((plugin, sock))
}

struct Vol {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

async fn run() -> anyhow::Result<()> {
    berth_tests::netns::require_root();
    let bin = driver_bin()?;
    let mut env = CsiEnv::start(
        |cfg| cfg.transition_delay = Duration::from_millis(1),
        EnvOptions {
            driver_args: vec!["--role".into(), "controller".into()],
            driver_bin: Some(bin.clone()),
            ..Default::default()
        },
    );
    let (plugin, node_sock) = start_node_plugin(&env, &bin)?;
    let pid = plugin.0.id();
    let ctl = env.clients().await;
    let node = connect(&node_sock).await;
    let node_id = env.node_id.clone();
    let cap = mount_cap("ext4");

    // 1. Create + attach + stage + publish 100 volumes.
    let sem = Arc::new(Semaphore::new(PARALLEL));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..VOLUMES {
        let (mut ctl, mut node, sem, node_id, cap) = (
            ctl.clone(),
            node.clone(),
            sem.clone(),
            node_id.clone(),
            cap.clone(),
        );
        let staging = env.staging_path(&format!("bench-{i}"));
        let target = env.target_path(&format!("pod-{i}"), "vol");
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let id = ctl
                .create(&format!("bench-{i}"), GIB, cap.clone())
                .await
                .volume_id;
            ctl.attach(&id, &node_id, cap.clone()).await;
            node.stage(&id, &staging, cap.clone()).await;
            node.publish(&id, &staging, &target, cap, false).await;
            Vol {
                id,
                staging,
                target,
            }
        });
    }
    let vols: Vec<Vol> = set.join_all().await;
    let hundred = t0.elapsed().as_secs_f64();
    let peak_rss_mb = status_kb(pid, "VmHWM:")? / 1024.0;
    let rss_now_mb = status_kb(pid, "VmRSS:")? / 1024.0;

    // 2. NodePublish / NodeUnpublish latency (sequential, one pod at a time).
    let mut node1: Clients = node.clone();
    let mut publish_ms = Vec::new();
    let mut unpublish_ms = Vec::new();
    for r in 0..LATENCY_ROUNDS {
        let v = &vols[r % vols.len()];
        let t = Instant::now();
        node1.unpublish(&v.id, &v.target).await;
        unpublish_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        node1
            .publish(&v.id, &v.staging, &v.target, cap.clone(), false)
            .await;
        publish_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let peak_rss_mb = peak_rss_mb.max(status_kb(pid, "VmHWM:")? / 1024.0);

    // 3. Tear down (not timed).
    let mut set = JoinSet::new();
    for v in vols {
        let (mut ctl, mut node, sem, node_id) =
            (ctl.clone(), node.clone(), sem.clone(), node_id.clone());
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            node.unpublish(&v.id, &v.target).await;
            node.unstage(&v.id, &v.staging).await;
            ctl.detach(&v.id, &node_id).await;
            ctl.delete(&v.id).await;
        });
    }
    set.join_all().await;
    let info = node
        .node
        .clone()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    drop(plugin);

    let result = serde_json::json!({
        "volumes": VOLUMES,
        "parallel_requests": PARALLEL,
        "hundred_volumes_seconds": hundred,
        "node_plugin_rss_mb": peak_rss_mb,
        "node_plugin_rss_after_100_mb": rss_now_mb,
        "node_plugin_rss_target_mb": RSS_TARGET_MB,
        "node_plugin_rss_vs_target": peak_rss_mb / RSS_TARGET_MB,
        "publish_median_ms": median(&publish_ms),
        "publish_p90_ms": percentile(&publish_ms, 90.0),
        "unpublish_median_ms": median(&unpublish_ms),
        "unpublish_p90_ms": percentile(&unpublish_ms, 90.0),
        "latency_rounds": LATENCY_ROUNDS,
        "max_volumes_per_node": info.max_volumes_per_node,
        "peer": null,
        "peer_note": "upstream cinder-csi-plugin is not installable offline on this machine",
    });
    let path = write_result("csi", &result)?;

    println!(
        "berth-csi: {VOLUMES} volumes on one node (create + attach + stage(mkfs.ext4) + publish), {PARALLEL} in parallel"
    );
    println!("{:<44} {:>12}", "metric", "value");
    println!("{:<44} {:>12.2}", "100 volumes end to end (s)", hundred);
    println!("{:<44} {:>12.1}", "node plugin peak RSS (MB)", peak_rss_mb);
    println!(
        "{:<44} {:>12.2}",
        "  vs 20 MB target (ratio)",
        peak_rss_mb / RSS_TARGET_MB
    );
    println!(
        "{:<44} {:>12.2}",
        "NodePublish median (ms)",
        median(&publish_ms)
    );
    println!(
        "{:<44} {:>12.2}",
        "NodePublish p90 (ms)",
        percentile(&publish_ms, 90.0)
    );
    println!(
        "{:<44} {:>12.2}",
        "NodeUnpublish median (ms)",
        median(&unpublish_ms)
    );
    println!(
        "{:<44} {:>12.2}",
        "NodeUnpublish p90 (ms)",
        percentile(&unpublish_ms, 90.0)
    );
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}
