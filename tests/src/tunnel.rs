//! Helpers for the tunnel and lifecycle tests: a control-plane namespace and a node namespace
//! joined by a veth pair, tokio runtimes whose threads live inside a namespace (the agent and the
//! kubelet-like servers run there), the kubelet-like HTTPS server, a plain "chatter" server, and
//! clients for both frontends (HTTP CONNECT and gRPC ProxyService on unix sockets).
//!
//! Everything is owned by guards: namespaces are deleted, processes killed and runtimes shut
//! down on drop, also when a test fails.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_agent::tunnel::{NodeBasics, Shutdown, TunnelArgs, TunnelHandle};
use berth_proto::konnectivity::{
    Data, DialRequest, Packet, PacketType, packet::Payload,
    proxy_service_client::ProxyServiceClient,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

use crate::netns::{NetNs, run_ok, unique_name};

/// The token the tests' control planes accept.
pub const TOKEN: &str = "berth-test-token-3f9a";
/// Control-plane side of the veth pair.
pub const CP_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Extra control-plane addresses for replicas.
pub const CP_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 1),
    Ipv4Addr::new(10, 99, 0, 3),
    Ipv4Addr::new(10, 99, 0, 4),
];
/// Node side of the veth pair (the node IP).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Port of the plain chatter server on the node.
pub const CHATTER_PORT: u16 = 10255;

/// Byte `i` of the deterministic test stream.
pub fn pattern_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 56) as u8) ^ (i as u8)
}

/// Fills `buf` with the test stream from offset `off`.
pub fn fill_pattern(off: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(off + k as u64);
    }
}

/// Offset of the first byte of `buf` that differs from the stream at `off`.
pub fn check_pattern(off: u64, buf: &[u8]) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(k, b)| **b != pattern_byte(off + *k as u64))
        .map(|(k, _)| off + k as u64)
}

/// Polls `f` every 50 ms until it holds; panics after `limit` (a liveness bound, not a timing
/// assertion).
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// Async version of [`wait_until`].
pub async fn wait_until_async<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Two namespaces joined by a veth pair: `cp` (10.99.0.1, .3, .4) and `node` (10.99.0.2).
pub struct Topology {
    pub node: NetNs,
    pub cp: NetNs,
}

