//! OpenStack API simulator: Keystone v3, Cinder v3, Nova volume attachments and the metadata
//! service, backed by real sparse files and loop devices, so the CSI driver and real OpenStack
//! clients (Python openstacksdk) can run against it on one machine.
//!
//! Attach makes a loop device over the volume's sparse file and the by-id link
//! `virtio-<first 20 chars of the volume id>` under [`SimConfig::by_id_dir`] (there is no udev
//! here); detach removes both. [`SimHandle`] detaches everything it attached when dropped.
pub mod api;
pub mod backend;
pub mod clock;
pub mod model;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use backend::{Backend, by_id_name};
pub use model::{Faults, Instance, Stats};

use crate::{Error, Result};

/// Everything the simulator serves, with defaults good for a one-node demo.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub by_id_dir: PathBuf,
    pub region: String,
    pub domain: String,
    pub username: String,
    pub user_id: String,
    pub password: String,
    pub project_name: String,
    pub project_id: String,
    pub app_cred_id: String,
    pub app_cred_name: String,
    pub app_cred_secret: String,
    /// Lifetime of Keystone tokens (short values exercise re-authentication).
    pub token_ttl: Duration,
    /// Nova's per-instance disk limit (`max_disk_devices_to_attach`).
    pub max_attachments_per_instance: usize,
    pub quota_volumes: usize,
    pub quota_gigabytes: u64,
    pub volume_types: Vec<String>,
    pub default_zone: String,
    pub instances: Vec<Instance>,
    /// Delay of each asynchronous transition (creating → available, attaching → in-use ...).
    pub transition_delay: Duration,
    /// Nova's `cross_az_attach` option.
    pub cross_az_attach: bool,
}

impl SimConfig {
    /// Defaults rooted in `state_dir`: one instance `node-1` in zone `nova`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: state_dir.join("volumes"),
            by_id_dir: state_dir.join("by-id"),
            region: "RegionOne".into(),
            domain: "Default".into(),
            username: "berth".into(),
            user_id: "u-berth".into(),
            password: "berth-secret".into(),
            project_name: "berth".into(),
            project_id: "0c3a2b9f6e4d4c0fa1b2c3d4e5f60718".into(),
            app_cred_id: "ac-berth".into(),
            app_cred_name: "berth-csi".into(),
            app_cred_secret: "berth-app-secret".into(),
            token_ttl: Duration::from_secs(3600),
            max_attachments_per_instance: 128,
            quota_volumes: 1000,
            quota_gigabytes: 100_000,
            volume_types: vec![
                "classic".into(),
                "high-speed".into(),
                "high-speed-gen2".into(),
            ],
            default_zone: "nova".into(),
            instances: vec![Instance {
                id: "7d6b5c2e-1f0a-4e3b-9c8d-2a1b0c9d8e7f".into(),
                name: "node-1".into(),
                availability_zone: "nova".into(),
            }],
            transition_delay: Duration::from_millis(20),
            cross_az_attach: true,
        }
    }

    /// Zones volumes may be created in.
    pub fn zones(&self) -> Vec<String> {
        let mut z: Vec<String> = self
            .instances
            .iter()
            .map(|i| i.availability_zone.clone())
            .collect();
        z.push(self.default_zone.clone());
        z.sort();
        z.dedup();
        z
    }
}

/// The simulator's shared state.
pub struct Sim {
    pub cfg: SimConfig,
    pub base_url: String,
    backend: Backend,
    state: Mutex<model::State>,
}

