//! `berth-controlplane serve`: the tunnel server (agents on TCP, frontends on unix sockets), the
//! node API, the lifecycle controller and the status/admin HTTP endpoint, in one process.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use berth_proto::{
    konnectivity::{
        agent_service_server::AgentServiceServer, proxy_service_server::ProxyServiceServer,
    },
    node::node_service_server::NodeServiceServer,
};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::{
    Error, Result,
    lifecycle::{
        LifecycleConfig, Plan, ProvisionRecord, ProvisionRequest, Registry, Timers,
        service::NodeSvc,
        store::{
            Store,
            etcd::{EtcdConfig, EtcdStore},
            memory::MemoryStore,
        },
    },
    tunnel::{
        DEFAULT_WINDOW, TunnelConfig, TunnelServer, agent::AgentSvc, connect, proxy::ProxySvc,
    },
};

/// Largest gRPC message accepted from an agent (a DATA payload above [`crate::tunnel::MAX_DATA_BYTES`]
/// closes only its stream; a message above this ends the agent's connection, which reconnects).
pub const MAX_GRPC_MESSAGE: usize = 16 << 20;

/// HTTP/2 flow-control windows: all of an agent's streams share one gRPC stream, so the default
/// 64 KiB would throttle them (per-stream fairness comes from the tunnel's own credit).
pub const H2_STREAM_WINDOW: u32 = 4 << 20;
pub const H2_CONN_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame accepted from agents (a whole DATA chunk fits in one frame).
pub const H2_MAX_FRAME: u32 = 1 << 20;

