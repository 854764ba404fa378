//! The Konnectivity-compatible tunnel client (agent side).
//!
//! The agent dials the tunnel server address(es) with `agentid`, `agentidentifiers` and a bearer
//! token, reads `serverid`/`servercount` and keeps one connection to each of `servercount`
//! distinct replicas (1 s backoff ×1.5 up to 10 s, duplicates closed, and it keeps probing so a
//! new or restarted replica is picked up). On each connection it answers `DIAL_REQ` for
//! destinations in its allow-list only, relays `DATA` with bounded per-stream buffers, and runs
//! the node session (registration, heartbeats, lifecycle commands) of [`crate::node`].
//!
//! Library API for the binary: [`TunnelArgs`] (flatten into the agent's clap struct), [`run`]
//! with a [`Shutdown`] watch channel, [`signals`] to drive it from SIGTERM/SIGINT.
pub mod allow;
pub mod backoff;
mod session;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::IpNet;
use tokio::sync::{Notify, watch};
use tonic::metadata::{Ascii, MetadataValue};

use crate::{
    Error, Result,
    node::{NodeAgent, conditions::Probes},
};
use allow::{AllowEntry, AllowList};
use backoff::Backoff;

/// Tunnel and node-registration flags of `berth-agent` (all optional: without
/// `--tunnel-server` the agent runs without a tunnel).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TunnelArgs {
    /// Tunnel server address(es), `host:port` (the load-balanced address; several are tried in
    /// turn).
    #[arg(
        long = "tunnel-server",
        env = "BERTH_TUNNEL_SERVER",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
    /// File holding the bearer token (service-account token) for the tunnel server.
    #[arg(long, env = "BERTH_TUNNEL_TOKEN_FILE")]
    pub tunnel_token_file: Option<PathBuf>,
    /// CA (PEM) of the tunnel server's certificate: connect with TLS.
    #[arg(long)]
    pub tunnel_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; with --tunnel-key-file.
    #[arg(long, requires = "tunnel_key_file")]
    pub tunnel_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mTLS.
    #[arg(long, requires = "tunnel_cert_file")]
    pub tunnel_key_file: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the host of the address).
    #[arg(long)]
    pub tunnel_server_name: Option<String>,
    /// Agent ID (`agentid`); default: the node name.
    #[arg(long)]
    pub tunnel_agent_id: Option<String>,
    /// Allowed dial destinations, `IP:PORT` or `CIDR:PORT` (`*` = any port). Default: the
    /// kubelet on 127.0.0.1:10250 and <node IP>:10250.
    #[arg(long = "tunnel-allow", value_delimiter = ',')]
    pub tunnel_allow: Vec<String>,
    /// Announce `default-route=true` (serve destinations no other agent claims).
    #[arg(long)]
    pub tunnel_default_route: bool,
    #[arg(long, default_value_t = 5_000)]
    pub tunnel_dial_timeout_ms: u64,
    #[arg(long, default_value_t = 1_000)]
    pub tunnel_backoff_initial_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    pub tunnel_backoff_max_ms: u64,
    /// When connected to `servercount` replicas, probe the address again this often.
    #[arg(long, default_value_t = 10_000)]
    pub tunnel_sync_interval_ms: u64,
    /// The node's IP on the private network: routing to other nodes' pods (IPv4), the tunnel's
    /// agentidentifiers `ipv4`/`ipv6` and allow-list default. [default: the Node object's
    /// InternalIP, else the uplink's first address]
    #[arg(long, env = "BERTH_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// OpenStack instance UUID (default: /var/lib/cloud/data/instance-id, else the node name).
    #[arg(long)]
    pub node_instance_id: Option<String>,
    #[arg(long, default_value = "default")]
    pub node_pool: String,
    #[arg(long, default_value = "b3-16")]
    pub node_flavor: String,
    #[arg(long, default_value = "")]
    pub node_zone: String,
    /// Node label `key=value` (repeatable).
    #[arg(long = "node-label")]
    pub node_labels: Vec<String>,
    /// Node taint `key=value:Effect` (repeatable).
    #[arg(long = "node-taint")]
    pub node_taints: Vec<String>,
    /// Version of the node components reported to the control plane.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub node_version: String,
    /// JSON file `berthctl node` reads.
    #[arg(long, default_value = "/run/berth/node.json")]
    pub node_state_file: PathBuf,
    /// Command run (sh -c, BERTH_VERSION set) for an UPGRADE lifecycle command.
    #[arg(long)]
    pub node_upgrade_hook: Option<String>,
    /// Kubelet healthz address for the KubeletHealthy condition ("none" disables the probe).
    #[arg(long, default_value = "127.0.0.1:10248")]
    pub node_kubelet_healthz: String,
    /// Container runtime socket for ContainerRuntimeHealthy ("none" disables the probe).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub node_runtime_socket: String,
    /// eBPF pin directory for DatapathLoaded ("none" disables the probe).
    #[arg(long, default_value = "/sys/fs/bpf/berth")]
    pub node_datapath_pin: String,
    /// Filesystem checked for DiskPressure.
    #[arg(long, default_value = "/var/lib")]
    pub node_disk_path: PathBuf,
    /// DiskPressure when less than this percentage of --node-disk-path is free (kubelet's
    /// default hard eviction threshold, nodefs.available<10%); 0 never reports pressure.
    #[arg(long, default_value_t = 10.0, value_parser = parse_percent)]
    pub node_disk_min_free_percent: f64,
    /// Heartbeat period in ms (default: the control plane's hint).
    #[arg(long)]
    pub node_heartbeat_ms: Option<u64>,
}