impl Topology {
    pub fn new() -> Self {
        let cp = NetNs::new("bcp");
        let node = NetNs::new("bnd");
        let a = unique_name("bva");
        let b = unique_name("bvb");
        run_ok(Command::new("ip").args([
            "link", "add", &a, "netns", &cp.name, "type", "veth", "peer", "name", &b, "netns",
            &node.name,
        ]));
        for ip in CP_IPS {
            cp.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &a]);
        }
        cp.exec_ok(&["ip", "link", "set", &a, "up"]);
        node.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", &b]);
        node.exec_ok(&["ip", "link", "set", &b, "up"]);
        Topology { node, cp }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A tokio runtime whose threads all live in a network namespace (sockets it opens belong
/// there). Shut down on drop.
pub struct NsRuntime {
    pub handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    /// `ns` = None: the current namespace.
    pub fn new(ns: Option<&Path>) -> Self {
        let ns = ns.map(Path::to_path_buf);
        let (htx, hrx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Some(path) = ns {
                let f = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            htx.send(rt.handle().clone()).expect("send handle");
            rt.block_on(async move {
                let _ = stop_rx.await;
            });
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let handle = hrx.recv().expect("runtime handle");
        NsRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `fut` on the namespace's runtime and waits for it from async code.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut).await.expect("task in namespace")
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Kills the process now (a control-plane replica "crashes").
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Last lines of the process's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the test token file.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join(format!("token-{}", token.len()));
    std::fs::write(&p, format!("{token}\n")).expect("token file");
    p
}

/// Where a control-plane replica listens.
#[derive(Clone, Debug)]
pub struct CpAddrs {
    pub agent: SocketAddr,
    pub status: SocketAddr,
    pub proxy_uds: PathBuf,
    pub connect_uds: PathBuf,
}

/// Starts `berth-controlplane serve` inside `ns` listening on `ip`, with frontends in `dir`.
pub fn spawn_controlplane(
    ns: &NetNs,
    ip: Ipv4Addr,
    server_id: &str,
    server_count: u32,
    dir: &Path,
    extra: &[&str],
) -> (Proc, CpAddrs) {
    let bin = crate::netns::workspace_bin("berth-controlplane");
    let addrs = CpAddrs {
        agent: SocketAddr::new(IpAddr::V4(ip), 8091),
        status: SocketAddr::new(IpAddr::V4(ip), 8092),
        proxy_uds: dir.join(format!("{server_id}-proxy.sock")),
        connect_uds: dir.join(format!("{server_id}-connect.sock")),
    };
    let tokens = token_file(dir, TOKEN);
    let log = dir.join(format!("{server_id}.log"));
    let logf = std::fs::File::create(&log).expect("log file");
    let child = ns
        .command(bin.to_str().expect("utf8 path"))
        .args(["serve", "--agent-listen", &addrs.agent.to_string()])
        .args(["--status-listen", &addrs.status.to_string()])
        .args(["--proxy-uds", addrs.proxy_uds.to_str().expect("utf8")])
        .args(["--connect-uds", addrs.connect_uds.to_str().expect("utf8")])
        .args(["--server-id", server_id])
        .args(["--server-count", &server_count.to_string()])
        .args(["--token-file", tokens.to_str().expect("utf8")])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn berth-controlplane");
    let proc = Proc {
        child: Some(child),
        log,
    };
    let (p, c) = (addrs.proxy_uds.clone(), addrs.connect_uds.clone());
    let mut proc = proc;
    let end = Instant::now() + Duration::from_secs(30);
    while !(p.exists() && c.exists()) {
        if let Some(Ok(Some(st))) = proc.child.as_mut().map(|c| c.try_wait()) {
            panic!("berth-controlplane exited: {st}\n{}", proc.log_tail());
        }
        assert!(
            Instant::now() < end,
            "control plane did not start:\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, addrs)
}

/// Tunnel flags for a test agent: probes off, fast reconnects, state file in `dir`.
pub fn agent_args(
    servers: Vec<String>,
    token: &Path,
    dir: &Path,
    allow: Vec<String>,
) -> TunnelArgs {
    TunnelArgs {
        servers,
        tunnel_token_file: Some(token.to_path_buf()),
        tunnel_ca_file: None,
        tunnel_cert_file: None,
        tunnel_key_file: None,
        tunnel_server_name: None,
        tunnel_agent_id: None,
        tunnel_allow: allow,
        // Serves destinations no agent claims by address (the tests also dial 127.0.0.1).
        tunnel_default_route: true,
        tunnel_dial_timeout_ms: 5_000,
        tunnel_backoff_initial_ms: 200,
        tunnel_backoff_max_ms: 1_000,
        tunnel_sync_interval_ms: 500,
        node_ip: Some(IpAddr::V4(NODE_IP)),
        node_instance_id: None,
        node_pool: "pool-a".into(),
        node_flavor: "b3-16".into(),
        node_zone: "zone-a".into(),
        node_labels: vec!["role=worker".into()],
        node_taints: vec![],
        node_version: "1.0.0".into(),
        node_state_file: dir.join("node.json"),
        node_upgrade_hook: None,
        node_kubelet_healthz: "none".into(),
        node_runtime_socket: "none".into(),
        node_datapath_pin: "none".into(),
        node_disk_path: dir.to_path_buf(),
        // The tests' directories sit on the machine's disk, whose free space they cannot
        // control; the lifecycle suite probes DiskPressure on a tmpfs it owns (TestDisk).
        node_disk_min_free_percent: 0.0,
        node_heartbeat_ms: Some(200),
    }
}

/// A tunnel client running on a runtime; `Exit` on drop.
pub struct AgentGuard {
    pub shutdown: watch::Sender<Shutdown>,
    pub handle: TunnelHandle,
    task: Option<tokio::task::JoinHandle<berth_agent::Result<()>>>,
}

impl AgentGuard {
    /// Starts the agent's tunnel on `rt` (inside the runtime's namespace).
    pub fn start(rt: &tokio::runtime::Handle, args: TunnelArgs, node_name: &str) -> Self {
        Self::start_with_cidr(rt, args, node_name, "10.2.7.0/24")
    }

    /// [`AgentGuard::start`] with the node's pod CIDR (announced as `cidr`).
    pub fn start_with_cidr(
        rt: &tokio::runtime::Handle,
        args: TunnelArgs,
        node_name: &str,
        pod_cidr: &str,
    ) -> Self {
        let basics = NodeBasics {
            node_name: node_name.into(),
            pod_cidr: Some(pod_cidr.parse().expect("cidr")),
        };
        let handle = berth_agent::tunnel::prepare(&args, &basics).expect("agent config");
        let (tx, rx) = berth_agent::tunnel::shutdown_channel();
        let h = handle.clone();
        let task = rt.spawn(async move { berth_agent::tunnel::run_prepared(&args, h, rx).await });
        AgentGuard {
            shutdown: tx,
            handle,
            task: Some(task),
        }
    }

    /// Sends `Exit` and waits for the client to stop.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(Shutdown::Exit);
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("agent stops after Exit");
            r.expect("agent task").expect("agent result");
        }
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.shutdown.send(Shutdown::Exit);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// TLS material for the kubelet-like server: a self-signed certificate for its addresses.
pub struct Tls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["kubelet.test".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(NODE_IP)));
        let cert = params.self_signed(&key).expect("self-signed");
        let der = cert.der().clone();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
        );
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key_der)
            .expect("server cert");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    /// TLS client handshake over `io` to the kubelet at `ip`.
    pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: IO,
        ip: IpAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<IO>> {
        let connector = tokio_rustls::TlsConnector::from(self.client.clone());
        connector
            .connect(rustls::pki_types::ServerName::IpAddress(ip.into()), io)
            .await
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads an HTTP/1.x head (up to the blank line) byte by byte, so nothing after it is consumed.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF in HTTP head: {:?}", String::from_utf8_lossy(&head)),
            ));
        }
        head.push(b[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("HTTP head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn content_length(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let head = read_head(&mut s).await?;
    let line = head.lines().next().unwrap_or("").to_string();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path) {
        ("GET", "/healthz") => {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await?;
        }
        ("GET", p) if p.starts_with("/data/") => {
            let n: u64 = p[6..].parse().unwrap_or(0);
            s.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while off < n {
                let k = (n - off).min(buf.len() as u64) as usize;
                fill_pattern(off, &mut buf[..k]);
                s.write_all(&buf[..k]).await?;
                off += k as u64;
            }
        }
        ("POST", "/verify") => {
            // Checks an upload against the test stream.
            let n = content_length(&head).unwrap_or(0);
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            let mut bad = None;
            while off < n {
                let k = (n - off).min(buf.len() as u64) as usize;
                s.read_exact(&mut buf[..k]).await?;
                if bad.is_none() {
                    bad = check_pattern(off, &buf[..k]);
                }
                off += k as u64;
            }
            let body = match bad {
                None => format!("match {n}"),
                Some(at) => format!("mismatch at {at}"),
            };
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
        }
        _ => {
            s.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        }
    }
    s.flush().await?;
    s.shutdown().await
}

/// Starts the kubelet-like HTTPS server on `addrs` (call on the node's runtime).
pub async fn start_kubelet(addrs: Vec<SocketAddr>, tls: Arc<rustls::ServerConfig>) {
    for addr in addrs {
        let l = TcpListener::bind(addr).await.expect("bind kubelet");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(sock).await {
                        let _ = serve_http(tls).await;
                    }
                });
            }
        });
    }
}

