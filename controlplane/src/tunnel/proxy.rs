//! `ProxyService.Proxy`: the gRPC frontend (kube-apiserver's konnectivity client). One gRPC
//! stream carries one connection: DIAL_REQ → DIAL_RSP, DATA both ways, CLOSE_REQ/CLOSE_RSP.
use std::sync::Arc;

use berth_proto::konnectivity::{
    CloseResponse, Data, DialResponse, Packet, PacketType, packet::Payload,
    proxy_service_server::ProxyService,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{FrontMsg, MAX_DATA_BYTES, TunnelServer, agent::PacketStream};

/// The gRPC frontend service.
#[derive(Clone)]
pub struct ProxySvc {
    pub server: Arc<TunnelServer>,
}

fn dial_rsp(random: i64, connect_id: i64, error: String) -> Packet {
    Packet {
        r#type: PacketType::DialRsp as i32,
        payload: Some(Payload::DialResponse(DialResponse {
            error,
            connect_id,
            random,
        })),
    }
}

fn close_rsp(connect_id: i64, error: Option<String>) -> Packet {
    Packet {
        r#type: PacketType::CloseRsp as i32,
        payload: Some(Payload::CloseResponse(CloseResponse {
            error: error.unwrap_or_default(),
            connect_id,
        })),
    }
}

enum Upstream {
    ClientClosed,
    CloseRequested,
    Malformed(String),
}

#[tonic::async_trait]
impl ProxyService for ProxySvc {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ProxyStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Packet>(64);
        let server = self.server.clone();
        tokio::spawn(async move {
            let dial = match inbound.message().await {
                Ok(Some(Packet {
                    r#type: t,
                    payload: Some(Payload::DialRequest(d)),
                })) if t == PacketType::DialReq as i32 => d,
                Ok(Some(p)) => {
                    tracing::warn!(
                        kind = p.r#type,
                        "frontend stream did not start with DIAL_REQ"
                    );
                    let _ = tx
                        .send(dial_rsp(
                            0,
                            0,
                            "expected DIAL_REQ as the first packet".into(),
                        ))
                        .await;
                    return;
                }
                _ => return,
            };
            let mut stream = match server.dial(&dial.protocol, &dial.address).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(address = %dial.address, "dial failed: {e}");
                    let _ = tx.send(dial_rsp(dial.random, 0, e.to_string())).await;
                    return;
                }
            };
            let id = stream.connect_id;
            if tx
                .send(dial_rsp(dial.random, id, String::new()))
                .await
                .is_err()
            {
                return;
            }
            let sender = stream.sender();
            let up = async {
                loop {
                    let packet = match inbound.message().await {
                        Ok(Some(p)) => p,
                        _ => return Upstream::ClientClosed,
                    };
                    let kind = PacketType::try_from(packet.r#type).ok();
                    match (kind, packet.payload) {
                        (Some(PacketType::Data), Some(Payload::Data(d))) => {
                            if d.connect_id != id {
                                return Upstream::Malformed(format!(
                                    "DATA for connection {} on the stream of connection {id}",
                                    d.connect_id
                                ));
                            }
                            if d.data.len() > MAX_DATA_BYTES {
                                return Upstream::Malformed(format!(
                                    "oversized DATA ({} bytes)",
                                    d.data.len()
                                ));
                            }
                            if sender.send(&d.data).await.is_err() {
                                return Upstream::ClientClosed;
                            }
                        }
                        (Some(PacketType::CloseReq), Some(Payload::CloseRequest(c)))
                            if c.connect_id == id =>
                        {
                            return Upstream::CloseRequested;
                        }
                        (Some(PacketType::DialCls), _) => return Upstream::CloseRequested,
                        (kind, _) => {
                            return Upstream::Malformed(format!("unexpected packet {kind:?}"));
                        }
                    }
                }
            };
            tokio::pin!(up);
            loop {
                tokio::select! {
                    msg = stream.recv() => match msg {
                        FrontMsg::Data(data) => {
                            let n = data.len();
                            let p = Packet {
                                r#type: PacketType::Data as i32,
                                payload: Some(Payload::Data(Data { connect_id: id, error: String::new(), data })),
                            };
                            if tx.send(p).await.is_err() {
                                break;
                            }
                            stream.consumed(n);
                        }
                        FrontMsg::Closed(err) => {
                            let _ = tx.send(close_rsp(id, err)).await;
                            break;
                        }
                    },
                    why = &mut up => {
                        stream.close();
                        match why {
                            Upstream::ClientClosed => {}
                            Upstream::CloseRequested => {
                                let _ = tx.send(close_rsp(id, None)).await;
                            }
                            Upstream::Malformed(reason) => {
                                tracing::warn!(connect_id = id, %reason, "closing frontend stream: malformed packet");
                                let _ = tx.send(close_rsp(id, Some(reason))).await;
                            }
                        }
                        break;
                    }
                }
            }
        });
        let stream: PacketStream = Box::pin(ReceiverStream::new(rx).map(Ok));
        Ok(Response::new(stream))
    }
}
