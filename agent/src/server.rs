//! The agent's local API server (async edge): one unix socket (mode 0600) carrying both gRPC
//! (`berth.agent.v1.Agent`, for berthctl) and the framed protocol the CNI plugin uses. The first
//! bytes of a connection decide: the framed protocol starts with the magic `BRT1`, HTTP/2 with its
//! connection preface.
use crate::{
    core::AgentCore,
    error::{Error, Result},
};
use berth_proto::agent::{
    AllocateRequest, AllocateResponse, CheckRequest, CheckResponse, CreateEndpointRequest,
    CreateEndpointResponse, GcRequest, GcResponse, ListEndpointsRequest, ListEndpointsResponse,
    LocalRequest, LocalResponse, ReleaseRequest, ReleaseResponse, StatusRequest, StatusResponse,
    agent_server::{Agent, AgentServer},
};
use prost::Message;
use std::{os::fd::AsRawFd, os::unix::fs::PermissionsExt, path::Path, sync::Arc};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
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
                let core = core.clone();
                let grpc_tx = grpc_tx.clone();
                tokio::spawn(async move {
                    match sniff(&stream).await {
                        Ok(true) => {
                            if let Err(e) = serve_framed(core, stream).await {
                                tracing::debug!(error = %e, "local connection closed");
                            }
                        }
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

async fn serve_framed(core: Arc<AgentCore>, mut stream: UnixStream) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 8];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
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
        stream.read_exact(&mut body).await?;
        let resp = match LocalRequest::decode(body.as_slice()) {
            Ok(req) => {
                let core = core.clone();
                tokio::task::spawn_blocking(move || core.handle_local(req))
                    .await
                    .map_err(std::io::Error::other)?
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
        stream.write_all(&frame).await?;
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