/// Node facts the agent's own configuration owns.
#[derive(Clone, Debug)]
pub struct NodeBasics {
    pub node_name: String,
    pub pod_cidr: Option<IpNet>,
}

/// Shutdown levels: first SIGTERM → `Drain` (DRAIN sent, no new dials, open streams finish),
/// second → `Exit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shutdown {
    Run,
    Drain,
    Exit,
}

/// A shutdown channel starting at [`Shutdown::Run`].
pub fn shutdown_channel() -> (watch::Sender<Shutdown>, watch::Receiver<Shutdown>) {
    watch::channel(Shutdown::Run)
}

/// Drives `tx` from signals: the first SIGTERM/SIGINT drains, the second exits.
pub async fn signals(tx: watch::Sender<Shutdown>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    for level in [Shutdown::Drain, Shutdown::Exit] {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(?level, "signal received");
        let _ = tx.send(level);
    }
    Ok(())
}

/// Counters of the tunnel client.
#[derive(Debug, Default)]
pub struct Stats {
    pub dials_ok: AtomicU64,
    pub dials_refused: AtomicU64,
    pub dials_failed: AtomicU64,
    pub open_streams: AtomicU64,
    pub streams_closed_bad_input: AtomicU64,
    /// Pending dials cancelled by the server (DIAL_CLS).
    pub dials_cancelled: AtomicU64,
    /// Failed attempts to connect to a server (refused, TLS or token rejected, unreachable).
    pub connect_failures: AtomicU64,
}

/// Shared state of the tunnel client.
pub(crate) struct Ctx {
    pub agent_id: String,
    pub identifiers: String,
    /// `Bearer <token>` (sensitive) when token authentication is used.
    pub authorization: Option<MetadataValue<Ascii>>,
    /// TLS (and mTLS) settings for the server connection.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub allow: AllowList,
    pub dial_timeout: Duration,
    pub node: Arc<NodeAgent>,
    pub probes: Probes,
    pub heartbeat: Option<Duration>,
    pub draining: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    /// server id → connection serial
    pub connections: Mutex<HashMap<String, u64>>,
    pub server_count: AtomicU32,
    pub changed: Notify,
}

fn opt_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty() && s != "none").then(|| PathBuf::from(s))
}

/// Reads the first non-empty line of a token file.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("token file {}", path.display()), e))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
        .ok_or_else(|| Error::Config(format!("token file {} is empty", path.display())))
}

/// The `agentidentifiers` value: host, ipv4/ipv6 (node IP), cidr (pod CIDR), default-route.
pub fn identifiers(
    node_name: &str,
    node_ip: Option<IpAddr>,
    pod_cidr: Option<IpNet>,
    default_route: bool,
) -> String {
    let enc = |s: &str| {
        let mut o = String::new();
        for &c in s.as_bytes() {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
                o.push(c as char);
            } else {
                o.push_str(&format!("%{c:02X}"));
            }
        }
        o
    };
    let mut parts = vec![format!("host={}", enc(node_name))];
    if let Some(ip) = node_ip {
        let k = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        parts.push(format!("{k}={}", enc(&ip.to_string())));
    }
    if let Some(c) = pod_cidr {
        parts.push(format!("cidr={}", enc(&c.to_string())));
    }
    if default_route {
        parts.push("default-route=true".into());
    }
    parts.join("&")
}

