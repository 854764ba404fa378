//! `AgentService.Connect`: accepts agents (bearer token), answers `serverid`/`servercount`, and
//! demultiplexes their packets onto the relayed streams.
use std::{pin::Pin, sync::Arc};

use berth_proto::konnectivity::{Packet, agent_service_server::AgentService};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

use super::{FLOW_CONTROL_KEY, Identifiers, TunnelServer};

/// Packets queued towards one agent, shared by all its streams (bounded in bytes by the chunk
/// size; a full queue holds the frontends' readers back).
const OUTBOUND_PACKETS: usize = 64;

/// Stream of packets towards an agent or a frontend.
pub type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send + 'static>>;

/// The gRPC service agents connect to.
#[derive(Clone)]
pub struct AgentSvc {
    pub server: Arc<TunnelServer>,
}

/// The `agentid` of a request: exactly one, non-empty, printable.
pub fn agent_id_of(md: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let ids: Vec<_> = md.get_all("agentid").iter().collect();
    if ids.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "expected exactly one agentid, got {}",
            ids.len()
        )));
    }
    let id = ids[0]
        .to_str()
        .map_err(|_| Status::invalid_argument("agentid is not ASCII"))?;
    if id.is_empty() || id.len() > 253 {
        return Err(Status::invalid_argument("agentid is empty or too long"));
    }
    Ok(id.to_string())
}

/// Checks a request: a client certificate verified by the mTLS handshake, or a bearer token (the
/// token is never logged).
pub fn check_auth<T>(server: &TunnelServer, request: &Request<T>) -> Result<(), Status> {
    let cert_ok = server.config.mtls && request.peer_certs().is_some_and(|c| !c.is_empty());
    let auth = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if cert_ok || server.authorized(auth) {
        Ok(())
    } else {
        Err(Status::unauthenticated("missing or invalid bearer token"))
    }
}

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let md = request.metadata();
        let agent_id = agent_id_of(md);
        if let Err(status) = check_auth(&self.server, &request) {
            tracing::warn!(agent = ?agent_id.as_ref().ok(), remote = ?request.remote_addr(), "agent refused: bad or missing token");
            return Err(status);
        }
        let agent_id = agent_id?;
        let (identifiers, warnings) = md
            .get("agentidentifiers")
            .and_then(|v| v.to_str().ok())
            .map(Identifiers::parse)
            .unwrap_or_default();
        for w in warnings {
            tracing::warn!(agent = %agent_id, "agentidentifiers: {w}");
        }
        let window = (self.server.config.window > 0
            && md
                .get(FLOW_CONTROL_KEY)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == "1"))
        .then_some(self.server.config.window);
        let (tx, rx) = mpsc::channel::<Packet>(OUTBOUND_PACKETS);
        let conn = self
            .server
            .add_agent(agent_id.clone(), identifiers.clone(), tx, window);
        tracing::info!(agent = %agent_id, ?identifiers, flow_control = window.is_some(), "agent connected");
        let mut inbound = request.into_inner();
        let server = self.server.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(packet)) => conn.handle_from_agent(packet),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(agent = %conn.agent_id, code = ?status.code(), "agent stream ended: {}", status.message());
                        break;
                    }
                }
            }
            tracing::info!(agent = %conn.agent_id, "agent disconnected");
            server.remove_agent(&conn);
        });
        let stream: PacketStream = Box::pin(ReceiverStream::new(rx).map(Ok));
        let mut response = Response::new(stream);
        let h = response.metadata_mut();
        h.insert(
            "serverid",
            MetadataValue::try_from(self.server.config.server_id.as_str())
                .map_err(|_| Status::internal("server id is not a valid header"))?,
        );
        h.insert(
            "servercount",
            MetadataValue::from(self.server.config.server_count),
        );
        if let Some(w) = window {
            h.insert(FLOW_CONTROL_KEY, MetadataValue::from(w));
        }
        Ok(response)
    }
}
