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
    /// Streams NetworkPolicy verdicts from the datapath as they happen: every denied packet, and
    /// every new allowed connection when the agent runs with --monitor-allowed. Reads the
    /// datapath's event ring buffer (needs root; one monitor at a time gets all events).
    Monitor {
        /// Only events where this pod (namespace/name) is an end.
        #[arg(long)]
        pod: Option<String>,
        /// Only events where a pod of this namespace is an end.
        #[arg(long)]
        namespace: Option<String>,
        /// Only `denied` or only `allowed` verdicts.
        #[arg(long, value_parser = ["denied", "allowed"])]
        verdict: Option<String>,
        /// Stop after this many events (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
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
            let rt = s.routing.clone().unwrap_or_default();
            let pol = s.policy.clone().unwrap_or_default();
            let or_none = |v: &str| (!v.is_empty()).then(|| v.to_string());
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": s.version, "node": s.node_name, "uptimeSeconds": s.uptime_seconds,
                        "datapath": {"loaded": dp.loaded, "pinRoot": dp.pin_root, "programs": dp.programs,
                                     "maps": dp.maps, "adopted": dp.adopted},
                        "ipam": {"podCidr": ipam.pod_cidr, "capacity": ipam.capacity, "allocated": ipam.allocated},
                        "routing": {"mode": or_none(&rt.mode), "uplink": or_none(&rt.uplink),
                                    "nodeIp": or_none(&rt.node_ip), "podMtu": rt.pod_mtu,
                                    "remotePodCidrs": rt.remote_pod_cidrs},
                        "endpoints": s.endpoints, "deleteQueueDrained": s.delete_queue_drained,
                        "policy": {"appliedModelRevision": pol.applied_model_revision,
                                   "seenModelRevision": pol.seen_model_revision,
                                   "revision": pol.revision, "policies": pol.policies,
                                   "rejected": pol.rejected, "isolatedEndpoints": pol.isolated_endpoints,
                                   "entries": pol.entries, "identities": pol.identities,
                                   "conntrackMax": pol.conntrack_max},
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
                let dash = |v: &str| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        v.to_string()
                    }
                };
                println!(
                    "routing    {} via uplink {}, node IP {}, pod MTU {}, {} remote pod CIDR{} routed",
                    if rt.mode.is_empty() {
                        "unknown".to_string()
                    } else {
                        rt.mode.clone()
                    },
                    dash(&rt.uplink),
                    dash(&rt.node_ip),
                    rt.pod_mtu,
                    rt.remote_pod_cidrs,
                    if rt.remote_pod_cidrs == 1 { "" } else { "s" }
                );
                println!(
                    "policy     {} polic{} in force on {} isolated endpoint{}, {} map entries, {} identities, revision {}, conntrack table of {} entries",
                    pol.policies,
                    if pol.policies == 1 { "y" } else { "ies" },
                    pol.isolated_endpoints,
                    if pol.isolated_endpoints == 1 { "" } else { "s" },
                    pol.entries,
                    pol.identities,
                    pol.revision,
                    pol.conntrack_max
                );
                for r in &pol.rejected {
                    println!("           REJECTED {r}");
                }
                println!(
                    "endpoints  {} (delete-queue entries applied: {})",
                    s.endpoints, s.delete_queue_drained
                );
            }
        }
        Cmd::Node { .. } => unreachable!("handled before connecting"),
        Cmd::Monitor {
            pod,
            namespace,
            verdict,
            count,
        } => {
            let filter = berth_agent::monitor::Filter {
                pod,
                namespace,
                allowed: verdict.map(|v| v == "allowed"),
            };
            monitor(&mut client, cli.json, filter, count).await?;
        }
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
                print!("{}", endpoints_table(&eps));
            }
        }
    }
    Ok(())
}

/// Names of this node's endpoints, from the agent.
async fn names(
    client: &mut berth_proto::agent::agent_client::AgentClient<tonic::transport::Channel>,
) -> anyhow::Result<berth_agent::monitor::Names> {
    let eps = client
        .list_endpoints(berth_proto::agent::ListEndpointsRequest {})
        .await?
        .into_inner()
        .endpoints;
    let mut n = berth_agent::monitor::Names::default();
    for e in eps {
        let p = e.pod.unwrap_or_default();
        let name = format!("{}/{}", p.namespace, p.name);
        if let Some(ip) = e.address.split('/').next().and_then(|a| a.parse().ok()) {
            n.addresses.insert(ip, name.clone());
        }
        n.endpoints.insert(e.id, name);
    }
    Ok(n)
}

