//! The Konnectivity-compatible tunnel server.
//!
//! Agents connect to [`AgentService`](berth_proto::konnectivity::agent_service_server) and keep
//! one long-lived gRPC stream each; frontends (the gRPC `ProxyService` and HTTP CONNECT, what
//! kube-apiserver's egress selector speaks) ask [`TunnelServer::dial`] for a connection to a
//! node-local address. The server picks the agent serving that destination (agent identifiers:
//! host, ipv4, cidr, default-route), forwards a `DIAL_REQ`, and relays `DATA` between the
//! frontend and the agent.
//!
//! Per-stream buffering is bounded: with a Berth agent the negotiated credit window bounds the
//! bytes in flight per stream (a stalled frontend reader only stops its own stream); with a peer
//! that does not speak the extension, a stream whose receive buffer overflows is closed instead
//! of stalling the agent's whole connection.
pub mod agent;
pub mod connect;
pub mod identifiers;
pub mod proxy;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use berth_proto::konnectivity::{
    CloseRequest, Data, DialRequest, Packet, PacketType, WindowUpdate, packet::Payload,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use identifiers::Identifiers;

use crate::{Error, Result};

/// Largest DATA payload accepted in one packet; a bigger one closes its stream.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// Largest chunk a frontend reader forwards in one DATA packet.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Default per-stream credit window (bytes in flight per direction) for Berth agents.
pub const DEFAULT_WINDOW: u32 = 2 * 1024 * 1024;
/// Receive buffer of a stream when the agent does not speak the credit extension.
pub const UNCREDITED_BUFFER_LIMIT: usize = 4 << 20;
/// Metadata key that negotiates the credit extension.
pub const FLOW_CONTROL_KEY: &str = "berth-flow-control";

/// Tunnel server configuration.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// This replica's ID (`serverid` response header).
    pub server_id: String,
    /// Number of replicas (`servercount` response header).
    pub server_count: u32,
    /// Accepted bearer tokens. Never logged.
    pub tokens: Vec<String>,
    /// Agents authenticate with client certificates (verified by the TLS layer against the
    /// client CA); a verified certificate is enough.
    pub mtls: bool,
    /// How long a frontend waits for the agent's DIAL_RSP.
    pub dial_timeout: Duration,
    /// Per-stream credit window offered to Berth agents (0 disables the extension).
    pub window: u32,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            server_id: "berth-server".into(),
            server_count: 1,
            tokens: Vec::new(),
            mtls: false,
            dial_timeout: Duration::from_secs(10),
            window: DEFAULT_WINDOW,
        }
    }
}

/// What the agent side sends towards a frontend stream.
#[derive(Debug)]
pub enum FrontMsg {
    /// Bytes from the node-side connection.
    Data(bytes::Bytes),
    /// The stream is closed (with the agent's error, if any).
    Closed(Option<String>),
}

/// The server's end of one relayed connection, as seen by the agent demultiplexer.
struct StreamEnd {
    to_front: mpsc::UnboundedSender<FrontMsg>,
    /// Bytes queued towards the frontend and not yet written out.
    queued: Arc<AtomicUsize>,
    /// Credit for DATA towards the agent (Berth extension).
    credit: Option<Arc<Semaphore>>,
}

/// The frontend's half of a stream the demultiplexer registered when DIAL_RSP arrived.
struct StreamParts {
    connect_id: i64,
    rx: mpsc::UnboundedReceiver<FrontMsg>,
    queued: Arc<AtomicUsize>,
    credit: Option<Arc<Semaphore>>,
}

type DialResult = std::result::Result<StreamParts, String>;

/// One connected agent (one gRPC `Connect` stream).
pub struct AgentConn {
    pub agent_id: String,
    pub identifiers: Identifiers,
    serial: u64,
    tx: mpsc::Sender<Packet>,
    window: Option<u32>,
    draining: AtomicBool,
    pending: Mutex<HashMap<i64, oneshot::Sender<DialResult>>>,
    streams: Mutex<HashMap<i64, StreamEnd>>,
}

impl AgentConn {
    /// True once the agent announced DRAIN.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Number of relayed connections open on this agent connection.
    pub fn open_streams(&self) -> usize {
        self.streams.lock().unwrap().len()
    }

    fn send_nowait(&self, packet: Packet) {
        let tx = self.tx.clone();
        if let Err(mpsc::error::TrySendError::Full(p)) = tx.try_send(packet) {
            tokio::spawn(async move {
                let _ = tx.send(p).await;
            });
        }
    }

