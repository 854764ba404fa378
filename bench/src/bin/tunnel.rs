//! Tunnel benchmark: throughput and per-dial latency through the control plane's HTTP CONNECT
//! frontend → tunnel → agent, against a direct TCP connection to the same server, interleaved
//! round by round in one run; and the agent's RSS with 1 000 open streams.
//!
//! The control plane runs in this process (library), the agent in a child process (this binary
//! re-executed with `--agent-child`, so its RSS is the tunnel client's alone), the target server in
//! this process; everything on 127.0.0.1. Writes `bench/results/tunnel.json`.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use berth_bench::{median, percentile, write_result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixStream},
};

const TOKEN: &str = "bench-token-7c1e";
const ROUNDS: usize = 5;
const BYTES: u64 = 256 * 1024 * 1024;
const DIALS: usize = 300;
const STREAMS: usize = 1000;

/// Target server: `N\n` → N bytes then close; `hold\n` → keeps the connection open, silent.
async fn target_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while !line.ends_with(b"\n") && line.len() < 64 {
                    if !matches!(s.read(&mut b).await, Ok(1)) {
                        return;
                    }
                    line.push(b[0]);
                }
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text == "hold" {
                    let mut sink = [0u8; 16];
                    let _ = s.read(&mut sink).await;
                    return;
                }
                let n: u64 = text.parse().unwrap_or(0);
                let buf = vec![0x5au8; 256 * 1024];
                let mut off = 0;
                while off < n {
                    let k = (n - off).min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    off += k as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A plain one-hop userspace TCP relay (what any proxy in the path costs), for context.
async fn relay(target: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 256 << 10, 256 << 10)
                        .await;
            });
        }
    });
    Ok(addr)
}

async fn via_tunnel(uds: &Path, target: SocketAddr) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            bail!("EOF in CONNECT response");
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

