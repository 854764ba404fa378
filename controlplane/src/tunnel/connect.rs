//! HTTP CONNECT frontend (what kube-apiserver's egress selector speaks in `http-connect` mode),
//! served with hyper on a unix socket.
use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::UnixListener,
    sync::watch,
};

use super::{CHUNK_BYTES, FrontMsg, TunnelServer, TunnelStream};
use crate::Error;

/// A listener the CONNECT frontend accepts on: a unix socket, or loopback TCP for local tools.
pub enum Listener {
    Unix(UnixListener),
    Tcp(tokio::net::TcpListener),
}

fn serve_io<IO>(server: Arc<TunnelServer>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| handle(server.clone(), req));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await
        {
            tracing::debug!("http-connect connection: {e}");
        }
    });
}

/// Accepts HTTP CONNECT requests on `listener` until `shutdown` changes.
pub async fn serve(
    server: Arc<TunnelServer>,
    listener: Listener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = async {
                match &listener {
                    Listener::Unix(l) => l.accept().await.map(|(io, _)| serve_io(server.clone(), io)),
                    Listener::Tcp(l) => l.accept().await.map(|(io, _)| {
                        let _ = io.set_nodelay(true);
                        serve_io(server.clone(), io)
                    }),
                }
            } => {
                if let Err(e) = r {
                    tracing::warn!("http-connect accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

fn reply(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r
}

async fn handle(
    server: Arc<TunnelServer>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::CONNECT {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is served here\n".into(),
        ));
    }
    let Some(address) = req.uri().authority().map(|a| a.to_string()) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "CONNECT needs host:port\n".into(),
        ));
    };
    let stream = match server.dial("tcp", &address).await {
        Ok(s) => s,
        Err(e @ Error::NoAgent(_)) => {
            return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")));
        }
        Err(e) => return Ok(reply(StatusCode::BAD_GATEWAY, format!("{e}\n"))),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => splice(stream, TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
        }
    });
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Relays between a byte stream and a tunnel stream until either side closes.
pub async fn splice<IO: AsyncRead + AsyncWrite + Unpin>(mut stream: TunnelStream, io: IO) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let sender = stream.sender();
    let up = async {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sender.send(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        loop {
            match stream.recv().await {
                FrontMsg::Data(d) => {
                    if wr.write_all(&d).await.is_err() {
                        return;
                    }
                    stream.consumed(d.len());
                }
                FrontMsg::Closed(_) => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
