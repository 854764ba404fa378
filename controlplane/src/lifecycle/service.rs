//! `berth.node.v1.NodeService`, authenticated with the tunnel's bearer tokens.
use std::sync::Arc;

use berth_proto::node::{
    HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse,
    node_service_server::NodeService,
};
use tonic::{Request, Response, Status};

use super::Registry;
use crate::tunnel::{TunnelServer, agent::check_auth};

/// The node API service.
#[derive(Clone)]
pub struct NodeSvc {
    pub registry: Arc<Registry>,
    /// Holds the accepted tokens.
    pub tunnel: Arc<TunnelServer>,
}

#[tonic::async_trait]
impl NodeService for NodeSvc {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        check_auth(&self.tunnel, &request)?;
        self.registry
            .register(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        check_auth(&self.tunnel, &request)?;
        self.registry
            .heartbeat(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}

/// A store that cannot be reached is UNAVAILABLE (the agent retries: nothing was written); a
/// refused request FAILED_PRECONDITION.
fn to_status(e: crate::Error) -> Status {
    match e {
        crate::Error::Store(_) | crate::Error::Schema { .. } => Status::unavailable(e.to_string()),
        e => Status::failed_precondition(e.to_string()),
    }
}