/// Progress of the chatter server: bytes written per request ID, and finished IDs.
#[derive(Default)]
pub struct ChatterStats {
    pub written: Mutex<HashMap<String, u64>>,
    pub finished: Mutex<Vec<String>>,
}

/// Starts the plain chatter server on `addr`: a client sends `ID N\n`, gets N bytes of the test
/// stream, then the connection closes.
pub async fn start_chatter(addr: SocketAddr) -> Arc<ChatterStats> {
    let stats = Arc::new(ChatterStats::default());
    let l = TcpListener::bind(addr).await.expect("bind chatter");
    let st = stats.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while !line.ends_with(b"\n") && line.len() < 100 {
                    match sock.read(&mut b).await {
                        Ok(1) => line.push(b[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&line).trim().to_string();
                let mut parts = text.split_whitespace();
                let id = parts.next().unwrap_or("").to_string();
                let n: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                let mut buf = vec![0u8; 16 * 1024];
                let mut off = 0u64;
                while off < n {
                    let k = (n - off).min(buf.len() as u64) as usize;
                    fill_pattern(off, &mut buf[..k]);
                    if sock.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    off += k as u64;
                    st.written.lock().unwrap().insert(id.clone(), off);
                }
                let _ = sock.shutdown().await;
                st.finished.lock().unwrap().push(id);
            });
        }
    });
    stats
}

