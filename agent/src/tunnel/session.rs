//! One tunnel connection to one server replica: the packet loop, dials, per-stream relays.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use berth_proto::konnectivity::{
    CloseResponse, Data, DialRequest, DialResponse, Drain, Packet, PacketType, WindowUpdate,
    agent_service_client::AgentServiceClient, packet::Payload,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, tcp::OwnedReadHalf},
    sync::{Semaphore, mpsc, watch},
    task::AbortHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming, metadata::MetadataValue, transport::Channel};

use super::{Ctx, Shutdown};
use crate::{Error, Result};

/// Largest DATA payload accepted from the server; a bigger one closes its stream.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// Largest read forwarded in one DATA packet.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Receive buffer per stream when the server does not speak the credit extension.
pub const UNCREDITED_BUFFER_LIMIT: usize = 4 << 20;
const FLOW_CONTROL_KEY: &str = "berth-flow-control";
/// Packets queued towards the server, shared by all streams of a connection (with chunks of at
/// most 256 KiB this bounds the queue to 16 MiB; a full queue holds the readers back).
const OUTBOUND_PACKETS: usize = 64;
const MAX_GRPC_MESSAGE: usize = 16 << 20;

/// A freshly connected stream to a server, before it is accepted as a session.
pub(super) struct Connection {
    pub server_id: String,
    pub server_count: u32,
    serial: u64,
    channel: Channel,
    inbound: Streaming<Packet>,
    tx: mpsc::Sender<Packet>,
    window: Option<u32>,
}

/// Dials `addr` and opens `AgentService.Connect`.
pub(super) async fn connect(ctx: &Ctx, addr: &str, serial: u64) -> Result<Connection> {
    let scheme = if ctx.tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Error::Tunnel(format!("bad server address {addr:?}: {e}")))?;
    if let Some(tls) = &ctx.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::Tunnel(format!("TLS settings: {e}")))?;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(1 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Error::Tunnel(format!("connect {addr}: {e}")))?;
    let (tx, rx) = mpsc::channel::<Packet>(OUTBOUND_PACKETS);
    let mut req = Request::new(ReceiverStream::new(rx));
    let md = req.metadata_mut();
    md.insert(
        "agentid",
        MetadataValue::try_from(ctx.agent_id.as_str())
            .map_err(|_| Error::Config("agent id is not a valid header".into()))?,
    );
    md.insert(
        "agentidentifiers",
        MetadataValue::try_from(ctx.identifiers.as_str())
            .map_err(|_| Error::Config("identifiers are not a valid header".into()))?,
    );
    if let Some(a) = &ctx.authorization {
        md.insert("authorization", a.clone());
    }
    md.insert(FLOW_CONTROL_KEY, MetadataValue::from_static("1"));
    let mut client =
        AgentServiceClient::new(channel.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE);
    let resp = client.connect(req).await.map_err(|s| {
        Error::Tunnel(format!(
            "server refused the connection: {:?}: {}",
            s.code(),
            s.message()
        ))
    })?;
    let header = |k: &str| {
        let v: Vec<_> = resp.metadata().get_all(k).iter().collect();
        (v.len() == 1)
            .then(|| v[0].to_str().ok().map(String::from))
            .flatten()
    };
    let server_id = header("serverid")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::Tunnel("server sent no single serverid header".into()))?;
    let server_count = header("servercount")
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| Error::Tunnel("server sent no single valid servercount header".into()))?;
    let window = header(FLOW_CONTROL_KEY)
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|w| *w >= CHUNK_BYTES as u32);
    Ok(Connection {
        server_id,
        server_count,
        serial,
        channel,
        inbound: resp.into_inner(),
        tx,
        window,
    })
}

struct StreamState {
    to_sock: mpsc::UnboundedSender<bytes::Bytes>,
    queued: Arc<AtomicUsize>,
    credit: Option<Arc<Semaphore>>,
    reader: AbortHandle,
}