    fn close_stream(&self, connect_id: i64, error: Option<String>) {
        if let Some(end) = self.streams.lock().unwrap().remove(&connect_id) {
            let _ = end.to_front.send(FrontMsg::Closed(error));
        }
    }

    /// Handles one packet from the agent. Never blocks: per-stream queues are bounded by credit
    /// (or closed on overflow), so one slow frontend cannot stall the others.
    fn handle_from_agent(&self, packet: Packet) {
        let kind = PacketType::try_from(packet.r#type).ok();
        match (kind, packet.payload) {
            (Some(PacketType::DialRsp), Some(Payload::DialResponse(rsp))) => {
                let waiter = self.pending.lock().unwrap().remove(&rsp.random);
                match waiter {
                    Some(w) if rsp.error.is_empty() => {
                        // Register the stream now, before the next packet (the agent may send
                        // DATA right behind DIAL_RSP), then hand it to the waiting frontend.
                        let id = rsp.connect_id;
                        let (to_front, rx) = mpsc::unbounded_channel();
                        let queued = Arc::new(AtomicUsize::new(0));
                        let credit = self.window.map(|w| Arc::new(Semaphore::new(w as usize)));
                        self.streams.lock().unwrap().insert(
                            id,
                            StreamEnd {
                                to_front,
                                queued: queued.clone(),
                                credit: credit.clone(),
                            },
                        );
                        let parts = StreamParts {
                            connect_id: id,
                            rx,
                            queued,
                            credit,
                        };
                        if w.send(Ok(parts)).is_err() {
                            // The frontend gave up meanwhile: close the fresh connection.
                            self.streams.lock().unwrap().remove(&id);
                            self.send_nowait(close_req(id));
                        }
                    }
                    Some(w) => {
                        let _ = w.send(Err(rsp.error));
                    }
                    None if rsp.error.is_empty() => {
                        tracing::debug!(agent = %self.agent_id, connect_id = rsp.connect_id, "late DIAL_RSP, closing");
                        self.send_nowait(close_req(rsp.connect_id));
                    }
                    None => {}
                }
            }
            (Some(PacketType::Data), Some(Payload::Data(data))) => {
                let mut streams = self.streams.lock().unwrap();
                let Some(end) = streams.get(&data.connect_id) else {
                    drop(streams);
                    tracing::debug!(agent = %self.agent_id, connect_id = data.connect_id, "DATA for unknown connection");
                    self.send_nowait(close_req(data.connect_id));
                    return;
                };
                let len = data.data.len();
                let limit = match self.window {
                    Some(w) => w as usize,
                    None => UNCREDITED_BUFFER_LIMIT,
                };
                let queued = end.queued.load(Ordering::Relaxed);
                let reason = if len > MAX_DATA_BYTES {
                    Some(format!("oversized DATA ({len} bytes)"))
                } else if queued + len > limit {
                    Some(format!(
                        "receive buffer overflow ({} bytes queued)",
                        queued + len
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let end = streams.remove(&data.connect_id).expect("present");
                    drop(streams);
                    tracing::warn!(agent = %self.agent_id, connect_id = data.connect_id, %reason, "closing stream");
                    let _ = end.to_front.send(FrontMsg::Closed(Some(reason)));
                    self.send_nowait(close_req(data.connect_id));
                    return;
                }
                end.queued.fetch_add(len, Ordering::Relaxed);
                let _ = end.to_front.send(FrontMsg::Data(data.data));
            }
            (Some(PacketType::CloseRsp), Some(Payload::CloseResponse(rsp))) => {
                let err = (!rsp.error.is_empty()).then_some(rsp.error);
                self.close_stream(rsp.connect_id, err);
            }
            (Some(PacketType::DialCls), Some(Payload::CloseDial(cd))) => {
                if let Some(w) = self.pending.lock().unwrap().remove(&cd.random) {
                    let _ = w.send(Err("dial closed by the agent".into()));
                }
            }
            (Some(PacketType::Drain), _) => {
                tracing::info!(agent = %self.agent_id, "agent is draining");
                self.draining.store(true, Ordering::Relaxed);
            }
            (Some(PacketType::BerthWindow), Some(Payload::WindowUpdate(w)))
                if self.window.is_some() =>
            {
                let streams = self.streams.lock().unwrap();
                if let Some(end) = streams.get(&w.connect_id)
                    && let Some(credit) = &end.credit
                    && w.bytes > 0
                    && w.bytes <= i64::from(u32::MAX)
                {
                    credit.add_permits(w.bytes as usize);
                }
            }
            (kind, payload) => {
                // Malformed (type and payload disagree, unknown type, missing payload): close the
                // stream it names if any; the agent connection stays up.
                let connect_id = match &payload {
                    Some(Payload::Data(d)) => Some(d.connect_id),
                    Some(Payload::CloseResponse(c)) => Some(c.connect_id),
                    Some(Payload::CloseRequest(c)) => Some(c.connect_id),
                    _ => None,
                };
                tracing::warn!(agent = %self.agent_id, ?kind, ?connect_id, "malformed packet from agent");
                if let Some(id) = connect_id {
                    self.close_stream(id, Some("malformed packet".into()));
                    self.send_nowait(close_req(id));
                }
            }
        }
    }

    /// Fails every pending dial and closes every stream (the agent connection is gone).
    fn fail_all(&self, reason: &str) {
        for (_, w) in self.pending.lock().unwrap().drain() {
            let _ = w.send(Err(reason.to_string()));
        }
        for (_, end) in self.streams.lock().unwrap().drain() {
            let _ = end
                .to_front
                .send(FrontMsg::Closed(Some(reason.to_string())));
        }
    }
}

fn close_req(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseReq as i32,
        payload: Some(Payload::CloseRequest(CloseRequest { connect_id })),
    }
}

/// The tunnel server state shared by the agent service and the frontends.
pub struct TunnelServer {
    pub config: TunnelConfig,
    /// agent ID → its connections to this server (a reconnect or a probe can briefly overlap).
    agents: Mutex<HashMap<String, Vec<Arc<AgentConn>>>>,
    next_serial: AtomicU64,
    next_random: AtomicI64,
}

/// A connection relayed through an agent, held by a frontend.
pub struct TunnelStream {
    pub connect_id: i64,
    pub agent_id: String,
    conn: Arc<AgentConn>,
    rx: mpsc::UnboundedReceiver<FrontMsg>,
    queued: Arc<AtomicUsize>,
    credit: Option<Arc<Semaphore>>,
    closed: bool,
}

impl TunnelStream {
    /// Sends bytes to the node-side connection, waiting for credit when the agent speaks the
    /// extension. Chunks bigger than [`CHUNK_BYTES`] are split.
    pub async fn send(&self, data: &[u8]) -> Result<()> {
        self.sender().send(data).await
    }

    /// Next message from the node side. Call [`TunnelStream::consumed`] after writing data out.
    pub async fn recv(&mut self) -> FrontMsg {
        match self.rx.recv().await {
            Some(msg) => {
                if matches!(msg, FrontMsg::Closed(_)) {
                    self.closed = true;
                }
                msg
            }
            None => {
                self.closed = true;
                FrontMsg::Closed(Some("agent connection closed".into()))
            }
        }
    }

    /// Returns credit for `n` bytes the frontend has written out.
    pub fn consumed(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        if self.conn.window.is_some() && n > 0 {
            self.conn.send_nowait(Packet {
                r#type: PacketType::BerthWindow as i32,
                payload: Some(Payload::WindowUpdate(WindowUpdate {
                    connect_id: self.connect_id,
                    bytes: n as i64,
                })),
            });
        }
    }

    /// A handle that sends on behalf of this stream from another task.
    pub fn sender(&self) -> TunnelSender {
        TunnelSender {
            connect_id: self.connect_id,
            conn: self.conn.clone(),
            credit: self.credit.clone(),
        }
    }

    /// Closes the stream (CLOSE_REQ to the agent) unless the node side already closed it.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.conn.streams.lock().unwrap().remove(&self.connect_id);
            self.conn.send_nowait(close_req(self.connect_id));
        }
        if let Some(c) = &self.credit {
            c.close();
        }
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sending half of a [`TunnelStream`], usable from another task.
#[derive(Clone)]
pub struct TunnelSender {
    connect_id: i64,
    conn: Arc<AgentConn>,
    credit: Option<Arc<Semaphore>>,
}

impl TunnelSender {
    /// Same as [`TunnelStream::send`].
    pub async fn send(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK_BYTES);
            if let Some(credit) = &self.credit {
                credit
                    .acquire_many(n as u32)
                    .await
                    .map_err(|_| Error::Tunnel("stream closed".into()))?
                    .forget();
            }
            let packet = Packet {
                r#type: PacketType::Data as i32,
                payload: Some(Payload::Data(Data {
                    connect_id: self.connect_id,
                    error: String::new(),
                    data: bytes::Bytes::copy_from_slice(&data[..n]),
                })),
            };
            self.conn
                .tx
                .send(packet)
                .await
                .map_err(|_| Error::Tunnel("agent connection closed".into()))?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Snapshot of one connected agent, for the status view.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub identifiers: Identifiers,
    pub draining: bool,
    pub open_streams: usize,
    pub flow_control: bool,
}

impl TunnelServer {
    pub fn new(config: TunnelConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            agents: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(1),
            next_random: AtomicI64::new(1),
        })
    }

