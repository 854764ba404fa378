//! `berth-agent` — Berth's node daemon (thin binary over the berth_agent library).
use anyhow::Context;
use berth_agent::{
    config::AgentArgs,
    core::{AgentCore, CoreConfig},
    datapath::EbpfDatapath,
    server,
    store::Store,
};
use berth_ebpf_common::DatapathConfig;
use clap::Parser;
use std::{sync::Arc, time::Duration};

/// Berth node agent: loads and pins the eBPF datapath, allocates pod addresses, keeps the endpoint
/// registry and serves the local API to the CNI plugin and berthctl.
///
/// Restarting the agent does not interrupt pod traffic: programs and maps stay pinned and tc
/// filters stay attached; the next agent adopts them.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Konnectivity-compatible tunnel and node registration (optional: only with
    /// --tunnel-server).
    #[command(flatten)]
    tunnel: berth_agent::tunnel::TunnelArgs,
    /// Seconds between housekeeping passes: apply the CNI delete queue, release endpoints whose
    /// pod interface vanished without a DEL.
    #[arg(long, env = "BERTH_HOUSEKEEPING_INTERVAL", default_value_t = 10)]
    housekeeping_interval: u64,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "BERTH_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = cli.agent.resolve()?;
    tracing::info!(?settings, "berth-agent starting");

    if settings.ip_forward {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable IPv4 forwarding")?;
    }
    let dp = EbpfDatapath::load(
        &settings.pin_root,
        &settings.state_dir,
        DatapathConfig {
            anti_spoof: 1,
            _pad: 0,
        },
    )
    .context("load datapath")?;
    let store = Store::new(&settings.state_dir, settings.fsync)?;
    let (del_tx, del_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u32)>();
    let core = Arc::new(
        AgentCore::new(
            CoreConfig {
                node_name: settings.node_name.clone(),
                pod_cidr: settings.pod_cidr,
                mtu: settings.mtu,
            },
            store,
            Box::new(dp),
        )?
        .with_link_deleter(Box::new(move |name, index| {
            let _ = del_tx.send((name, index));
        })),
    );
    let drained = core.drain_delete_queue(&settings.cni_state_dir)?;
    if drained > 0 {
        tracing::info!(drained, "applied DELs queued while the agent was down");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tokio::spawn(berth_agent::links::delete_links(del_rx));
        let listener = server::bind(&settings.socket).await?;
        tracing::info!(socket = %settings.socket.display(), "serving local API");
        // DELs that raced with start-up land in the queue after the first drain.
        let housekeeping = Duration::from_secs(cli.housekeeping_interval.max(1));
        let drain_core = core.clone();
        let queue_dir = settings.cni_state_dir.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(housekeeping).await;
                let c = drain_core.clone();
                let d = queue_dir.clone();
                // Queued DELs, then endpoints whose pod vanished without one.
                let work = move || {
                    c.drain_delete_queue(&d)
                        .and_then(|n| Ok((n, c.sweep_vanished()?)))
                };
                match tokio::task::spawn_blocking(work).await {
                    Ok(Ok((0, 0))) => {}
                    Ok(Ok((drained, swept))) => tracing::info!(drained, swept, "housekeeping"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "housekeeping failed"),
                    Err(e) => tracing::warn!(error = %e, "housekeeping task failed"),
                }
            }
        });
        // The tunnel (issue 3) runs beside the local API when a server is given.
        let (tunnel_tx, tunnel_rx) = berth_agent::tunnel::shutdown_channel();
        let tunnel = (!cli.tunnel.servers.is_empty()).then(|| {
            let basics = berth_agent::tunnel::NodeBasics {
                node_name: settings.node_name.clone(),
                pod_cidr: Some(settings.pod_cidr.into()),
            };
            let args = cli.tunnel.clone();
            tokio::spawn(async move {
                if let Err(e) = berth_agent::tunnel::run(args, basics, tunnel_rx).await {
                    tracing::error!("tunnel stopped: {e}");
                }
            })
        });
        let has_tunnel = tunnel.is_some();
        let shutdown = async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if has_tunnel {
                // First signal: DRAIN (no new dials, open streams finish); second: exit.
                tracing::info!("draining the tunnel; signal again to stop");
                let _ = tunnel_tx.send(berth_agent::tunnel::Shutdown::Drain);
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            let _ = tunnel_tx.send(berth_agent::tunnel::Shutdown::Exit);
            tracing::info!("shutting down; the datapath stays pinned and attached");
        };
        server::serve(core, listener, shutdown).await?;
        if let Some(t) = tunnel
            && tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
        {
            tracing::warn!("tunnel did not stop in time");
        }
        let _ = std::fs::remove_file(&settings.socket);
        anyhow::Ok(())
    })
}
