//! The agent's local API server (async edge): one unix socket (mode 0600) carrying both gRPC
//! (`berth.agent.v1.Agent`, for berthctl) and the framed protocol the CNI plugin uses. The first
//! bytes of a connection decide: the framed protocol starts with the magic `BRT1`, HTTP/2 with its
//! connection preface.
use crate::{
    core::AgentCore,
    error::{Error, Result},
};
use berth_proto::agent::{
    AddEndpointRequest, AddEndpointResponse, AllocateRequest, AllocateResponse, CheckRequest,
    CheckResponse, CreateEndpointRequest, CreateEndpointResponse, GcRequest, GcResponse,
    ListEndpointsRequest, ListEndpointsResponse, LocalRequest, LocalResponse, ReleaseRequest,
    ReleaseResponse, StatusRequest, StatusResponse,
    agent_server::{Agent, AgentServer},
};
use prost::Message;
use std::{
    os::fd::AsRawFd,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::Interest,
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

/// Frame magic of the local protocol.
pub const MAGIC: &[u8; 4] = b"BRT1";
const MAX_FRAME: usize = 4 << 20;

/// Binds the agent socket: refuses to steal it from a live agent, replaces a stale one, 0600.
pub async fn bind(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(Error::Config(format!(
                "another agent is already serving {}",
                socket.display()
            )));
        }
        std::fs::remove_file(socket)
            .map_err(|e| Error::io(format!("remove stale socket {}", socket.display()), e))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let listener = UnixListener::bind(socket)
        .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", socket.display()), e))?;
    Ok(listener)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    core: Arc<AgentCore>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (grpc_tx, grpc_rx) = mpsc::channel::<UnixStream>(64);
    let inflight = Arc::new(AtomicUsize::new(0));
    let workers = Arc::new(FramedWorkers::new(core.clone(), inflight.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let svc = AgentServer::new(AgentSvc(core.clone()));
    let grpc = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                ReceiverStream::new(grpc_rx).map(Ok::<_, std::io::Error>),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                };
                let grpc_tx = grpc_tx.clone();
                let workers = workers.clone();
                tokio::spawn(async move {
                    match sniff(&stream).await {
                        Ok(true) => workers.dispatch(stream),
                        Ok(false) => { let _ = grpc_tx.send(stream).await; }
                        Err(e) => tracing::debug!(error = %e, "connection closed before a request"),
                    }
                });
            }
        }
    }
    let _ = stop_tx.send(());
    drop(grpc_tx);
    let _ = grpc.await;
    // Framed requests being handled finish (their state changes are committed) before the
    // process exits; idle connections are simply dropped with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while inflight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// True when the connection speaks the framed protocol (peeks, consumes nothing).
