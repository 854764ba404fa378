//! `berth-agent` — Berth's node daemon (thin binary over the berth_agent library; the start-up
//! order lives in `berth_agent::daemon`).
use berth_agent::{config::AgentArgs, core::DEFAULT_ALLOCATION_LEASE, daemon};
use clap::Parser;
use std::time::Duration;

/// Berth node agent: loads and pins the eBPF datapath, allocates pod addresses, keeps the endpoint
/// registry, routes pod traffic to the other nodes (native routing or VXLAN) from the cluster
/// state (the Kubernetes API or a directory of manifests), and serves the local API to the CNI
/// plugin and berthctl.
///
/// Restarting the agent does not interrupt pod traffic: programs and maps stay pinned, tc filters
/// stay attached and routes stay in place; the next agent adopts them. Only one agent may use a
/// state directory at a time.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Where the cluster state comes from.
    #[command(flatten)]
    source: berth_agent::cluster::SourceArgs,
    /// Konnectivity-compatible tunnel and node registration (optional: only with
    /// --tunnel-server).
    #[command(flatten)]
    tunnel: berth_agent::tunnel::TunnelArgs,
    /// Seconds between housekeeping passes: apply the CNI delete queue, release endpoints whose
    /// pod interface vanished without a DEL, reclaim expired allocations.
    #[arg(long, env = "BERTH_HOUSEKEEPING_INTERVAL", default_value_t = 10)]
    housekeeping_interval: u64,
    /// Seconds an address may stay allocated without becoming an endpoint (the plugin was killed
    /// mid-ADD and the runtime sends no GC) before it is reclaimed.
    #[arg(long, env = "BERTH_ALLOCATION_LEASE", default_value_t = DEFAULT_ALLOCATION_LEASE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    allocation_lease: u64,
    /// Seconds to wait at start-up for the state source's first list and this node's pod CIDR.
    #[arg(long, env = "BERTH_SOURCE_TIMEOUT", default_value_t = 120)]
    source_timeout: u64,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "BERTH_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(std::net::IpAddr::V4(ip)) = cli.tunnel.node_ip {
        cli.agent.node_ip = Some(ip);
    }
    tracing_subscriber::fmt()
        // netlink-packet-route warns about every kernel attribute newer than itself: noise.
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "netlink_packet_route=error,{}",
            cli.log
        )))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = cli.agent.resolve()?;
    tracing::info!(?settings, "berth-agent starting");
    let opts = daemon::Options {
        settings,
        source: cli.source,
        tunnel: cli.tunnel,
        housekeeping_interval: Duration::from_secs(cli.housekeeping_interval.max(1)),
        allocation_lease: Duration::from_secs(cli.allocation_lease),
        source_timeout: Duration::from_secs(cli.source_timeout.max(1)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(opts))?;
    Ok(())
}