impl Sim {
    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let st = self.state.lock().expect("sim lock");
        let mut s = st.stats.clone();
        s.volumes = st.volumes.len();
        s.snapshots = st.snapshots.len();
        s
    }

    /// Invalidates every token (clients must re-authenticate).
    pub fn revoke_tokens(&self) {
        self.state.lock().expect("sim lock").tokens.clear();
    }

    /// Current injected faults.
    pub fn faults(&self) -> Faults {
        self.state.lock().expect("sim lock").faults.clone()
    }

    /// Status of a volume (`None` once deleted).
    pub fn volume_status(&self, id: &str) -> Option<String> {
        self.state
            .lock()
            .expect("sim lock")
            .volumes
            .get(id)
            .map(|v| v.status.clone())
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, f: Faults) {
        self.state.lock().expect("sim lock").faults = f;
    }

    /// Waits (bounded) for background transitions, then detaches every loop device and removes
    /// every by-id link the simulator made.
    fn cleanup(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut st = self.state.lock().expect("sim lock");
            st.closed = true;
            if st.inflight == 0 || Instant::now() > deadline {
                for v in st.volumes.values_mut() {
                    if let Some(dev) = v.loop_dev.take() {
                        if let Err(e) = self.backend.detach(&v.id, &dev) {
                            tracing::error!(volume = %v.id, error = %e, "cleanup: detach failed");
                        }
                        v.attachment = None;
                        v.status = "available".into();
                    }
                }
                return;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A running simulator. Dropping it stops the server and detaches all loop devices.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.sim.base_url.clone()
    }

    /// The Keystone v3 URL clients authenticate against.
    pub fn auth_url(&self) -> String {
        format!("{}/identity/v3", self.sim.base_url)
    }

    /// Metadata service base URL for one instance (its `openstack/latest/meta_data.json`).
    pub fn metadata_url(&self, instance_id: &str) -> String {
        format!("{}/metadata/{instance_id}", self.sim.base_url)
    }

    /// Stops serving and cleans up (same as drop).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
            self.sim.cleanup();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the simulator on the current tokio runtime.
pub async fn start(cfg: SimConfig) -> Result<SimHandle> {
    let backend = Backend {
        data_dir: cfg.data_dir.clone(),
        by_id_dir: cfg.by_id_dir.clone(),
    };
    backend.prepare()?;
    if cfg.instances.is_empty() || cfg.volume_types.is_empty() {
        return Err(Error::Config(
            "the simulator needs at least one instance and one volume type".into(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let sim = Arc::new(Sim {
        base_url: format!("http://{addr}"),
        cfg,
        backend,
        state: Mutex::new(model::State::default()),
    });
    let app = api::router(sim.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "simulator HTTP server failed");
        }
    });
    tracing::info!(%addr, "OpenStack simulator listening");
    Ok(SimHandle {
        addr,
        sim,
        shutdown: Some(tx),
    })
}

/// Command-line options of `berth-controlplane openstack`.
#[derive(Clone, Debug, clap::Args)]
pub struct OpenStackArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8774", env = "BERTH_SIM_LISTEN")]
    pub listen: SocketAddr,
    /// Directory for the volumes' sparse files.
    #[arg(long, default_value = "/var/lib/berth-sim")]
    pub state_dir: PathBuf,
    /// Directory where attach makes the `virtio-<id>` links (stands in for /dev/disk/by-id).
    #[arg(long)]
    pub by_id_dir: Option<PathBuf>,
    /// Keystone token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Nova's per-instance disk limit.
    #[arg(long, default_value_t = 128)]
    pub max_attachments: usize,
    /// Cinder quota: number of volumes.
    #[arg(long, default_value_t = 1000)]
    pub quota_volumes: usize,
    /// Cinder quota: gigabytes.
    #[arg(long, default_value_t = 100_000)]
    pub quota_gigabytes: u64,
    /// Instances as `uuid:name:zone` (repeatable); default one instance `node-1` in `nova`.
    #[arg(long = "instance")]
    pub instances: Vec<String>,
    /// Password of the `berth` user (also read from the environment, never logged).
    #[arg(long, env = "BERTH_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Write a clouds.yaml for the simulator's cloud (named `berth-sim`) to this path.
    #[arg(long)]
    pub write_clouds_yaml: Option<PathBuf>,
}

impl OpenStackArgs {
    pub fn into_config(self) -> Result<SimConfig> {
        let mut cfg = SimConfig::new(&self.state_dir);
        cfg.listen = self.listen;
        if let Some(d) = self.by_id_dir {
            cfg.by_id_dir = d;
        }
        cfg.token_ttl = Duration::from_secs(self.token_ttl_secs);
        cfg.max_attachments_per_instance = self.max_attachments;
        cfg.quota_volumes = self.quota_volumes;
        cfg.quota_gigabytes = self.quota_gigabytes;
        if let Some(p) = self.password {
            cfg.password = p;
        }
        if !self.instances.is_empty() {
            cfg.instances = self
                .instances
                .iter()
                .map(|s| {
                    let parts: Vec<&str> = s.split(':').collect();
                    match parts.as_slice() {
                        [id, name, zone] => Ok(Instance {
                            id: id.to_string(),
                            name: name.to_string(),
                            availability_zone: zone.to_string(),
                        }),
                        _ => Err(Error::Config(format!(
                            "--instance {s:?}: expected uuid:name:zone"
                        ))),
                    }
                })
                .collect::<Result<_>>()?;
        }
        Ok(cfg)
    }
}

/// A clouds.yaml document (cloud `berth-sim`) for the simulator at `auth_url`.
pub fn clouds_yaml(cfg: &SimConfig, auth_url: &str) -> String {
    format!(
        "clouds:\n  berth-sim:\n    auth:\n      auth_url: {auth_url}\n      username: {}\n      \
         password: {}\n      project_name: {}\n      user_domain_name: {}\n      \
         project_domain_name: {}\n    region_name: {}\n    identity_api_version: 3\n",
        cfg.username, cfg.password, cfg.project_name, cfg.domain, cfg.domain, cfg.region
    )
}

/// Runs the simulator until SIGINT/SIGTERM, then detaches everything.
pub async fn serve(args: OpenStackArgs) -> Result<()> {
    let clouds_path = args.write_clouds_yaml.clone();
    let cfg = args.into_config()?;
    let handle = start(cfg).await?;
    if let Some(p) = clouds_path {
        // Written whole then renamed: scripts wait for the file to appear.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, clouds_yaml(&handle.sim.cfg, &handle.auth_url()))?;
        std::fs::rename(&tmp, &p)?;
        tracing::info!(path = %p.display(), "wrote clouds.yaml");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping the OpenStack simulator");
    tokio::task::spawn_blocking(move || handle.shutdown())
        .await
        .map_err(|e| Error::Backend(format!("shutdown task: {e}")))?;
    Ok(())
}