async fn sniff(stream: &UnixStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 4];
    loop {
        stream.readable().await?;
        let n = match stream.try_io(Interest::READABLE, || {
            let r = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK,
                )
            };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n >= 4 || buf[..n] != MAGIC[..n] {
            return Ok(n >= 4 && &buf == MAGIC);
        }
        // A partial prefix of the magic: wait for more bytes.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Idle time after which a framed connection's thread gives up on its client.
const FRAMED_IDLE: Duration = Duration::from_secs(60);
/// How long a framed-protocol worker thread waits for another connection before it exits.
const WORKER_IDLE: Duration = Duration::from_secs(30);

/// Threads that serve framed connections, one connection at a time each: every request is read,
/// handled and answered on that thread with plain blocking calls — no hand-off to tokio's
/// blocking pool and back per request, which costs wake-ups (and, on a loaded node, scheduling
/// delays) on every ADD. Threads are kept for reuse while connections keep coming; a connection
/// that finds no idle thread gets a new one, so a slow client never delays another. Plugin
/// connections are short (one ADD, DEL, ... each); the socket is root's only. The threads are not
/// the runtime's: an idle one never holds up the agent's exit.
struct FramedWorkers {
    core: Arc<AgentCore>,
    tx: std::sync::Mutex<std::sync::mpsc::Sender<std::os::unix::net::UnixStream>>,
    rx: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<std::os::unix::net::UnixStream>>>,
    /// Threads waiting for a connection that no dispatch has claimed yet.
    idle: Arc<AtomicUsize>,
    /// Requests being handled (shutdown waits for them).
    inflight: Arc<AtomicUsize>,
}

impl FramedWorkers {
    fn new(core: Arc<AgentCore>, inflight: Arc<AtomicUsize>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        FramedWorkers {
            core,
            tx: std::sync::Mutex::new(tx),
            rx: Arc::new(std::sync::Mutex::new(rx)),
            idle: Arc::new(AtomicUsize::new(0)),
            inflight,
        }
    }

    /// Takes one idle thread if there is one (a claim: that thread will not exit on idleness).
    fn claim(idle: &AtomicUsize) -> bool {
        idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn dispatch(&self, stream: UnixStream) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "local connection dropped");
                return;
            }
        };
        if Self::claim(&self.idle) {
            match self.tx.lock().unwrap().send(stream) {
                Ok(()) => return,
                Err(e) => return self.spawn(e.0),
            }
        }
        self.spawn(stream);
    }

    fn spawn(&self, first: std::os::unix::net::UnixStream) {
        let core = self.core.clone();
        let rx = self.rx.clone();
        let idle = self.idle.clone();
        let inflight = self.inflight.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-local".into())
            .spawn(move || {
                let mut next = Some(first);
                loop {
                    if let Some(stream) = next.take()
                        && let Err(e) = serve_framed(&core, stream, &inflight)
                    {
                        tracing::debug!(error = %e, "local connection closed");
                    }
                    idle.fetch_add(1, Ordering::SeqCst);
                    loop {
                        let got = rx.lock().unwrap().recv_timeout(WORKER_IDLE);
                        match got {
                            Ok(s) => {
                                next = Some(s);
                                break;
                            }
                            // Unclaimed: leave. Claimed meanwhile: its connection is on the way.
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                if Self::claim(&idle) {
                                    return;
                                }
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for a local connection; dropped");
        }
    }
}

fn serve_framed(
    core: &AgentCore,
    mut stream: std::os::unix::net::UnixStream,
    inflight: &AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(FRAMED_IDLE))?;
    stream.set_write_timeout(Some(FRAMED_IDLE))?;
    loop {
        let mut head = [0u8; 8];
        match stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if &head[..4] != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad frame magic",
            ));
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        let resp = match LocalRequest::decode(body.as_slice()) {
            Ok(req) => {
                inflight.fetch_add(1, Ordering::SeqCst);
                let resp = core.handle_local(req);
                inflight.fetch_sub(1, Ordering::SeqCst);
                resp
            }
            Err(e) => LocalResponse {
                result: Some(berth_proto::agent::local_response::Result::Error(
                    berth_proto::agent::LocalError {
                        code: berth_proto::agent::local_error::Code::InvalidArgument as i32,
                        message: format!("undecodable request: {e}"),
                    },
                )),
            },
        };
        let out = resp.encode_to_vec();
        let mut frame = Vec::with_capacity(8 + out.len());
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&(out.len() as u32).to_be_bytes());
        frame.extend_from_slice(&out);
        stream.write_all(&frame)?;
    }
}

/// gRPC face of the core.
struct AgentSvc(Arc<AgentCore>);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<Response<T>, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(Response::new(v)),
        Ok(Err(e)) => Err(e.to_status()),
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

#[tonic::async_trait]
impl Agent for AgentSvc {
    async fn status(
        &self,
        _: Request<StatusRequest>,
    ) -> std::result::Result<Response<StatusResponse>, Status> {
        let core = self.0.clone();
        blocking(move || Ok(core.status())).await
    }
    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> std::result::Result<Response<ListEndpointsResponse>, Status> {
        let core = self.0.clone();
        blocking(move || {
            Ok(ListEndpointsResponse {
                endpoints: core.list_endpoints(),
            })
        })
        .await
    }
    async fn allocate(
        &self,
        r: Request<AllocateRequest>,
    ) -> std::result::Result<Response<AllocateResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.allocate(r.into_inner())).await
    }
    async fn create_endpoint(
        &self,
        r: Request<CreateEndpointRequest>,
    ) -> std::result::Result<Response<CreateEndpointResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.create_endpoint(r.into_inner())).await
    }
    async fn release(
        &self,
        r: Request<ReleaseRequest>,
    ) -> std::result::Result<Response<ReleaseResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.release(r.into_inner())).await
    }
    async fn check(
        &self,
        r: Request<CheckRequest>,
    ) -> std::result::Result<Response<CheckResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.check(r.into_inner())).await
    }
    async fn gc(&self, r: Request<GcRequest>) -> std::result::Result<Response<GcResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.gc(r.into_inner())).await
    }
    async fn add_endpoint(
        &self,
        r: Request<AddEndpointRequest>,
    ) -> std::result::Result<Response<AddEndpointResponse>, Status> {
        let core = self.0.clone();
        blocking(move || core.add_endpoint(r.into_inner())).await
    }
}

/// A gRPC client of the agent over its unix socket (for berthctl and tests).
pub async fn connect_grpc(
    socket: &Path,
) -> std::result::Result<
    berth_proto::agent::agent_client::AgentClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://berth-agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await?;
    Ok(berth_proto::agent::agent_client::AgentClient::new(channel))
}
