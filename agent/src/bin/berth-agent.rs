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
    let net = u32::from_ne_bytes(settings.pod_cidr.network().octets());
    let mask = u32::from_ne_bytes(settings.pod_cidr.netmask().octets());
    let dp = EbpfDatapath::load(
        &settings.pin_root,
        &settings.state_dir,
        DatapathConfig {
            pod_net: net,
            pod_mask: mask,
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
        let drain_core = core.clone();
        let queue_dir = settings.cni_state_dir.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let c = drain_core.clone();
                let d = queue_dir.clone();
                match tokio::task::spawn_blocking(move || c.drain_delete_queue(&d)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(drained = n, "delete queue drained"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "delete queue drain failed"),
                    Err(e) => tracing::warn!(error = %e, "delete queue task failed"),
                }
            }
        });
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; the datapath stays pinned and attached");
        };
        server::serve(core, listener, shutdown).await?;
        let _ = std::fs::remove_file(&settings.socket);
        anyhow::Ok(())
    })
}
