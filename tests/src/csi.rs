//! Harness for the CSI end-to-end tests: the OpenStack simulator (in-process, on its own
//! runtime), the real `berth-csi` binary as a child process, and gRPC clients over its unix
//! socket. [`CsiEnv`] owns everything it creates — driver process, mounts under its directory,
//! loop devices over its sparse files, the directory itself — and removes it on drop, also when
//! the test fails.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use berth_controlplane::openstack::{self, SimConfig, SimHandle};
use berth_proto::csi::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient, volume_capability::access_mode::Mode,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::netns::{require_root, workspace_bin};

pub const GIB: i64 = 1 << 30;

/// How the driver gets its OpenStack credentials.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Creds {
    /// cinder-csi style cloud.conf with user/password.
    CloudConf,
    /// clouds.yaml entry with user/password.
    CloudsYaml,
    /// `OS_*` variables with an application credential.
    EnvAppCredential,
}

/// Options of one test environment.
pub struct EnvOptions {
    pub creds: Creds,
    pub driver_args: Vec<String>,
    /// The `berth-csi` binary (default: next to the test executable).
    pub driver_bin: Option<PathBuf>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            creds: Creds::CloudConf,
            driver_args: Vec::new(),
            driver_bin: None,
        }
    }
}

/// The gRPC clients of one driver.
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// A simulator + driver environment.
pub struct CsiEnv {
    pub dir: tempfile::TempDir,
    pub sim: Option<SimHandle>,
    rt: Option<tokio::runtime::Runtime>,
    driver: Option<Child>,
    pub socket: PathBuf,
    pub by_id: PathBuf,
    /// Node ID of the (first) simulated instance.
    pub node_id: String,
    opts: EnvOptions,
    pub clients: Option<Clients>,
}

/// A second instance every environment has, to test "attached elsewhere".
pub const OTHER_NODE: &str = "a1b2c3d4-0000-4000-8000-00000000beef";