/// Opens a connection to `target` through the HTTP CONNECT frontend. `Err` carries the status
/// line and body of a refusal.
pub async fn connect_via_http(uds: &Path, target: &str) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let head = read_head(&mut s).await.map_err(|e| e.to_string())?;
    let status = head.lines().next().unwrap_or("").to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(s);
    }
    let mut body = vec![0u8; content_length(&head).unwrap_or(0).min(4096) as usize];
    let _ = s.read_exact(&mut body).await;
    Err(format!(
        "{status}: {}",
        String::from_utf8_lossy(&body).trim()
    ))
}

/// A gRPC channel to a ProxyService on a unix socket.
pub async fn proxy_channel(uds: &Path) -> tonic::transport::Channel {
    let path = uds.to_path_buf();
    tonic::transport::Endpoint::from_static("http://frontend.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect ProxyService socket")
}

/// Opens a connection to `target` through `ProxyService.Proxy`; the returned duplex end carries
/// the bytes (pumped to and from DATA packets). `Err` carries the DIAL_RSP error.
pub async fn dial_via_grpc(
    channel: tonic::transport::Channel,
    target: &str,
) -> Result<tokio::io::DuplexStream, String> {
    let (tx, rx) = mpsc::channel::<Packet>(64);
    tx.send(Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: target.into(),
            random: 4242,
        })),
    })
    .await
    .expect("queue DIAL_REQ");
    let mut client = ProxyServiceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut inbound = client
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("Proxy: {s}"))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|s| format!("Proxy: {s}"))?
        .ok_or("Proxy stream ended before DIAL_RSP")?;
    let rsp = match first.payload {
        Some(Payload::DialResponse(r)) => r,
        other => return Err(format!("expected DIAL_RSP, got {other:?}")),
    };
    if !rsp.error.is_empty() {
        return Err(rsp.error);
    }
    assert_eq!(rsp.random, 4242, "DIAL_RSP echoes random");
    let id = rsp.connect_id;
    let (mine, theirs) = tokio::io::duplex(256 * 1024);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let p = Packet {
                        r#type: PacketType::Data as i32,
                        payload: Some(Payload::Data(Data {
                            connect_id: id,
                            error: String::new(),
                            data: buf[..n].to_vec().into(),
                        })),
                    };
                    if tx.send(p).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Keep the request stream open until the response side ends.
        tx.closed().await;
    });
    tokio::spawn(async move {
        while let Ok(Some(p)) = inbound.message().await {
            match p.payload {
                Some(Payload::Data(d)) if wr.write_all(&d.data).await.is_err() => break,
                Some(Payload::CloseResponse(_)) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    });
    Ok(mine)
}

/// GET over an established (TLS) stream; returns (body length, first mismatch).
pub async fn http_get_pattern<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    n: u64,
) -> Result<(u64, Option<u64>), String> {
    s.write_all(
        format!("GET /data/{n} HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let head = read_head(s).await.map_err(|e| e.to_string())?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response {head:?}"));
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    let mut bad = None;
    loop {
        let k = match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if off == n => {
                // Some peers close without close_notify after the full body.
                let _ = e;
                break;
            }
            Err(e) => return Err(format!("read after {off} bytes: {e}")),
        };
        if bad.is_none() {
            bad = check_pattern(off, &buf[..k]);
        }
        off += k as u64;
    }
    Ok((off, bad))
}