/// Accepted TCP connections with Nagle off (small tunnel packets must not wait for ACKs).
fn nodelay(
    l: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(l).map(|r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

/// Flags of `berth-controlplane serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address agents connect to (Konnectivity AgentService + Berth NodeService).
    #[arg(long, default_value = "127.0.0.1:8091", env = "BERTH_AGENT_LISTEN")]
    pub agent_listen: SocketAddr,
    /// Unix socket of the gRPC ProxyService frontend (kube-apiserver's `grpc` mode).
    #[arg(long)]
    pub proxy_uds: Option<PathBuf>,
    /// Unix socket of the HTTP CONNECT frontend (kube-apiserver's `http-connect` mode).
    #[arg(long)]
    pub connect_uds: Option<PathBuf>,
    /// Loopback TCP address of the gRPC ProxyService frontend (local tools and benchmarks only).
    #[arg(long)]
    pub proxy_listen: Option<SocketAddr>,
    /// Loopback TCP address of the HTTP CONNECT frontend (local tools such as curl only).
    #[arg(long)]
    pub connect_listen: Option<SocketAddr>,
    /// Status / admin HTTP endpoint (GET /healthz, GET /v1/status, POST /v1/...).
    #[arg(long, default_value = "127.0.0.1:8092")]
    pub status_listen: SocketAddr,
    /// This replica's ID (`serverid`).
    #[arg(long, default_value = "berth-server-1")]
    pub server_id: String,
    /// Number of replicas behind the agents' server address (`servercount`).
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,
    /// File(s) of accepted agent bearer tokens, one per line. Never logged.
    #[arg(long = "token-file")]
    pub token_files: Vec<PathBuf>,
    /// TLS certificate (PEM) of the agent endpoint; with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the agent endpoint.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs agent client certificates: mTLS, agents without a valid certificate
    /// are refused during the handshake (tokens are then optional).
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Per-stream credit window offered to Berth agents (0 disables the extension).
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: u32,
    /// How long a frontend waits for the agent's DIAL_RSP.
    #[arg(long, default_value_t = 10_000)]
    pub dial_timeout_ms: u64,
    /// Plan of the cluster (auto-healing: free = reinstall in place, standard = replace).
    #[arg(long, value_enum, default_value = "free")]
    pub plan: Plan,
    #[arg(long, default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = 40_000)]
    pub heartbeat_grace_ms: u64,
    /// NotReady for this long → auto-heal (10 minutes).
    #[arg(long, default_value_t = 600_000)]
    pub autoheal_after_ms: u64,
    /// PodDisruptionBudgets are respected for at most this long (10 minutes).
    #[arg(long, default_value_t = 600_000)]
    pub drain_timeout_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    pub pod_start_ms: u64,
    #[arg(long, default_value_t = 1_000)]
    pub tick_ms: u64,
    /// Never lead the lifecycle controller on this replica (it still accepts registrations,
    /// heartbeats and admin requests and shows the registry). With etcd every replica is a
    /// candidate and one elected leader runs the controller; without etcd each replica has its
    /// own registry, and this flag keeps extra replicas from acting on theirs.
    #[arg(long)]
    pub no_lifecycle_controller: bool,
    /// etcd v3 members holding the node registry (comma-separated `host:port` or
    /// `http(s)://host:port`); every replica of the cluster uses the same. Without it the
    /// registry lives in this process only (one replica, lost on restart: the demo's default).
    #[arg(long, env = "BERTH_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster's registry in etcd (one per cluster: clusters may share an
    /// etcd). Keys and values: docs/controlplane-state.md.
    #[arg(long, default_value = "/berth/default")]
    pub etcd_prefix: String,
    /// Deadline of each etcd call (an etcd without quorum fails calls instead of hanging them).
    #[arg(long, default_value_t = 2_000)]
    pub etcd_timeout_ms: u64,
    /// CA (PEM) of the etcd members' certificates (connect with TLS).
    #[arg(long)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd mTLS; with --etcd-key-file.
    #[arg(long, requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Client key (PEM) for etcd mTLS.
    #[arg(long, requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// TTL of this replica's etcd lease in seconds: the leader holds its leadership with it, so
    /// a dead leader is replaced about this long after its last renewal.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i64).range(2..=60))]
    pub lease_ttl_secs: i64,
    /// Command run (with `sh -c`) by the leader for each provisioning request; it gets
    /// BERTH_ACTION, BERTH_REQUEST_ID, BERTH_INSTANCE_ID, BERTH_NODE_NAME, BERTH_POOL,
    /// BERTH_FLAVOR, BERTH_ZONE, BERTH_VERSION. A request reaches the hook at least once (a
    /// leader that dies right after running it may leave it to the next): BERTH_REQUEST_ID is
    /// stable. Without a hook, requests stay listed as pending actions in the status view.
    #[arg(long)]
    pub provision_hook: Option<String>,
}

impl ServeArgs {
    /// Defaults for an in-process control plane (tests): ephemeral loopback ports.
    pub fn local(token: &str) -> (Self, Vec<String>) {
        let args = Self {
            agent_listen: "127.0.0.1:0".parse().expect("addr"),
            proxy_uds: None,
            connect_uds: None,
            proxy_listen: None,
            connect_listen: None,
            status_listen: "127.0.0.1:0".parse().expect("addr"),
            server_id: "berth-server-1".into(),
            server_count: 1,
            token_files: Vec::new(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            window: DEFAULT_WINDOW,
            dial_timeout_ms: 10_000,
            plan: Plan::Free,
            heartbeat_interval_ms: 10_000,
            heartbeat_grace_ms: 40_000,
            autoheal_after_ms: 600_000,
            drain_timeout_ms: 600_000,
            pod_start_ms: 5_000,
            tick_ms: 1_000,
            provision_hook: None,
            no_lifecycle_controller: false,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/berth/default".into(),
            etcd_timeout_ms: 2_000,
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            lease_ttl_secs: 3,
        };
        (args, vec![token.to_string()])
    }

    fn timers(&self) -> Timers {
        Timers {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            heartbeat_grace: Duration::from_millis(self.heartbeat_grace_ms),
            autoheal_after: Duration::from_millis(self.autoheal_after_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            pod_start: Duration::from_millis(self.pod_start_ms),
            tick: Duration::from_millis(self.tick_ms.max(10)),
        }
    }
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// TLS settings of the agent endpoint (mTLS when a client CA is given).
fn tls_config(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read_pem(cert)?, read_pem(key)?),
    );
    if let Some(ca) = &args.client_ca {
        cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read_pem(ca)?));
    }
    Ok(Some(cfg))
}