async fn transfer<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    mut s: S,
    n: u64,
) -> anyhow::Result<u64> {
    s.write_all(format!("{n}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    Ok(got)
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_child(args: &[String]) -> anyhow::Result<()> {
    // --agent-child <server> <token file> <state dir> <allow>
    let [server, token, dir, allow] = args else {
        bail!("usage: tunnel --agent-child SERVER TOKEN_FILE DIR ALLOW");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let args = berth_agent::tunnel::TunnelArgs {
            servers: vec![server.clone()],
            tunnel_token_file: Some(PathBuf::from(token)),
            tunnel_allow: vec![allow.clone()],
            tunnel_default_route: true,
            tunnel_dial_timeout_ms: 5_000,
            tunnel_backoff_initial_ms: 200,
            tunnel_backoff_max_ms: 1_000,
            tunnel_sync_interval_ms: 10_000,
            node_pool: "bench".into(),
            node_flavor: "b3-16".into(),
            node_version: "bench".into(),
            node_state_file: PathBuf::from(dir).join("node.json"),
            node_kubelet_healthz: "none".into(),
            node_runtime_socket: "none".into(),
            node_datapath_pin: "none".into(),
            node_disk_path: PathBuf::from(dir),
            node_disk_min_free_percent: 0.0,
            ..Default::default()
        };
        let basics = berth_agent::tunnel::NodeBasics {
            node_name: "bench-node".into(),
            pod_cidr: None,
        };
        let (tx, rx) = berth_agent::tunnel::shutdown_channel();
        tokio::spawn(berth_agent::tunnel::signals(tx));
        berth_agent::tunnel::run(args, basics, rx).await
    })?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--agent-child") {
        return agent_child(&argv[2..]);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("connect.sock");
    let (mut args, tokens) = berth_controlplane::serve::ServeArgs::local(TOKEN);
    args.connect_uds = Some(uds.clone());
    let (cp, _prov) = berth_controlplane::serve::start(&args, tokens).await?;
    let target = target_server().await?;
    let relayed = relay(target).await?;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN)?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--agent-child")
        .arg(cp.agent_addr.to_string())
        .arg(&token)
        .arg(dir.path())
        .arg(target.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn agent child")?;
    let agent_pid = child.id();
    let _child = ChildGuard(child);
    let end = Instant::now() + Duration::from_secs(30);
    while cp.tunnel.agents().is_empty() {
        if Instant::now() > end {
            bail!("agent did not connect");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Throughput, interleaved rounds.
    let mut direct_mbps = Vec::new();
    let mut tunnel_mbps = Vec::new();
    let mut relay_mbps = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let n = transfer(TcpStream::connect(relayed).await?, BYTES).await?;
        anyhow::ensure!(n == BYTES, "relay got {n}");
        relay_mbps.push(BYTES as f64 / 1e6 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let n = transfer(TcpStream::connect(target).await?, BYTES).await?;
        anyhow::ensure!(n == BYTES, "direct got {n}");
        direct_mbps.push(BYTES as f64 / 1e6 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let n = transfer(via_tunnel(&uds, target).await?, BYTES).await?;
        anyhow::ensure!(n == BYTES, "tunnel got {n}");
        tunnel_mbps.push(BYTES as f64 / 1e6 / t.elapsed().as_secs_f64());
    }

    // Per-dial latency: dial + first byte back, interleaved.
    let mut direct_ms = Vec::new();
    let mut tunnel_ms = Vec::new();
    for _ in 0..DIALS {
        let t = Instant::now();
        let n = transfer(TcpStream::connect(target).await?, 1).await?;
        anyhow::ensure!(n == 1);
        direct_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let n = transfer(via_tunnel(&uds, target).await?, 1).await?;
        anyhow::ensure!(n == 1);
        tunnel_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Agent RSS with 1 000 open streams.
    let rss_idle = rss_mb(agent_pid)?;
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut s = via_tunnel(&uds, target).await?;
        s.write_all(b"hold\n").await?;
        held.push(s);
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let open: usize = cp.tunnel.agents().iter().map(|a| a.open_streams).sum();
        if open >= STREAMS {
            break;
        }
        if Instant::now() > end {
            bail!("only {open} streams open");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_1k = rss_mb(agent_pid)?;
    drop(held);

    let thr_ratio = median(&tunnel_mbps) / median(&direct_mbps);
    let dial_overhead = median(&tunnel_ms) - median(&direct_ms);
    println!(
        "Berth tunnel vs direct TCP (127.0.0.1, {ROUNDS} rounds of {} MiB, {DIALS} dials, interleaved)",
        BYTES >> 20
    );
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "metric", "direct", "tunnel", "ratio"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>10.2}",
        "throughput MB/s (median)",
        median(&direct_mbps),
        median(&tunnel_mbps),
        thr_ratio
    );
    println!(
        "{:<34} {:>12.0} {:>12} {:>10.2}",
        "  context: one-hop TCP relay MB/s",
        median(&relay_mbps),
        "-",
        median(&relay_mbps) / median(&direct_mbps)
    );
    println!(
        "{:<34} {:>12.3} {:>12.3} {:>10}",
        "dial + first byte ms (median)",
        median(&direct_ms),
        median(&tunnel_ms),
        format!("+{dial_overhead:.3}")
    );
    println!(
        "{:<34} {:>12.3} {:>12.3}",
        "dial + first byte ms (p95)",
        percentile(&direct_ms, 95.0),
        percentile(&tunnel_ms, 95.0)
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "agent RSS MB, idle", "-", rss_idle
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "agent RSS MB, 1000 open streams", "-", rss_1k
    );
    let path = write_result(
        "tunnel",
        &serde_json::json!({
            "throughput_ratio": thr_ratio,
            "dial_overhead_ms_median": dial_overhead,
            "agent_rss_mb_1k_streams": rss_1k,
            "agent_rss_mb_idle": rss_idle,
            "throughput_mbps_direct": direct_mbps,
            "throughput_mbps_tunnel": tunnel_mbps,
            "throughput_mbps_one_hop_relay": relay_mbps,
            "relay_throughput_ratio": median(&relay_mbps) / median(&direct_mbps),
            "dial_ms_direct_median": median(&direct_ms),
            "dial_ms_tunnel_median": median(&tunnel_ms),
            "dial_ms_direct_p95": percentile(&direct_ms, 95.0),
            "dial_ms_tunnel_p95": percentile(&tunnel_ms, 95.0),
            "rounds": ROUNDS,
            "bytes_per_round": BYTES,
            "dials": DIALS,
            "streams": STREAMS,
            "targets": {"throughput_ratio_min": 0.8, "dial_overhead_ms_max": 1.0, "agent_rss_mb_max": 30.0},
        }),
    )?;
    println!("wrote {}", path.display());
    cp.stop().await;
    Ok(())
}