    /// Checks an `authorization` header value against the accepted tokens (constant time per
    /// token). The token itself never reaches a log line.
    pub fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(token) = value.strip_prefix("Bearer ") else {
            return false;
        };
        let token = token.trim();
        let mut ok = false;
        for t in &self.config.tokens {
            ok |= constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        ok && !token.is_empty()
    }

    /// Registers a new agent connection. Earlier connections of the same agent stay until they
    /// end (an agent probing for replicas may open a duplicate it closes right away); dials use
    /// the oldest, established one.
    fn add_agent(
        &self,
        agent_id: String,
        identifiers: Identifiers,
        tx: mpsc::Sender<Packet>,
        window: Option<u32>,
    ) -> Arc<AgentConn> {
        let conn = Arc::new(AgentConn {
            agent_id: agent_id.clone(),
            identifiers,
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            tx,
            window,
            draining: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
        });
        self.agents
            .lock()
            .unwrap()
            .entry(agent_id)
            .or_default()
            .push(conn.clone());
        conn
    }

    fn remove_agent(&self, conn: &Arc<AgentConn>) {
        let mut agents = self.agents.lock().unwrap();
        if let Some(list) = agents.get_mut(&conn.agent_id) {
            list.retain(|c| c.serial != conn.serial);
            if list.is_empty() {
                agents.remove(&conn.agent_id);
            }
        }
        drop(agents);
        conn.fail_all("agent disconnected");
    }

