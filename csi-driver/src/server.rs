//! Command-line options and the gRPC server on the CSI unix socket.
use std::{path::PathBuf, sync::Arc, time::Duration};

use berth_proto::csi::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};

use crate::{
    Error, Result,
    config::load_credentials,
    controller::{ControllerConfig, ControllerService},
    host::RealHost,
    identity::IdentityService,
    inflight::Inflight,
    metadata::MetadataSource,
    node::{NodeConfig, NodeOps, NodeService},
    openstack::Client,
};

/// Default CSI socket (DESIGN §5).
pub const DEFAULT_ENDPOINT: &str =
    "unix:///var/lib/kubelet/plugins/cinder.csi.openstack.org/csi.sock";
/// The most volumes Berth lets a node hold (the platform limit).
pub const PLATFORM_MAX_VOLUMES: i64 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Controller,
    Node,
    All,
}

/// Options of `berth-csi`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "berth-csi",
    version,
    about = "Cinder CSI driver (cinder.csi.openstack.org) for Berth"
)]
pub struct Args {
    /// CSI endpoint, `unix:///path/csi.sock`.
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    pub role: Role,
    /// cinder-csi-plugin style cloud.conf (`[Global]` credentials).
    #[arg(long, env = "CLOUD_CONFIG")]
    pub cloud_config: Option<PathBuf>,
    /// clouds.yaml path (with `--cloud` / `OS_CLOUD`); otherwise `OS_*` variables.
    #[arg(long)]
    pub clouds_yaml: Option<PathBuf>,
    /// Cloud name in clouds.yaml.
    #[arg(long)]
    pub cloud: Option<String>,
    /// Volumes per node: enforced by the controller, advertised by the node (≤ 100).
    #[arg(long, env = "BERTH_CSI_MAX_VOLUMES")]
    pub max_volumes_per_node: Option<i64>,
    /// Directory of the disks' by-id links.
    #[arg(long, default_value = "/dev/disk/by-id")]
    pub device_dir: PathBuf,
    /// Config drive: a mounted directory or the block device.
    #[arg(long, default_value = "/dev/disk/by-label/config-2")]
    pub config_drive: PathBuf,
    /// Metadata service base URL.
    #[arg(long, default_value = "http://169.254.169.254")]
    pub metadata_url: String,
    /// Metadata search order (cloud.conf `[Metadata] search-order` overrides the default).
    #[arg(long)]
    pub metadata_search_order: Option<String>,
    /// Tries to find an attached disk.
    #[arg(long, default_value_t = 10)]
    pub device_attempts: u32,
    /// Bound on waiting for Cinder/Nova transitions, seconds.
    #[arg(long, default_value_t = 120)]
    pub op_timeout_secs: u64,
}

fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let p = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| Error::Config(format!("endpoint {endpoint:?} must be unix:///path")))?;
    if !p.starts_with('/') {
        return Err(Error::Config(format!(
            "endpoint {endpoint:?} must be an absolute unix path"
        )));
    }
    Ok(PathBuf::from(p))
}

/// Serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> Result<()> {
    let path = socket_path(&args.endpoint)?;
    let controller_role = matches!(args.role, Role::Controller | Role::All);
    let node_role = matches!(args.role, Role::Node | Role::All);

    let (creds, conf) = if controller_role || args.cloud_config.is_some() {
        let (c, conf) = load_credentials(
            args.cloud_config.as_deref(),
            args.clouds_yaml.as_deref(),
            args.cloud.as_deref(),
        )?;
        (Some(c), conf)
    } else {
        (None, Default::default())
    };
    let max = args
        .max_volumes_per_node
        .or(conf.node_volume_attach_limit)
        .unwrap_or(PLATFORM_MAX_VOLUMES);
    if !(1..=PLATFORM_MAX_VOLUMES).contains(&max) {
        return Err(Error::Config(format!(
            "max volumes per node {max} must be between 1 and the platform's {PLATFORM_MAX_VOLUMES}"
        )));
    }
    let inflight = Inflight::default();
    let mut router =
        tonic::transport::Server::builder().add_service(IdentityServer::new(IdentityService {
            controller: controller_role,
        }));
    if controller_role {
        let creds = creds.expect("loaded for the controller role");
        tracing::info!(auth_url = %creds.auth_url, "controller: OpenStack credentials loaded");
        let client = Arc::new(Client::new(creds)?);
        router = router.add_service(ControllerServer::new(ControllerService::new(
            client,
            ControllerConfig {
                max_volumes_per_node: max as usize,
                op_timeout: Duration::from_secs(args.op_timeout_secs),
                ..Default::default()
            },
            inflight.clone(),
        )));
    }
    if node_role {
        let order = args
            .metadata_search_order
            .clone()
            .or(conf.metadata_search_order.clone())
            .unwrap_or_else(|| "configDrive,metadataService".into());
        let ops = NodeOps {
            cfg: NodeConfig {
                device_dir: args.device_dir.clone(),
                max_volumes_per_node: max,
                metadata: MetadataSource {
                    search_order: order.split(',').map(|s| s.trim().to_string()).collect(),
                    config_drive: args.config_drive.clone(),
                    metadata_url: args.metadata_url.clone(),
                },
                device_attempts: args.device_attempts,
                device_first_delay: Duration::from_millis(100),
            },
            host: Arc::new(RealHost),
        };
        router = router.add_service(NodeServer::new(NodeService::new(ops, inflight)));
    }

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    }
    tracing::info!(socket = %path.display(), controller = controller_role, node = node_role, max_volumes_per_node = max, "berth-csi serving");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    let res = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    res.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///a/b.sock").unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://rel").is_err());
    }
}