async fn monitor(
    client: &mut berth_proto::agent::agent_client::AgentClient<tonic::transport::Channel>,
    json: bool,
    filter: berth_agent::monitor::Filter,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let status = client
        .status(berth_proto::agent::StatusRequest {})
        .await?
        .into_inner();
    let pin_root = PathBuf::from(status.datapath.unwrap_or_default().pin_root);
    let mut reader = berth_agent::monitor::EventReader::open(&pin_root)
        .with_context(|| format!("open the event ring buffer under {}", pin_root.display()))?;
    // SAFETY: the descriptor is a duplicate this function owns until the AsyncFd is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            reader.as_fd().try_clone_to_owned()?,
            tokio::io::Interest::READABLE,
        )
    }?;
    let mut names = names(client).await?;
    let mut names_at = std::time::Instant::now();
    let mut shown = 0u64;
    if !json {
        eprintln!(
            "listening for policy verdicts on {} (Ctrl-C to stop)",
            status.node_name
        );
    }
    loop {
        while let Some(ev) = reader.next_event() {
            if names_at.elapsed() > std::time::Duration::from_secs(2) {
                names = self::names(client).await?;
                names_at = std::time::Instant::now();
            }
            let v = berth_agent::monitor::view(&ev, &names);
            if !v.matches(&filter) {
                continue;
            }
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", v.line());
            }
            shown += 1;
            if count.is_some_and(|c| shown >= c) {
                return Ok(());
            }
        }
        let mut guard = fd.readable().await?;
        guard.clear_ready();
    }
}

/// The `berthctl endpoints` table: every column as wide as its widest cell (the INTERFACE cell,
/// `eth0@bth` + 12 hex digits, is wider than a fixed width would allow).
fn endpoints_table(eps: &[berth_proto::agent::Endpoint]) -> String {
    const HEAD: [&str; 9] = [
        "ID",
        "CONTAINER",
        "POD",
        "IP",
        "INTERFACE",
        "STATE",
        "TX PKTS/BYTES",
        "RX PKTS/BYTES",
        "DROPS",
    ];
    // Right-aligned: the counters.
    const RIGHT: [bool; 9] = [false, false, false, false, false, false, true, true, false];
    let mut rows: Vec<[String; 9]> = vec![HEAD.map(String::from)];
    for e in eps {
        let a = e.attachment.clone().unwrap_or_default();
        let p = e.pod.clone().unwrap_or_default();
        let s = e.stats.clone().unwrap_or_default();
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
        rows.push([
            e.id.to_string(),
            a.container_id.chars().take(12).collect(),
            pod,
            e.address.trim_end_matches("/32").to_string(),
            format!("{}@{}", a.ifname, e.host_ifname),
            e.state.clone(),
            format!("{}/{}", s.tx_packets, s.tx_bytes),
            format!("{}/{}", s.rx_packets, s.rx_bytes),
            drops,
        ]);
    }
    let mut width = [0usize; 9];
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let pad = " ".repeat(width[i] - cell.chars().count());
            if i == r.len() - 1 {
                line.push_str(cell); // the last column: no trailing blanks
            } else if RIGHT[i] {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&pad);
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::agent::{Attachment, Endpoint, EndpointStats, PodRef};

    #[test]
    fn endpoints_table_columns_line_up_with_their_headers() {
        let ep = |id: u32, cid: &str, host: &str, tx: u64| Endpoint {
            id,
            attachment: Some(Attachment {
                container_id: cid.into(),
                ifname: "eth0".into(),
            }),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: format!("web-{id}"),
                ..Default::default()
            }),
            address: format!("10.2.0.{id}/32"),
            host_ifname: host.into(),
            state: "ready".into(),
            stats: Some(EndpointStats {
                tx_packets: tx,
                tx_bytes: tx * 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = endpoints_table(&[
            ep(2, "0123456789abcdef", "bth6e65cfdb4c19", 7),
            ep(13, "c2", "bth123dae003fa3", 123456),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let col = |line: &str, needle: &str| {
            line.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {line}"))
        };
        // Left-aligned columns start where their header starts.
        for (head, cell) in [
            ("INTERFACE", "eth0@bth"),
            ("STATE", "ready"),
            ("IP", "10.2.0."),
        ] {
            let at = col(lines[0], head);
            for l in &lines[1..] {
                assert_eq!(col(l, cell), at, "{head}:\n{table}");
            }
        }
        // Right-aligned counters end where their header ends.
        let end = col(lines[0], "TX PKTS/BYTES") + "TX PKTS/BYTES".len();
        assert_eq!(col(lines[1], "7/700") + "7/700".len(), end, "{table}");
        assert_eq!(
            col(lines[2], "123456/12345600") + "123456/12345600".len(),
            end,
            "{table}"
        );
        assert!(
            lines[1].contains("0123456789ab "),
            "container ID cut to 12: {table}"
        );
    }
}