/// POST `n` bytes of the test stream to `/verify`; returns the server's verdict.
pub async fn http_post_pattern<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    n: u64,
) -> Result<String, String> {
    s.write_all(
        format!("POST /verify HTTP/1.1\r\nHost: kubelet\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        fill_pattern(off, &mut buf[..k]);
        s.write_all(&buf[..k])
            .await
            .map_err(|e| format!("write at {off}: {e}"))?;
        off += k as u64;
    }
    s.flush().await.map_err(|e| e.to_string())?;
    let head = read_head(s).await.map_err(|e| e.to_string())?;
    let len = content_length(&head).unwrap_or(0) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `GET /v1/status` of a control plane (run from inside its namespace).
pub async fn cp_status(addr: SocketAddr) -> serde_json::Value {
    let (code, body) = berth_controlplane::status::http_request(addr, "GET", "/v1/status", None)
        .await
        .expect("status request");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// PEM files of a test PKI: a CA, a server certificate for `server_ip`, a client certificate.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Writes a fresh PKI into `dir` (file names prefixed with `name`).
    pub fn new(dir: &Path, name: &str, server_ip: IpAddr) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let srv_key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec!["berth-controlplane".to_string()]).expect("params");
        p.subject_alt_names.push(SanType::IpAddress(server_ip));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let srv = p.signed_by(&srv_key, &ca, &ca_key).expect("server cert");
        let cl_key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name
            .push(DnType::CommonName, format!("{name}-agent"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cl = p.signed_by(&cl_key, &ca, &ca_key).expect("client cert");
        let w = |f: &str, text: String| {
            let path = dir.join(format!("{name}-{f}"));
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        Pki {
            ca: w("ca.pem", ca.pem()),
            server_cert: w("server.pem", srv.pem()),
            server_key: w("server-key.pem", srv_key.serialize_pem()),
            client_cert: w("client.pem", cl.pem()),
            client_key: w("client-key.pem", cl_key.serialize_pem()),
        }
    }
}

/// A small tmpfs the test mounts and owns: the agent's DiskPressure probe looks at it instead of
/// the machine's own disk, whose free space a test cannot control (a CI machine with less than
/// 10 % free would otherwise report every node under DiskPressure). Unmounted on drop.
pub struct TestDisk {
    dir: tempfile::TempDir,
}

impl TestDisk {
    /// Mounts a `size_mib` MiB tmpfs on a fresh directory.
    pub fn mount(size_mib: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-disk-")
            .tempdir()
            .expect("tempdir");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size_mib}m").as_str()),
        )
        .expect("mount the test's tmpfs (needs root)");
        TestDisk { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem until less than `free_fraction` of it is free (one file, `fill`).
    pub fn fill_until_free_below(&self, free_fraction: f64) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("fill")).expect("fill file");
        let chunk = vec![0xa5u8; 256 * 1024];
        loop {
            let st = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
            let free = st.blocks_available() as f64 / st.blocks().max(1) as f64;
            if free < free_fraction {
                break;
            }
            f.write_all(&chunk).expect("write fill");
            f.flush().ok();
        }
    }

    /// Frees what [`TestDisk::fill_until_free_below`] took.
    pub fn drain(&self) {
        std::fs::remove_file(self.path().join("fill")).expect("remove fill");
    }
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