    /// Connected agents.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let mut v: Vec<AgentInfo> = self
            .agents
            .lock()
            .unwrap()
            .values()
            .filter_map(|l| l.first())
            .map(|c| AgentInfo {
                agent_id: c.agent_id.clone(),
                identifiers: c.identifiers.clone(),
                draining: c.draining(),
                open_streams: c.open_streams(),
                flow_control: c.window.is_some(),
            })
            .collect();
        v.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        v
    }

    /// Picks the agent serving `address` (`host:port`): exact host or IPv4 match first, then a
    /// pod CIDR containing the address, then an agent announcing a default route. Draining
    /// agents are used only when no other agent matches.
    pub fn pick_agent(&self, address: &str) -> Result<Arc<AgentConn>> {
        let host = identifiers::host_of(address)
            .ok_or_else(|| Error::Tunnel(format!("invalid dial address {address:?}")))?;
        let agents = self.agents.lock().unwrap();
        let mut best: Option<(u8, &Arc<AgentConn>)> = None;
        for conn in agents.values().filter_map(|l| l.first()) {
            let Some(rank) = conn.identifiers.match_rank(&host) else {
                continue;
            };
            let rank = if conn.draining() { rank + 10 } else { rank };
            if best.is_none_or(|(r, c)| rank < r || (rank == r && conn.agent_id < c.agent_id)) {
                best = Some((rank, conn));
            }
        }
        best.map(|(_, c)| c.clone()).ok_or_else(|| {
            Error::NoAgent(format!(
                "no agent available for destination {host} ({} agents connected)",
                agents.len()
            ))
        })
    }

    /// Opens a connection to `address` through the agent serving it.
    pub async fn dial(&self, protocol: &str, address: &str) -> Result<TunnelStream> {
        if protocol != "tcp" {
            return Err(Error::Tunnel(format!("unsupported protocol {protocol:?}")));
        }
        let conn = self.pick_agent(address)?;
        let random = self.next_random.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap().insert(random, tx);
        let req = Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: protocol.into(),
                address: address.into(),
                random,
            })),
        };
        if conn.tx.send(req).await.is_err() {
            conn.pending.lock().unwrap().remove(&random);
            return Err(Error::Tunnel("agent connection closed".into()));
        }
        let result = tokio::time::timeout(self.config.dial_timeout, rx).await;
        let parts = match result {
            Ok(Ok(Ok(parts))) => parts,
            Ok(Ok(Err(e))) => return Err(Error::Dial(e)),
            Ok(Err(_)) => return Err(Error::Tunnel("agent connection closed".into())),
            Err(_) => {
                conn.pending.lock().unwrap().remove(&random);
                // Tell the agent to forget the dial (upstream: DIAL_CLS).
                conn.send_nowait(Packet {
                    r#type: PacketType::DialCls as i32,
                    payload: Some(Payload::CloseDial(berth_proto::konnectivity::CloseDial {
                        random,
                    })),
                });
                return Err(Error::Dial(format!("dial {address} timed out")));
            }
        };
        let connect_id = parts.connect_id;
        tracing::debug!(agent = %conn.agent_id, connect_id, address, "dial established");
        Ok(TunnelStream {
            connect_id,
            agent_id: conn.agent_id.clone(),
            conn,
            rx: parts.rx,
            queued: parts.queued,
            credit: parts.credit,
            closed: false,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check() {
        let s = TunnelServer::new(TunnelConfig {
            tokens: vec!["s3cret".into()],
            ..Default::default()
        });
        assert!(s.authorized(Some("Bearer s3cret")));
        assert!(!s.authorized(Some("Bearer s3cre")));
        assert!(!s.authorized(Some("s3cret")));
        assert!(!s.authorized(None));
        let empty = TunnelServer::new(TunnelConfig::default());
        assert!(!empty.authorized(Some("Bearer ")));
    }

    /// The wire shape the upstream agent and server depend on: package-less service names and
    /// the exact field numbers of Packet and its payloads.
    #[test]
    fn wire_shape_matches_konnectivity() {
        use berth_proto::konnectivity::{agent_service_server, proxy_service_server};
        use prost::Message;
        assert_eq!(agent_service_server::SERVICE_NAME, "AgentService");
        assert_eq!(proxy_service_server::SERVICE_NAME, "ProxyService");
        let data = Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: 5,
                error: String::new(),
                data: bytes::Bytes::from_static(b"hi"),
            })),
        };
        // type=1 varint 4; data=4 (len 6): connectID=1 varint 5, data=3 "hi"
        assert_eq!(
            data.encode_to_vec(),
            [0x08, 0x04, 0x22, 0x06, 0x08, 0x05, 0x1a, 0x02, b'h', b'i']
        );
        let dial = Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: "tcp".into(),
                address: "a:1".into(),
                random: 7,
            })),
        };
        // DIAL_REQ=0 is omitted; dialRequest=2: protocol=1, address=2, random=3
        assert_eq!(
            dial.encode_to_vec(),
            [
                0x12, 0x0c, 0x0a, 0x03, b't', b'c', b'p', 0x12, 0x03, b'a', b':', b'1', 0x18, 0x07
            ]
        );
        let rsp = berth_proto::konnectivity::DialResponse {
            error: "e".into(),
            connect_id: 2,
            random: 3,
        };
        assert_eq!(
            rsp.encode_to_vec(),
            [0x0a, 0x01, b'e', 0x10, 0x02, 0x18, 0x03]
        );
        let close = berth_proto::konnectivity::CloseResponse {
            error: "x".into(),
            connect_id: 9,
        };
        assert_eq!(close.encode_to_vec(), [0x0a, 0x01, b'x', 0x10, 0x09]);
        let drain = Packet {
            r#type: PacketType::Drain as i32,
            payload: Some(Payload::Drain(Default::default())),
        };
        assert_eq!(drain.encode_to_vec(), [0x08, 0x06, 0x42, 0x00]);
        let cls = Packet {
            r#type: PacketType::DialCls as i32,
            payload: Some(Payload::CloseDial(berth_proto::konnectivity::CloseDial {
                random: 1,
            })),
        };
        assert_eq!(cls.encode_to_vec(), [0x08, 0x05, 0x3a, 0x02, 0x08, 0x01]);
        for (t, v) in [
            (PacketType::DialReq, 0),
            (PacketType::DialRsp, 1),
            (PacketType::CloseReq, 2),
            (PacketType::CloseRsp, 3),
            (PacketType::Data, 4),
            (PacketType::DialCls, 5),
            (PacketType::Drain, 6),
        ] {
            assert_eq!(t as i32, v);
        }
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        let s = TunnelServer::new(TunnelConfig::default());
        let err = s.pick_agent("10.0.0.1:10250").err().unwrap();
        assert!(err.to_string().contains("no agent available"), "{err}");
    }
}