/// Reads bearer tokens (one per line, `#` comments) from files.
pub fn read_tokens(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::Config(format!("token file {}: {e}", f.display())))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    if tokens.is_empty() {
        return Err(Error::Config("no agent token configured".into()));
    }
    Ok(tokens)
}

/// The registry's store from the flags: etcd when endpoints are given, else in memory.
pub async fn open_store(args: &ServeArgs) -> Result<Arc<dyn Store>> {
    if args.etcd_endpoints.is_empty() {
        return Ok(Arc::new(MemoryStore::new()));
    }
    let store = EtcdStore::connect(EtcdConfig {
        endpoints: args.etcd_endpoints.clone(),
        timeout: Duration::from_millis(args.etcd_timeout_ms.max(100)),
        ca: args.etcd_ca_file.clone(),
        cert: args.etcd_cert_file.clone(),
        key: args.etcd_key_file.clone(),
    })
    .await?;
    Ok(Arc::new(store))
}

/// A running control plane.
pub struct Running {
    pub tunnel: Arc<TunnelServer>,
    pub registry: Arc<Registry>,
    pub agent_addr: SocketAddr,
    pub status_addr: SocketAddr,
    pub proxy_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops every server task and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

fn bind_uds(path: &PathBuf) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Binds every listener and starts the servers. Provisioning requests are returned on the
/// receiver (the binary runs the hook on them; tests play the cloud).
pub async fn start(
    args: &ServeArgs,
    tokens: Vec<String>,
) -> Result<(Running, mpsc::UnboundedReceiver<ProvisionRecord>)> {
    if tokens.is_empty() && args.client_ca.is_none() {
        return Err(Error::Config(
            "no agent authentication configured (--token-file or --client-ca)".into(),
        ));
    }
    let tls = tls_config(args)?;
    for a in [args.proxy_listen, args.connect_listen]
        .into_iter()
        .flatten()
    {
        if !a.ip().is_loopback() {
            return Err(Error::Config(
                "--proxy-listen/--connect-listen are unauthenticated and only allowed on loopback"
                    .into(),
            ));
        }
    }
    let tunnel = TunnelServer::new(TunnelConfig {
        server_id: args.server_id.clone(),
        server_count: args.server_count.max(1),
        tokens,
        mtls: args.client_ca.is_some(),
        dial_timeout: Duration::from_millis(args.dial_timeout_ms),
        window: args.window,
    });
    let (prov_tx, prov_rx) = mpsc::unbounded_channel();
    let store = open_store(args).await?;
    let registry = Registry::new(
        LifecycleConfig {
            plan: args.plan,
            timers: args.timers(),
            server_id: args.server_id.clone(),
            controller: !args.no_lifecycle_controller,
            lease_ttl_secs: args.lease_ttl_secs,
            prefix: args.etcd_prefix.clone(),
        },
        store,
        prov_tx,
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let agent_listener = TcpListener::bind(args.agent_listen).await?;
    let agent_addr = agent_listener.local_addr()?;
    let agent_svc = AgentServiceServer::new(AgentSvc {
        server: tunnel.clone(),
    })
    .max_decoding_message_size(MAX_GRPC_MESSAGE);
    let node_svc = NodeServiceServer::new(NodeSvc {
        registry: registry.clone(),
        tunnel: tunnel.clone(),
    });
    let mut sd = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("agent endpoint TLS: {e}");
                    return;
                }
            };
        }
        let r = builder
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .initial_stream_window_size(Some(H2_STREAM_WINDOW))
            .initial_connection_window_size(Some(H2_CONN_WINDOW))
            .max_frame_size(Some(H2_MAX_FRAME))
            .add_service(agent_svc)
            .add_service(node_svc)
            .serve_with_incoming_shutdown(nodelay(agent_listener), async move {
                let _ = sd.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("agent server: {e}");
        }
    }));

    let proxy_server = || {
        ProxyServiceServer::new(ProxySvc {
            server: tunnel.clone(),
        })
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
    };
    if let Some(path) = &args.proxy_uds {
        let l = bind_uds(path)?;
        let svc = proxy_server();
        let mut sd = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .initial_stream_window_size(Some(H2_STREAM_WINDOW))
                .initial_connection_window_size(Some(H2_CONN_WINDOW))
                .add_service(svc)
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), async move {
                    let _ = sd.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("proxy frontend: {e}");
            }
        }));
    }
    let mut proxy_addr = None;
    if let Some(addr) = args.proxy_listen {
        let l = TcpListener::bind(addr).await?;
        proxy_addr = Some(l.local_addr()?);
        let svc = proxy_server();
        let mut sd = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .initial_stream_window_size(Some(H2_STREAM_WINDOW))
                .initial_connection_window_size(Some(H2_CONN_WINDOW))
                .add_service(svc)
                .serve_with_incoming_shutdown(nodelay(l), async move {
                    let _ = sd.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("proxy frontend: {e}");
            }
        }));
    }
    if let Some(path) = &args.connect_uds {
        let l = bind_uds(path)?;
        tasks.push(tokio::spawn(connect::serve(
            tunnel.clone(),
            connect::Listener::Unix(l),
            shutdown_rx.clone(),
        )));
    }
    if let Some(addr) = args.connect_listen {
        let l = TcpListener::bind(addr).await?;
        tasks.push(tokio::spawn(connect::serve(
            tunnel.clone(),
            connect::Listener::Tcp(l),
            shutdown_rx.clone(),
        )));
    }
    let status_listener = TcpListener::bind(args.status_listen).await?;
    let status_addr = status_listener.local_addr()?;
    tasks.push(tokio::spawn(crate::status::serve(
        status_listener,
        tunnel.clone(),
        registry.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(registry.clone().run(shutdown_rx.clone())));
    tracing::info!(%agent_addr, %status_addr, server_id = %args.server_id, store = %registry.store().describe(), "control plane listening");
    Ok((
        Running {
            tunnel,
            registry,
            agent_addr,
            status_addr,
            proxy_addr,
            shutdown,
            tasks,
        },
        prov_rx,
    ))
}

async fn run_hook(hook: String, rec: ProvisionRecord, registry: Arc<Registry>) {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(&hook).env("BERTH_REQUEST_ID", &rec.id);
    let (action, id, name) = match &rec.request {
        ProvisionRequest::Reinstall {
            instance_id,
            node_name,
        } => ("reinstall", instance_id, node_name),
        ProvisionRequest::Delete {
            instance_id,
            node_name,
        } => ("delete", instance_id, node_name),
        ProvisionRequest::Create {
            instance_id,
            node_name,
            pool,
            flavor,
            zone,
            version,
            ..
        } => {
            cmd.env("BERTH_POOL", pool)
                .env("BERTH_FLAVOR", flavor)
                .env("BERTH_ZONE", zone)
                .env("BERTH_VERSION", version);
            ("create", instance_id, node_name)
        }
    };
    cmd.env("BERTH_ACTION", action)
        .env("BERTH_INSTANCE_ID", id)
        .env("BERTH_NODE_NAME", name)
        .kill_on_drop(true);
    match cmd.status().await {
        Ok(s) if s.success() => {
            tracing::info!(action, node = %name, request = %rec.id, "provision hook done");
            if let Err(e) = registry.provision_done(&rec.id).await {
                tracing::warn!(request = %rec.id, "could not record the finished request: {e}");
            }
        }
        Ok(s) => tracing::warn!(action, node = %name, "provision hook failed: {s}"),
        Err(e) => tracing::warn!(action, node = %name, "provision hook: {e}"),
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run_until_signal(args: ServeArgs) -> Result<()> {
    let tokens = if args.token_files.is_empty() {
        Vec::new()
    } else {
        read_tokens(&args.token_files)?
    };
    let (running, mut prov_rx) = start(&args, tokens).await?;
    let hook = args.provision_hook.clone();
    let registry = running.registry.clone();
    tokio::spawn(async move {
        while let Some(rec) = prov_rx.recv().await {
            match &hook {
                Some(h) => {
                    tokio::spawn(run_hook(h.clone(), rec, registry.clone()));
                }
                None => {
                    tracing::info!(request = %rec.id, req = ?rec.request, "provisioning request (no hook: listed as pending)")
                }
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}
