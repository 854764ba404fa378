//! berth-controlplane: thin binary over the `berth_controlplane` library.
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth-controlplane",
    version,
    about = "Berth's provider side: tunnel server, node lifecycle, OpenStack simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the tunnel server (Konnectivity AgentService + ProxyService + HTTP CONNECT), the node
    /// API and the node lifecycle controller.
    Serve(Box<berth_controlplane::serve::ServeArgs>),
    /// Show the nodes, their states and pending actions of a running control plane.
    Status(berth_controlplane::status::StatusArgs),
    /// Ask a running control plane for an action (upgrade, drain, pods and PDBs of the model).
    Admin(berth_controlplane::status::AdminArgs),
    /// Run the OpenStack API simulator (Keystone, Cinder, Nova, metadata) on loop devices.
    Openstack(berth_controlplane::openstack::OpenStackArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match cli.command {
        Command::Serve(args) => rt
            .block_on(berth_controlplane::serve::run_until_signal(*args))
            .context("serve")?,
        Command::Status(args) => {
            let out = rt
                .block_on(berth_controlplane::status::run_status(&args))
                .context("status")?;
            print!("{out}");
        }
        Command::Openstack(args) => rt
            .block_on(berth_controlplane::openstack::serve(args))
            .context("openstack simulator")?,
        Command::Admin(args) => {
            let out = rt
                .block_on(berth_controlplane::status::run_admin(&args))
                .context("admin")?;
            println!("{out}");
        }
    }
    Ok(())
}
