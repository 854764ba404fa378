//! One node session per tunnel connection: Register, then Heartbeat every interval over the same
//! HTTP/2 connection as the tunnel (so the node talks to the replica it is tunnelled to).
use std::{sync::Arc, time::Duration};

use berth_proto::node::{
    HeartbeatRequest, RegisterRequest, node_service_client::NodeServiceClient,
};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

use super::{NodeAgent, conditions::Probes};

/// Settings of a node session.
#[derive(Clone)]
pub struct SessionConfig {
    pub probes: Probes,
    /// Heartbeat period; `None` = the server's hint.
    pub heartbeat: Option<Duration>,
    /// `Bearer <token>` (sensitive: never logged); `None` with mTLS.
    pub authorization: Option<MetadataValue<Ascii>>,
    /// Set while the tunnel drains.
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

fn req<T>(cfg: &SessionConfig, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(a) = &cfg.authorization {
        r.metadata_mut().insert("authorization", a.clone());
    }
    r.set_timeout(Duration::from_secs(10));
    r
}

/// Runs until the task is aborted (the tunnel connection closed).
pub async fn run(node: Arc<NodeAgent>, channel: Channel, server_id: String, cfg: SessionConfig) {
    let mut client = NodeServiceClient::new(channel);
    let mut base: Option<Duration> = None;
    let mut next_sleep = Duration::ZERO;
    // Commands are deduplicated per registry (replicas sharing one deliver the same commands).
    let mut registry = server_id.clone();
    loop {
        if node.terminated() {
            tracing::info!(server = %server_id, "node terminated: no more heartbeats");
            return;
        }
        let Some(period) = base else {
            let (reg, agent_start_ms, sequence) = node.stamped_registration();
            match client
                .register(req(
                    &cfg,
                    RegisterRequest {
                        node: Some(reg),
                        agent_start_ms,
                        sequence,
                    },
                ))
                .await
            {
                Ok(resp) => {
                    let r = resp.into_inner();
                    tracing::info!(server = %server_id, state = %r.state, "node registered");
                    node.set_server_state(&server_id, &r.state);
                    registry = if r.registry_id.is_empty() {
                        server_id.clone()
                    } else {
                        r.registry_id.clone()
                    };
                    let hint = (r.heartbeat_interval_ms > 0)
                        .then(|| Duration::from_millis(r.heartbeat_interval_ms));
                    base = Some(cfg.heartbeat.or(hint).unwrap_or(Duration::from_secs(10)));
                    // First heartbeat right away so the node turns Ready promptly.
                    next_sleep = Duration::ZERO;
                }
                Err(status) => {
                    tracing::warn!(server = %server_id, code = ?status.code(), "node registration failed: {}", status.message());
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            continue;
        };
        tokio::time::sleep(next_sleep).await;
        next_sleep = period;
        let conditions = super::conditions::probe(&cfg.probes).await;
        node.set_conditions(&conditions);
        let acks = node.take_acks(&server_id);
        let (version, agent_start_ms, sequence) = node.stamp();
        let hb = HeartbeatRequest {
            instance_id: node.registration().instance_id,
            conditions,
            version,
            acks: acks.clone(),
            shutting_down: cfg.shutting_down.load(std::sync::atomic::Ordering::Relaxed),
            agent_start_ms,
            sequence,
        };
        match client.heartbeat(req(&cfg, hb)).await {
            Ok(resp) => {
                let r = resp.into_inner();
                if !r.known {
                    tracing::info!(server = %server_id, "control plane does not know this node: registering again");
                    base = None;
                    continue;
                }
                node.set_server_state(&server_id, &r.state);
                for cmd in &r.commands {
                    node.handle(&registry, &server_id, cmd).await;
                }
                if !r.commands.is_empty() {
                    // Acknowledge promptly.
                    next_sleep = period.min(Duration::from_millis(100));
                }
            }
            Err(status) => {
                node.return_acks(&server_id, acks);
                tracing::warn!(server = %server_id, code = ?status.code(), "heartbeat failed: {}", status.message());
            }
        }
    }
}