struct Session {
    ctx: Arc<Ctx>,
    server_id: String,
    tx: mpsc::Sender<Packet>,
    window: Option<u32>,
    next_id: AtomicI64,
    streams: Mutex<HashMap<i64, StreamState>>,
    pending: Mutex<HashMap<i64, AbortHandle>>,
}

fn packet(kind: PacketType, payload: Payload) -> Packet {
    Packet {
        r#type: kind as i32,
        payload: Some(payload),
    }
}

fn close_rsp(connect_id: i64, error: String) -> Packet {
    packet(
        PacketType::CloseRsp,
        Payload::CloseResponse(CloseResponse { error, connect_id }),
    )
}

impl Session {
    /// Queues a packet without blocking the packet loop.
    fn send_nowait(&self, p: Packet) {
        if let Err(mpsc::error::TrySendError::Full(p)) = self.tx.try_send(p) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(p).await;
            });
        }
    }

    fn dial_error(&self, random: i64, error: String) {
        self.send_nowait(packet(
            PacketType::DialRsp,
            Payload::DialResponse(DialResponse {
                error,
                connect_id: 0,
                random,
            }),
        ));
    }

    fn remove_stream(&self, id: i64) -> bool {
        match self.streams.lock().unwrap().remove(&id) {
            Some(s) => {
                s.reader.abort();
                if let Some(c) = &s.credit {
                    c.close();
                }
                self.ctx.stats.open_streams.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn close_bad(&self, id: i64, reason: String) {
        tracing::warn!(server = %self.server_id, connect_id = id, %reason, "closing stream");
        self.ctx
            .stats
            .streams_closed_bad_input
            .fetch_add(1, Ordering::Relaxed);
        self.remove_stream(id);
        self.send_nowait(close_rsp(id, reason));
    }

    fn handle(self: &Arc<Self>, p: Packet) {
        let kind = PacketType::try_from(p.r#type).ok();
        match (kind, p.payload) {
            (Some(PacketType::DialReq), Some(Payload::DialRequest(d))) => self.on_dial(d),
            (Some(PacketType::Data), Some(Payload::Data(d))) => {
                let streams = self.streams.lock().unwrap();
                let Some(s) = streams.get(&d.connect_id) else {
                    drop(streams);
                    // Upstream: DATA for an unknown connection is answered with CLOSE_RSP.
                    self.send_nowait(close_rsp(d.connect_id, "unknown connectID".into()));
                    return;
                };
                let len = d.data.len();
                let limit = match self.window {
                    Some(w) => w as usize,
                    None => UNCREDITED_BUFFER_LIMIT,
                };
                let queued = s.queued.load(Ordering::Relaxed);
                let bad = if len > MAX_DATA_BYTES {
                    Some(format!("oversized DATA ({len} bytes)"))
                } else if queued + len > limit {
                    Some(format!("receive buffer overflow ({} bytes)", queued + len))
                } else {
                    None
                };
                if let Some(reason) = bad {
                    drop(streams);
                    self.close_bad(d.connect_id, reason);
                    return;
                }
                s.queued.fetch_add(len, Ordering::Relaxed);
                let _ = s.to_sock.send(d.data);
            }
            (Some(PacketType::CloseReq), Some(Payload::CloseRequest(c))) => {
                let existed = self.remove_stream(c.connect_id);
                let err = if existed {
                    String::new()
                } else {
                    "unknown connectID".into()
                };
                self.send_nowait(close_rsp(c.connect_id, err));
            }
            (Some(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
                if let Some(h) = self.pending.lock().unwrap().remove(&c.random) {
                    h.abort();
                    self.ctx
                        .stats
                        .dials_cancelled
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            (Some(PacketType::BerthWindow), Some(Payload::WindowUpdate(w)))
                if self.window.is_some() =>
            {
                let streams = self.streams.lock().unwrap();
                if let Some(s) = streams.get(&w.connect_id)
                    && let Some(c) = &s.credit
                    && w.bytes > 0
                    && w.bytes <= i64::from(u32::MAX)
                {
                    c.add_permits(w.bytes as usize);
                }
            }
            (kind, payload) => {
                let id = match &payload {
                    Some(Payload::Data(d)) => Some(d.connect_id),
                    Some(Payload::CloseRequest(c)) => Some(c.connect_id),
                    Some(Payload::CloseResponse(c)) => Some(c.connect_id),
                    Some(Payload::WindowUpdate(w)) => Some(w.connect_id),
                    _ => None,
                };
                match id {
                    Some(id) if self.streams.lock().unwrap().contains_key(&id) => {
                        self.close_bad(id, format!("malformed packet (type {kind:?})"));
                    }
                    _ => {
                        tracing::warn!(server = %self.server_id, ?kind, "malformed packet ignored");
                    }
                }
            }
        }
    }

    fn on_dial(self: &Arc<Self>, d: DialRequest) {
        if self.ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
            self.ctx.stats.dials_refused.fetch_add(1, Ordering::Relaxed);
            self.dial_error(d.random, "agent is draining".into());
            return;
        }
        if d.protocol != "tcp" {
            self.ctx.stats.dials_refused.fetch_add(1, Ordering::Relaxed);
            self.dial_error(d.random, format!("unsupported protocol {:?}", d.protocol));
            return;
        }
        let addr = match self.ctx.allow.check(&d.address) {
            Ok(a) => a,
            Err(why) => {
                self.ctx.stats.dials_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "berth::audit", server = %self.server_id, address = %d.address, "dial refused: {why}");
                self.dial_error(d.random, format!("dial refused: {why}"));
                return;
            }
        };
        let me = self.clone();
        let random = d.random;
        let task = tokio::spawn(async move {
            let r = tokio::time::timeout(me.ctx.dial_timeout, TcpStream::connect(addr)).await;
            if me.pending.lock().unwrap().remove(&random).is_none() {
                return; // cancelled by DIAL_CLS
            }
            let sock = match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    me.ctx.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                    me.dial_error(random, format!("dial tcp {addr}: {e}"));
                    return;
                }
                Err(_) => {
                    me.ctx.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                    me.dial_error(random, format!("dial tcp {addr}: timeout"));
                    return;
                }
            };
            let _ = sock.set_nodelay(true);
            me.start_stream(random, sock).await;
        });
        self.pending
            .lock()
            .unwrap()
            .insert(random, task.abort_handle());
    }

    async fn start_stream(self: &Arc<Self>, random: i64, sock: TcpStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (rd, wr) = sock.into_split();
        let (to_sock, from_server) = mpsc::unbounded_channel::<bytes::Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let credit = self.window.map(|w| Arc::new(Semaphore::new(w as usize)));
        // The reader starts only after DIAL_RSP is queued (DATA must not overtake it) and the
        // stream is registered (so its EOF finds it).
        let (go, started) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let me = self.clone();
            let credit = credit.clone();
            tokio::spawn(async move {
                if started.await.is_ok() {
                    me.reader(id, rd, credit).await;
                }
            })
        };
        self.streams.lock().unwrap().insert(
            id,
            StreamState {
                to_sock,
                queued: queued.clone(),
                credit,
                reader: reader.abort_handle(),
            },
        );
        self.ctx.stats.open_streams.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
        let rsp = packet(
            PacketType::DialRsp,
            Payload::DialResponse(DialResponse {
                error: String::new(),
                connect_id: id,
                random,
            }),
        );
        if self.tx.send(rsp).await.is_err() {
            self.remove_stream(id);
            return;
        }
        let _ = go.send(());
        let me = self.clone();
        tokio::spawn(async move { me.writer(id, wr, from_server, queued).await });
    }

    /// Node side → server. Holds no buffer while the socket is idle.
    async fn reader(self: Arc<Self>, id: i64, rd: OwnedReadHalf, credit: Option<Arc<Semaphore>>) {
        loop {
            if rd.readable().await.is_err() {
                break;
            }
            // Allocated only when there is something to read, never zeroed.
            let mut buf = bytes::BytesMut::with_capacity(CHUNK_BYTES);
            let n = match rd.try_read_buf(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            };
            if let Some(c) = &credit {
                match c.acquire_many(n as u32).await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            let p = packet(
                PacketType::Data,
                Payload::Data(Data {
                    connect_id: id,
                    error: String::new(),
                    data: buf.freeze(),
                }),
            );
            if self.tx.send(p).await.is_err() {
                return;
            }
        }
        // The node-side connection closed: tell the server (upstream: CLOSE_RSP).
        if self.remove_stream(id) {
            self.send_nowait(close_rsp(id, String::new()));
        }
    }

    /// Server → node side, then credit back.
    async fn writer(
        self: Arc<Self>,
        id: i64,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
        mut rx: mpsc::UnboundedReceiver<bytes::Bytes>,
        queued: Arc<AtomicUsize>,
    ) {
        while let Some(data) = rx.recv().await {
            let n = data.len();
            if wr.write_all(&data).await.is_err() {
                break;
            }
            queued.fetch_sub(n, Ordering::Relaxed);
            if self.window.is_some() && n > 0 {
                self.send_nowait(packet(
                    PacketType::BerthWindow,
                    Payload::WindowUpdate(WindowUpdate {
                        connect_id: id,
                        bytes: n as i64,
                    }),
                ));
            }
        }
        let _ = wr.shutdown().await;
    }

    fn shutdown_all(&self) {
        for (_, h) in self.pending.lock().unwrap().drain() {
            h.abort();
        }
        let ids: Vec<i64> = self.streams.lock().unwrap().keys().copied().collect();
        for id in ids {
            self.remove_stream(id);
        }
    }
}

/// Serves one accepted connection until it ends or the agent exits.
pub(super) async fn serve(
    ctx: Arc<Ctx>,
    conn: Connection,
    mut shutdown: watch::Receiver<Shutdown>,
) {
    let Connection {
        server_id,
        serial,
        channel,
        mut inbound,
        tx,
        window,
        ..
    } = conn;
    let session = Arc::new(Session {
        ctx: ctx.clone(),
        server_id: server_id.clone(),
        tx: tx.clone(),
        window,
        next_id: AtomicI64::new(1),
        streams: Mutex::new(HashMap::new()),
        pending: Mutex::new(HashMap::new()),
    });
    let node_task = tokio::spawn(crate::node::session::run(
        ctx.node.clone(),
        channel.clone(),
        server_id.clone(),
        crate::node::session::SessionConfig {
            probes: ctx.probes.clone(),
            heartbeat: ctx.heartbeat,
            authorization: ctx.authorization.clone(),
            shutting_down: ctx.draining.clone(),
        },
    ));
    // Cleans up also when this task is aborted.
    let _guard = SessionGuard {
        ctx: ctx.clone(),
        session: session.clone(),
        node_task: node_task.abort_handle(),
        server_id: server_id.clone(),
        serial,
    };
    let mut drain_sent = false;
    loop {
        if *shutdown.borrow() >= Shutdown::Drain && !drain_sent {
            drain_sent = true;
            let _ = tx
                .send(packet(PacketType::Drain, Payload::Drain(Drain {})))
                .await;
        }
        if *shutdown.borrow() == Shutdown::Exit {
            break;
        }
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(p)) => session.handle(p),
                Ok(None) => {
                    tracing::info!(server = %server_id, "server closed the tunnel");
                    break;
                }
                Err(status) => {
                    tracing::info!(server = %server_id, code = ?status.code(), "tunnel ended: {}", status.message());
                    break;
                }
            },
            r = shutdown.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    drop(channel);
}

struct SessionGuard {
    ctx: Arc<Ctx>,
    session: Arc<Session>,
    node_task: AbortHandle,
    server_id: String,
    serial: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.node_task.abort();
        self.session.shutdown_all();
        self.ctx.node.forget_server(&self.server_id);
        {
            let mut conns = self.ctx.connections.lock().unwrap();
            if conns.get(&self.server_id) == Some(&self.serial) {
                conns.remove(&self.server_id);
            }
        }
        self.ctx.changed.notify_one();
    }
}
