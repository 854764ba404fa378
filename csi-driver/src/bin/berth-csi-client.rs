//! berth-csi-client: a minimal CSI client for demos and debugging (in the spirit of `csc`):
//! one RPC per invocation against a CSI unix socket, results printed as plain text.
use std::path::PathBuf;

use anyhow::{Context, bail};
use berth_proto::csi::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient, volume_capability::access_mode::Mode,
};
use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
#[command(
    name = "berth-csi-client",
    version,
    about = "Call one CSI RPC on a CSI socket"
)]
struct Cli {
    /// CSI endpoint, `unix:///path/csi.sock`.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GetPluginInfo + NodeGetInfo.
    Info,
    /// CreateVolume; prints the volume ID.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 1)]
        size_gib: i64,
        #[arg(long, default_value = "ext4")]
        fs: String,
        #[arg(long)]
        r#type: Option<String>,
    },
    Delete {
        #[arg(long)]
        volume: String,
    },
    /// ControllerPublishVolume (Nova attach).
    Attach {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        node: String,
    },
    /// ControllerUnpublishVolume (Nova detach).
    Detach {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        node: String,
    },
    Stage {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
        #[arg(long, default_value = "ext4")]
        fs: String,
    },
    Unstage {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
    },
    Publish {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
        #[arg(long)]
        target: PathBuf,
        #[arg(long, default_value = "ext4")]
        fs: String,
        #[arg(long)]
        readonly: bool,
    },
    Unpublish {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// NodeGetVolumeStats.
    Stats {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        path: PathBuf,
    },
}

fn mount_cap(fs: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let Some(path) = endpoint.strip_prefix("unix://") else {
        bail!("endpoint must be unix:///path, got {endpoint:?}");
    };
    let path = PathBuf::from(path);
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connect to {endpoint}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ch = channel(&cli.endpoint).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    match cli.cmd {
        Cmd::Info => {
            let i = IdentityClient::new(ch)
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await?
                .into_inner();
            let n = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await?
                .into_inner();
            println!("driver {} {}", i.name, i.vendor_version);
            println!("node_id {}", n.node_id);
            println!("max_volumes_per_node {}", n.max_volumes_per_node);
            for (k, v) in n
                .accessible_topology
                .map(|t| t.segments)
                .unwrap_or_default()
            {
                println!("topology {k}={v}");
            }
        }
        Cmd::Create {
            name,
            size_gib,
            fs,
            r#type,
        } => {
            let mut parameters = std::collections::HashMap::new();
            if let Some(t) = r#type {
                parameters.insert("type".to_string(), t);
            }
            let v = ctl
                .create_volume(csi::CreateVolumeRequest {
                    name,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size_gib << 30,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_cap(&fs)],
                    parameters,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .context("no volume in the answer")?;
            println!("{}", v.volume_id);
        }
        Cmd::Delete { volume } => {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume,
                ..Default::default()
            })
            .await?;
        }
        Cmd::Attach { volume, node: n } => {
            let r = ctl
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: volume,
                    node_id: n,
                    volume_capability: Some(mount_cap("")),
                    ..Default::default()
                })
                .await?
                .into_inner();
            for (k, v) in r.publish_context {
                println!("{k}={v}");
            }
        }
        Cmd::Detach { volume, node: n } => {
            ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume,
                node_id: n,
                ..Default::default()
            })
            .await?;
        }
        Cmd::Stage {
            volume,
            staging,
            fs,
        } => {
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume,
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap(&fs)),
                ..Default::default()
            })
            .await?;
        }
        Cmd::Unstage { volume, staging } => {
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume,
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        }
        Cmd::Publish {
            volume,
            staging,
            target,
            fs,
            readonly,
        } => {
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: volume,
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_cap(&fs)),
                readonly,
                ..Default::default()
            })
            .await?;
        }
        Cmd::Unpublish { volume, target } => {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume,
                target_path: target.display().to_string(),
            })
            .await?;
        }
        Cmd::Stats { volume, path } => {
            let s = node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: volume,
                    volume_path: path.display().to_string(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            for u in s.usage {
                let unit = csi::volume_usage::Unit::try_from(u.unit)
                    .map(|x| x.as_str_name())
                    .unwrap_or("?");
                println!(
                    "{unit}: total {} used {} available {}",
                    u.total, u.used, u.available
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
        .map_err(|e| match e.downcast::<tonic::Status>() {
            Ok(s) => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
            Err(e) => e,
        })
}