impl CsiEnv {
    /// Starts the simulator (after `tune` adjusted its config) and the driver.
    pub fn start(tune: impl FnOnce(&mut SimConfig), opts: EnvOptions) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-csi-test-")
            .tempdir()
            .expect("temp dir");
        let mut cfg = SimConfig::new(dir.path().join("sim"));
        cfg.instances.push(openstack::Instance {
            id: OTHER_NODE.into(),
            name: "node-2".into(),
            availability_zone: "nova".into(),
        });
        cfg.transition_delay = Duration::from_millis(5);
        tune(&mut cfg);
        let node_id = cfg.instances[0].id.clone();
        let by_id = cfg.by_id_dir.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("simulator runtime");
        // Start on the simulator's own runtime (the caller may be inside another runtime).
        let (rt, sim) = std::thread::spawn(move || {
            let h = rt.block_on(openstack::start(cfg));
            (rt, h)
        })
        .join()
        .expect("simulator start thread");
        let sim = sim.expect("start the OpenStack simulator");
        let socket = dir.path().join("plugin/csi.sock");
        let mut env = CsiEnv {
            dir,
            sim: Some(sim),
            rt: Some(rt),
            driver: None,
            socket,
            by_id,
            node_id,
            opts,
            clients: None,
        };
        env.write_credentials();
        env.start_driver();
        env
    }

    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().expect("simulator running")
    }

    fn write_credentials(&self) {
        let c = &self.sim().sim.cfg;
        let auth = self.sim().auth_url();
        std::fs::write(
            self.dir.path().join("cloud.conf"),
            format!(
                "[Global]\nauth-url = {auth}\nusername = {}\npassword = {}\ntenant-name = {}\n\
                 domain-name = {}\nregion = {}\n\n[BlockStorage]\n\n[Metadata]\n\
                 search-order = metadataService\n",
                c.username, c.password, c.project_name, c.domain, c.region
            ),
        )
        .expect("write cloud.conf");
        std::fs::write(
            self.dir.path().join("clouds.yaml"),
            openstack::clouds_yaml(c, &auth),
        )
        .expect("write clouds.yaml");
    }

    /// Path of the driver's log file.
    pub fn driver_log(&self) -> PathBuf {
        self.dir.path().join("driver.log")
    }

    /// Starts (or restarts) the driver process and waits for its socket.
    pub fn start_driver(&mut self) {
        assert!(self.driver.is_none(), "driver already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.driver_log())
            .expect("driver log");
        let bin = self
            .opts
            .driver_bin
            .clone()
            .unwrap_or_else(|| workspace_bin("berth-csi"));
        let mut cmd = Command::new(bin);
        // Defaults, each overridable by the same flag in `driver_args`.
        let defaults: [(&str, String); 6] = [
            ("--endpoint", format!("unix://{}", self.socket.display())),
            ("--device-dir", self.by_id.display().to_string()),
            ("--metadata-url", self.sim().metadata_url(&self.node_id)),
            ("--metadata-search-order", "metadataService".into()),
            ("--device-attempts", "20".into()),
            ("--op-timeout-secs", "60".into()),
        ];
        for (flag, value) in defaults {
            if !self.opts.driver_args.iter().any(|a| a == flag) {
                cmd.arg(flag).arg(value);
            }
        }
        cmd.args(&self.opts.driver_args)
            .env_remove("OS_CLOUD")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("OS_") {
                cmd.env_remove(k);
            }
        }
        let c = self.sim().sim.cfg.clone();
        match self.opts.creds {
            Creds::CloudConf => {
                cmd.arg("--cloud-config")
                    .arg(self.dir.path().join("cloud.conf"));
            }
            Creds::CloudsYaml => {
                cmd.arg("--clouds-yaml")
                    .arg(self.dir.path().join("clouds.yaml"))
                    .args(["--cloud", "berth-sim"]);
            }
            Creds::EnvAppCredential => {
                cmd.env("OS_AUTH_URL", self.sim().auth_url())
                    .env("OS_APPLICATION_CREDENTIAL_ID", &c.app_cred_id)
                    .env("OS_APPLICATION_CREDENTIAL_SECRET", &c.app_cred_secret)
                    .env("OS_REGION_NAME", &c.region);
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        self.driver = Some(cmd.spawn().expect("spawn berth-csi"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(st) = self.driver.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("berth-csi exited with {st}:\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "berth-csi did not create its socket:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.clients = None;
    }

    /// Restarts the driver with extra arguments (replacing the environment's own extras).
    pub fn start_driver_with(&mut self, args: &[&str]) {
        self.opts.driver_args = args.iter().map(|s| s.to_string()).collect();
        self.start_driver();
    }

    /// Kills the driver (SIGKILL: a crash, no cleanup).
    pub fn kill_driver(&mut self) {
        if let Some(mut c) = self.driver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.clients = None;
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.driver_log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// gRPC clients (connected once per driver process).
    pub async fn clients(&mut self) -> Clients {
        if let Some(c) = &self.clients {
            return c.clone();
        }
        let c = connect(&self.socket).await;
        self.clients = Some(c.clone());
        c
    }

    /// A directory for staging one volume (kubelet makes it; so do we).
    pub fn staging_path(&self, volume_id: &str) -> PathBuf {
        let p = self.dir.path().join("staging").join(volume_id);
        std::fs::create_dir_all(&p).expect("staging dir");
        p
    }

    /// A pod's volume target path (not created: the driver does it).
    pub fn target_path(&self, pod: &str, volume_id: &str) -> PathBuf {
        self.dir
            .path()
            .join("pods")
            .join(pod)
            .join("volumes")
            .join(volume_id)
            .join("mount")
    }

    /// Mount points under this environment's directory.
    pub fn mounts_under_dir(&self) -> Vec<PathBuf> {
        mounts_under(self.dir.path())
    }
}

/// Connects the three CSI clients to a driver's unix socket.
pub async fn connect(socket: &Path) -> Clients {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect to the CSI socket");
    Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    }
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|t| PathBuf::from(t.replace("\\040", " ")))
        .filter(|t| t.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-n", "-l", "-O", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let back = it.next()?;
            Path::new(back).starts_with(dir).then(|| name.to_string())
        })
        .collect()
}

/// Loop devices still backed by files under `dir` once the kernel has had up to 10 s to let go of
/// them: `losetup -d` on a device that a just-unmounted filesystem still holds only marks it for
/// autoclear, and the device goes when the last reference does (slower on a loaded machine).
pub fn loops_left_under(dir: &Path) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = loops_under(dir);
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Drop for CsiEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- berth-csi log (tail) ---\n{}", self.log_tail());
        }
        self.kill_driver();
        for m in mounts_under(self.dir.path()) {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
        if let Some(sim) = self.sim.take() {
            sim.shutdown();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        for dev in loops_under(self.dir.path()) {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

// ------------------------------------------------------------------ request builders

pub fn cap(mode: Mode, fs: Option<&str>) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(match fs {
            None => AccessType::Block(BlockVolume {}),
            Some(f) => AccessType::Mount(MountVolume {
                fs_type: f.into(),
                ..Default::default()
            }),
        }),
    }
}

/// SINGLE_NODE_WRITER with a filesystem.
pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, Some(fs))
}