/// A running tunnel client's handles (for tests and the binary).
#[derive(Clone)]
pub struct TunnelHandle {
    pub node: Arc<NodeAgent>,
    pub stats: Arc<Stats>,
    ctx: Arc<Ctx>,
}

impl TunnelHandle {
    /// Server IDs the agent is connected to.
    pub fn connected_servers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ctx
            .connections
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Builds the client state from the flags.
pub fn prepare(args: &TunnelArgs, basics: &NodeBasics) -> Result<TunnelHandle> {
    if args.servers.is_empty() {
        return Err(Error::Config("no --tunnel-server given".into()));
    }
    if args.tunnel_token_file.is_none() && args.tunnel_cert_file.is_none() {
        return Err(Error::Config(
            "--tunnel-token-file or --tunnel-cert-file is required with --tunnel-server".into(),
        ));
    }
    let authorization = match &args.tunnel_token_file {
        None => None,
        Some(f) => {
            let token = read_token(f)?;
            let mut v: MetadataValue<Ascii> = format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::Config("token is not a valid header value".into()))?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| Error::io(format!("read {}", p.display()), e));
    let tls = match (
        &args.tunnel_ca_file,
        &args.tunnel_cert_file,
        &args.tunnel_key_file,
    ) {
        (None, None, _) => None,
        (ca, cert, key) => {
            let mut cfg = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = ca {
                cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            }
            if let (Some(c), Some(k)) = (cert, key) {
                cfg = cfg.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?));
            }
            if let Some(name) = &args.tunnel_server_name {
                cfg = cfg.domain_name(name.clone());
            }
            Some(cfg)
        }
    };
    let agent_id = args
        .tunnel_agent_id
        .clone()
        .unwrap_or_else(|| basics.node_name.clone());
    let entries = args
        .tunnel_allow
        .iter()
        .map(|s| s.parse::<AllowEntry>().map_err(Error::Config))
        .collect::<Result<Vec<_>>>()?;
    let allow = AllowList::new(entries, vec![basics.node_name.clone()], args.node_ip);
    let instance_id = args.node_instance_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/var/lib/cloud/data/instance-id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| basics.node_name.clone())
    });
    let labels = args
        .node_labels
        .iter()
        .map(|l| crate::node::parse_label(l))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let taints = args
        .node_taints
        .iter()
        .map(|t| crate::node::parse_taint(t))
        .collect::<Result<Vec<_>>>()?;
    let (capacity, reserved, allocatable) =
        crate::node::resources_for(&args.node_flavor, &args.node_disk_path);
    let reg = berth_proto::node::NodeRegistration {
        node_name: basics.node_name.clone(),
        instance_id,
        node_pool: args.node_pool.clone(),
        flavor: args.node_flavor.clone(),
        zone: args.node_zone.clone(),
        labels,
        taints,
        capacity: Some(capacity),
        reserved: Some(reserved),
        allocatable: Some(allocatable),
        version: args.node_version.clone(),
        pod_cidr: basics.pod_cidr.map(|c| c.to_string()).unwrap_or_default(),
        node_ip: args.node_ip.map(|i| i.to_string()).unwrap_or_default(),
    };
    let node = Arc::new(NodeAgent::new(
        reg,
        Some(args.node_state_file.clone()),
        args.node_upgrade_hook.clone(),
    ));
    let kubelet_healthz = match args.node_kubelet_healthz.as_str() {
        "" | "none" => None,
        a => Some(
            a.parse()
                .map_err(|_| Error::Config(format!("bad --node-kubelet-healthz {a:?}")))?,
        ),
    };
    let probes = Probes {
        kubelet_healthz,
        runtime_socket: opt_path(&args.node_runtime_socket),
        datapath_pin: opt_path(&args.node_datapath_pin),
        disk_path: args.node_disk_path.clone(),
        disk_min_free: args.node_disk_min_free_percent / 100.0,
    };
    let stats = Arc::new(Stats::default());
    let ctx = Arc::new(Ctx {
        agent_id,
        identifiers: identifiers(
            &basics.node_name,
            args.node_ip,
            basics.pod_cidr,
            args.tunnel_default_route,
        ),
        authorization,
        tls,
        allow,
        dial_timeout: Duration::from_millis(args.tunnel_dial_timeout_ms),
        node: node.clone(),
        probes,
        heartbeat: args.node_heartbeat_ms.map(Duration::from_millis),
        draining: Arc::new(AtomicBool::new(false)),
        stats: stats.clone(),
        connections: Mutex::new(HashMap::new()),
        server_count: AtomicU32::new(1),
        changed: Notify::new(),
    });
    Ok(TunnelHandle { node, stats, ctx })
}

