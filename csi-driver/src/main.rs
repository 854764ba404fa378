//! berth-csi: thin binary over the `berth_csi` library.
use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = berth_csi::server::Args::parse();
    // Two workers are plenty for CSI traffic and keep the node plugin's memory small; mount and
    // mkfs work runs on the blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(berth_csi::server::run(args))
        .context("berth-csi")
}
