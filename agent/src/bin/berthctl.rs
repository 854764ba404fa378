//! `berthctl` — inspect a running berth-agent.
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Inspect the Berth agent on this node.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// The agent's socket.
    #[arg(
        long,
        env = "BERTH_AGENT_SOCKET",
        default_value = "/run/berth/agent.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Agent, datapath and IPAM status.
    Status,
    /// Endpoints: container, pod, IP, interface, packets/bytes, drops.
    Endpoints,
    /// This node's registration, lifecycle state and last lifecycle commands (from the state file
    /// the agent's tunnel writes).
    Node {
        #[arg(long, default_value = "/run/berth/node.json")]
        state_file: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Node { state_file } = &cli.cmd {
        let state = berth_agent::node::read_state(state_file).with_context(|| {
            format!("read {} (is the agent's tunnel on?)", state_file.display())
        })?;
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&state)?);
        } else {
            print!("{}", berth_agent::node::format_state(&state));
        }
        return Ok(());
    }
    let mut client = berth_agent::server::connect_grpc(&cli.socket)
        .await
        .with_context(|| format!("connect to berth-agent at {}", cli.socket.display()))?;
    match cli.cmd {
        Cmd::Status => {
            let s = client
                .status(berth_proto::agent::StatusRequest {})
                .await?
                .into_inner();
            let dp = s.datapath.clone().unwrap_or_default();
            let ipam = s.ipam.clone().unwrap_or_default();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": s.version, "node": s.node_name, "uptimeSeconds": s.uptime_seconds,
                        "datapath": {"loaded": dp.loaded, "pinRoot": dp.pin_root, "programs": dp.programs,
                                     "maps": dp.maps, "adopted": dp.adopted},
                        "ipam": {"podCidr": ipam.pod_cidr, "capacity": ipam.capacity, "allocated": ipam.allocated},
                        "endpoints": s.endpoints, "deleteQueueDrained": s.delete_queue_drained,
                    })
                );
            } else {
                println!(
                    "agent      berth-agent {} on node {} (up {}s)",
                    s.version, s.node_name, s.uptime_seconds
                );
                println!(
                    "datapath   {} ({}), pins under {}",
                    if dp.loaded { "loaded" } else { "NOT LOADED" },
                    if dp.adopted {
                        "adopted existing pins"
                    } else {
                        "loaded fresh"
                    },
                    dp.pin_root
                );
                println!("           programs: {}", dp.programs.join(", "));
                println!("           maps: {}", dp.maps.join(", "));
                println!(
                    "ipam       {}: {} of {} addresses allocated",
                    ipam.pod_cidr, ipam.allocated, ipam.capacity
                );
                println!(
                    "endpoints  {} (delete-queue entries applied: {})",
                    s.endpoints, s.delete_queue_drained
                );
            }
        }
        Cmd::Node { .. } => unreachable!("handled before connecting"),
        Cmd::Endpoints => {
            let eps = client
                .list_endpoints(berth_proto::agent::ListEndpointsRequest {})
                .await?
                .into_inner()
                .endpoints;
            if cli.json {
                let v: Vec<_> = eps
                    .iter()
                    .map(|e| {
                        let a = e.attachment.clone().unwrap_or_default();
                        let p = e.pod.clone().unwrap_or_default();
                        let s = e.stats.clone().unwrap_or_default();
                        serde_json::json!({
                            "id": e.id, "containerID": a.container_id, "ifname": a.ifname,
                            "pod": format!("{}/{}", p.namespace, p.name), "address": e.address,
                            "hostInterface": e.host_ifname, "state": e.state,
                            "txPackets": s.tx_packets, "txBytes": s.tx_bytes,
                            "rxPackets": s.rx_packets, "rxBytes": s.rx_bytes, "drops": s.drops,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<4} {:<14} {:<24} {:<14} {:<16} {:<6} {:>16} {:>16} DROPS",
                    "ID",
                    "CONTAINER",
                    "POD",
                    "IP",
                    "INTERFACE",
                    "STATE",
                    "TX PKTS/BYTES",
                    "RX PKTS/BYTES"
                );
                for e in eps {
                    let a = e.attachment.unwrap_or_default();
                    let p = e.pod.unwrap_or_default();
                    let s = e.stats.unwrap_or_default();
                    let pod = if p.name.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{}/{}", p.namespace, p.name)
                    };
                    let drops = if s.drops.is_empty() {
                        "0".to_string()
                    } else {
                        s.drops
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{:<4} {:<14} {:<24} {:<14} {:<16} {:<6} {:>16} {:>16} {}",
                        e.id,
                        a.container_id.chars().take(12).collect::<String>(),
                        pod,
                        e.address.trim_end_matches("/32"),
                        format!("{}@{}", a.ifname, e.host_ifname),
                        e.state,
                        format!("{}/{}", s.tx_packets, s.tx_bytes),
                        format!("{}/{}", s.rx_packets, s.rx_bytes),
                        drops
                    );
                }
            }
        }
    }
    Ok(())
}