/// Runs the tunnel client until `shutdown` reaches [`Shutdown::Exit`].
pub async fn run(
    args: TunnelArgs,
    basics: NodeBasics,
    shutdown: watch::Receiver<Shutdown>,
) -> Result<()> {
    let handle = prepare(&args, &basics)?;
    run_prepared(&args, handle, shutdown).await
}

/// [`run`] with a handle from [`prepare`] (lets tests watch the client).
pub async fn run_prepared(
    args: &TunnelArgs,
    handle: TunnelHandle,
    mut shutdown: watch::Receiver<Shutdown>,
) -> Result<()> {
    let ctx = handle.ctx.clone();
    tracing::info!(agent = %ctx.agent_id, servers = ?args.servers, "tunnel client starting");
    let mut backoff = Backoff::new(
        Duration::from_millis(args.tunnel_backoff_initial_ms),
        Duration::from_millis(args.tunnel_backoff_max_ms),
    );
    let sync = Duration::from_millis(args.tunnel_sync_interval_ms.max(100));
    let mut sessions: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut next_addr = 0usize;
    let mut serial = 0u64;
    loop {
        let level = *shutdown.borrow();
        if level == Shutdown::Exit {
            break;
        }
        if level == Shutdown::Drain && !ctx.draining.swap(true, Ordering::Relaxed) {
            tracing::info!("draining: DRAIN sent, no new dials accepted");
            ctx.node.set_draining(true);
        }
        sessions.retain(|s| !s.is_finished());
        let have = ctx.connections.lock().unwrap().len();
        let want = ctx.server_count.load(Ordering::Relaxed).max(1) as usize;
        let draining = ctx.draining.load(Ordering::Relaxed);
        let delay = if have < want && !draining {
            let addr = args.servers[next_addr % args.servers.len()].clone();
            next_addr += 1;
            serial += 1;
            match session::connect(&ctx, &addr, serial).await {
                Ok(conn) => {
                    ctx.server_count
                        .store(conn.server_count.max(1), Ordering::Relaxed);
                    let fresh = {
                        let mut conns = ctx.connections.lock().unwrap();
                        if conns.contains_key(&conn.server_id) {
                            false
                        } else {
                            conns.insert(conn.server_id.clone(), serial);
                            true
                        }
                    };
                    if fresh {
                        tracing::info!(%addr, server = %conn.server_id, count = conn.server_count, "tunnel connected");
                        backoff.reset();
                        sessions.push(tokio::spawn(session::serve(
                            ctx.clone(),
                            conn,
                            shutdown.clone(),
                        )));
                        Duration::ZERO
                    } else {
                        tracing::debug!(%addr, server = %conn.server_id, "duplicate server connection closed");
                        drop(conn);
                        if have + 1 >= want {
                            sync
                        } else {
                            backoff.next_delay()
                        }
                    }
                }
                Err(e) => {
                    ctx.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let d = backoff.next_delay();
                    tracing::warn!(%addr, "tunnel connect failed: {e}; retrying in {d:?}");
                    d
                }
            }
        } else {
            sync
        };
        if delay.is_zero() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.changed.notified() => {}
            r = shutdown.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    tracing::info!("tunnel client stopping");
    // Sessions see Exit themselves; abort whatever does not stop promptly.
    for mut s in sessions {
        if tokio::time::timeout(Duration::from_secs(5), &mut s)
            .await
            .is_err()
        {
            s.abort();
            let _ = s.await;
        }
    }
    Ok(())
}

/// A percentage between 0 and 100.
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 100"))
    }
}