/// SINGLE_NODE_WRITER raw block.
pub fn block_cap() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, None)
}

pub fn create_req(name: &str, bytes: i64, c: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![c],
        parameters: HashMap::new(),
        ..Default::default()
    }
}

/// A unique name for a volume or snapshot.
pub fn unique(prefix: &str) -> String {
    crate::netns::unique_name(prefix)
}

/// Asserts the gRPC code of a result, showing the message on failure.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> tonic::Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            s
        }
    }
}

impl Clients {
    pub async fn create(
        &mut self,
        name: &str,
        bytes: i64,
        c: csi::VolumeCapability,
    ) -> csi::Volume {
        self.controller
            .create_volume(create_req(name, bytes, c))
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .expect("volume")
    }

    pub async fn attach(
        &mut self,
        volume_id: &str,
        node: &str,
        c: csi::VolumeCapability,
    ) -> HashMap<String, String> {
        self.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume_id.into(),
                node_id: node.into(),
                volume_capability: Some(c),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerPublish {volume_id}: {e}"))
            .into_inner()
            .publish_context
    }

    pub async fn detach(&mut self, volume_id: &str, node: &str) {
        self.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerUnpublish {volume_id}: {e}"));
    }

    pub async fn stage(&mut self, volume_id: &str, staging: &Path, c: csi::VolumeCapability) {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(c),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeStage {volume_id}: {e}"));
    }

    pub async fn unstage(&mut self, volume_id: &str, staging: &Path) {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnstage {volume_id}: {e}"));
    }

    pub fn publish_req(
        volume_id: &str,
        staging: &Path,
        target: &Path,
        c: csi::VolumeCapability,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(c),
            readonly,
            ..Default::default()
        }
    }

    pub async fn publish(
        &mut self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        c: csi::VolumeCapability,
        readonly: bool,
    ) {
        self.node
            .node_publish_volume(Self::publish_req(volume_id, staging, target, c, readonly))
            .await
            .unwrap_or_else(|e| panic!("NodePublish {volume_id}: {e}"));
    }

    pub async fn unpublish(&mut self, volume_id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublish {volume_id}: {e}"));
    }

    pub async fn delete(&mut self, volume_id: &str) {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume {volume_id}: {e}"));
    }
}

/// Total bytes of the filesystem mounted at `path`.
pub fn fs_total_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks() as u64 * s.fragment_size() as u64
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|t| Path::new(t) == path)
}

/// Whether this process holds CAP_SYS_RESOURCE (online ext4 growth needs it).
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}
