//! CSI Node service: find the attached disk by id, format only blank devices, mount at the
//! staging path (xfs with `nouuid`), bind-mount into pods, stats and online growth.
//!
//! The logic is plain blocking code in [`NodeOps`] over the [`Host`] trait; the gRPC service
//! runs it on the blocking pool behind the per-volume in-flight guard.
use std::{
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use berth_proto::csi::{self, node_server::Node};
use tonic::{Request, Response, Status};

use crate::{
    Error, Result, TOPOLOGY_KEY,
    caps::{self, Access},
    host::{Host, MountEntry},
    inflight::Inflight,
    metadata::{InstanceMetadata, MetadataSource},
};

/// Node plugin settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where the disks' by-id links live (`/dev/disk/by-id`; configurable, there is no udev in CI).
    pub device_dir: PathBuf,
    /// Advertised in NodeGetInfo (Berth: 100).
    pub max_volumes_per_node: i64,
    pub metadata: MetadataSource,
    /// Tries to find an attached disk before giving up, and the first delay (doubling, ≤ 2 s).
    pub device_attempts: u32,
    pub device_first_delay: Duration,
}

/// A filesystem smaller than its device by more than this is grown at stage time.
const GROW_SLACK: u64 = 16 << 20;

/// by-id names of a Cinder volume's disk, in the order the node looks for them.
pub fn device_candidates(volume_id: &str) -> Vec<String> {
    let short = &volume_id[..volume_id.len().min(20)];
    vec![
        format!("virtio-{short}"),
        format!("virtio-{volume_id}"),
        format!("scsi-0QEMU_QEMU_HARDDISK_{short}"),
        format!("scsi-0QEMU_QEMU_HARDDISK_{volume_id}"),
        format!("wwn-0x{}", volume_id.replace('-', "")),
    ]
}

/// The blocking core of the node service.
pub struct NodeOps {
    pub cfg: NodeConfig,
    pub host: Arc<dyn Host>,
}

fn need<'a>(v: &'a str, what: &str) -> Result<&'a str> {
    if v.is_empty() {
        Err(Error::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

/// Asks the kernel and udev (when present) to look for new disks.
fn rescan() {
    if let Ok(hosts) = std::fs::read_dir("/sys/class/scsi_host") {
        for h in hosts.flatten() {
            let _ = std::fs::write(h.path().join("scan"), "- - -");
        }
    }
    if Path::new("/run/udev/control").exists() {
        let _ = std::process::Command::new("udevadm")
            .args(["trigger", "--subsystem-match=block"])
            .status();
        let _ = std::process::Command::new("udevadm").arg("settle").status();
    }
}

impl NodeOps {
    /// The device of an attached volume, found by id with bounded retries.
    pub fn find_device(&self, volume_id: &str) -> Result<PathBuf> {
        if volume_id.contains('/') || volume_id.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "invalid volume_id {volume_id:?}"
            )));
        }
        let mut delay = self.cfg.device_first_delay;
        for attempt in 1..=self.cfg.device_attempts.max(1) {
            for name in device_candidates(volume_id) {
                let p = self.cfg.device_dir.join(&name);
                if let Ok(real) = std::fs::canonicalize(&p) {
                    let is_blk = std::fs::metadata(&real)
                        .map(|m| m.file_type().is_block_device())
                        .unwrap_or(false);
                    if is_blk {
                        return Ok(real);
                    }
                }
            }
            if attempt < self.cfg.device_attempts {
                rescan();
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
        Err(Error::NotFound(format!(
            "no disk for volume {volume_id} under {} after {} tries (looked for {}); is it \
             attached to this node (ControllerPublishVolume)?",
            self.cfg.device_dir.display(),
            self.cfg.device_attempts,
            device_candidates(volume_id).join(", ")
        )))
    }

    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>> {
        Ok(self
            .host
            .mounts()?
            .into_iter()
            .rev()
            .find(|m| m.target == path))
    }

    pub fn stage(&self, r: &csi::NodeStageVolumeRequest) -> Result<()> {
        let id = need(&r.volume_id, "volume_id")?;
        let staging = PathBuf::from(need(&r.staging_target_path, "staging_target_path")?);
        let access = caps::check(r.volume_capability.as_ref())?;
        let dev = self.find_device(id)?;
        let (fs, flags) = match access {
            // Raw block: nothing to stage; NodePublish binds the device node.
            Access::Block => return Ok(()),
            Access::Mount { fs_type, flags } => (fs_type, flags),
        };
        if let Some(m) = self.mount_at(&staging)? {
            let same_dev = std::fs::canonicalize(&m.source).ok().as_deref() == Some(dev.as_path());
            if same_dev && m.fs_type == fs {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "staging path {} already holds {} ({}), not volume {id} ({}, {fs})",
                staging.display(),
                m.source,
                m.fs_type,
                dev.display()
            )));
        }
        std::fs::create_dir_all(&staging)?;
        let formatted = match self.host.fs_type(&dev)? {
            None => {
                tracing::info!(volume = id, device = %dev.display(), fs, "formatting blank device");
                self.host.format(&dev, &fs)?;
                true
            }
            Some(t) if t == fs => false,
            Some(t) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} ({}) already holds a {t} filesystem but {fs} was requested; \
                     refusing to reformat a disk that holds data",
                    dev.display()
                )));
            }
        };
        if !formatted && let Some(fs_bytes) = self.host.fs_size(&dev, &fs)? {
            // The volume grew while detached (offline expansion, or a clone bigger than its
            // source): grow ext4 before mounting, which needs no special privilege.
            let dev_bytes = self.host.device_size(&dev)?;
            if dev_bytes > fs_bytes + GROW_SLACK {
                tracing::info!(
                    volume = id,
                    fs_bytes,
                    dev_bytes,
                    "growing filesystem offline"
                );
                self.host.grow_offline(&dev, &fs)?;
            }
        }
        let mut opts = flags;
        if fs == "xfs" && !opts.iter().any(|o| o == "nouuid") {
            // Clones and snapshots share the XFS UUID; without nouuid the second mount fails.
            opts.push("nouuid".into());
        }
        self.host.mount(&dev, &staging, Some(&fs), &opts)?;
        if !formatted && fs == "xfs" {
            // XFS grows only mounted; a no-op when it already fills the device.
            if let Err(e) = self.host.resize_fs(&dev, &staging, &fs) {
                let _ = self.host.unmount(&staging);
                return Err(e);
            }
        }
        tracing::info!(volume = id, staging = %staging.display(), "staged");
        Ok(())
    }

    pub fn unstage(&self, r: &csi::NodeUnstageVolumeRequest) -> Result<()> {
        need(&r.volume_id, "volume_id")?;
        let staging = PathBuf::from(need(&r.staging_target_path, "staging_target_path")?);
        for _ in 0..8 {
            if self.mount_at(&staging)?.is_none() {
                return Ok(());
            }
            self.host.unmount(&staging)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after repeated unmounts",
            staging.display()
        )))
    }

    pub fn publish(&self, r: &csi::NodePublishVolumeRequest) -> Result<()> {
        let id = need(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(need(&r.target_path, "target_path")?);
        let staging = need(&r.staging_target_path, "staging_target_path")?;
        let access = caps::check(r.volume_capability.as_ref())?;
        let mut opts = vec!["bind".to_string()];
        if r.readonly {
            opts.push("ro".into());
        }
        match access {
            Access::Block => {
                let dev = self.find_device(id)?;
                let dev_name = dev.file_name().map(|n| n.to_string_lossy().into_owned());
                if let Some(m) = self.mount_at(&target)? {
                    if Path::new(&m.root)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        == dev_name
                        && m.read_only == r.readonly
                    {
                        return Ok(());
                    }
                    return Err(Error::AlreadyExists(format!(
                        "target {} is already published with another device or mode",
                        target.display()
                    )));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)?;
                self.bind(&dev, &target, r.readonly)?;
            }
            Access::Mount { .. } => {
                let staging = PathBuf::from(staging);
                let Some(sm) = self.mount_at(&staging)? else {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is not staged at {} (call NodeStageVolume first)",
                        staging.display()
                    )));
                };
                if let Some(m) = self.mount_at(&target)? {
                    if m.major_minor == sm.major_minor
                        && m.root == sm.root
                        && m.read_only == r.readonly
                    {
                        return Ok(());
                    }
                    return Err(Error::AlreadyExists(format!(
                        "target {} is already published with another volume or mode",
                        target.display()
                    )));
                }
                std::fs::create_dir_all(&target)?;
                self.bind(&staging, &target, r.readonly)?;
            }
        }
        tracing::info!(volume = id, target = %target.display(), readonly = r.readonly, "published");
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<()> {
        self.host
            .mount(source, target, None, &["bind".to_string()])?;
        if readonly {
            // A bind mount takes ro only on remount.
            if let Err(e) = self.host.mount(
                Path::new("none"),
                target,
                None,
                &["remount".into(), "bind".into(), "ro".into()],
            ) {
                let _ = self.host.unmount(target);
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn unpublish(&self, r: &csi::NodeUnpublishVolumeRequest) -> Result<()> {
        need(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(need(&r.target_path, "target_path")?);
        for _ in 0..8 {
            if self.mount_at(&target)?.is_none() {
                break;
            }
            self.host.unmount(&target)?;
        }
        match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
            Ok(m) if m.is_dir() => Ok(std::fs::remove_dir(&target)?),
            Ok(_) => Ok(std::fs::remove_file(&target)?),
        }
    }

    pub fn stats(
        &self,
        r: &csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        let id = need(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(need(&r.volume_path, "volume_path")?);
        let meta = std::fs::metadata(&path).map_err(|e| {
            Error::NotFound(format!("volume {id}: volume_path {}: {e}", path.display()))
        })?;
        let mounted = self.mount_at(&path)?;
        let condition = csi::VolumeCondition {
            abnormal: mounted.is_none(),
            message: match &mounted {
                Some(m) => format!("mounted from {}", m.source),
                None => format!("{} is not a mount point", path.display()),
            },
        };
        use csi::volume_usage::Unit;
        if meta.file_type().is_block_device() || !meta.is_dir() {
            let size = self.host.device_size(&path)? as i64;
            return Ok(csi::NodeGetVolumeStatsResponse {
                usage: vec![csi::VolumeUsage {
                    available: 0,
                    total: size,
                    used: 0,
                    unit: Unit::Bytes as i32,
                }],
                volume_condition: Some(condition),
            });
        }
        let u = self.host.usage(&path)?;
        Ok(csi::NodeGetVolumeStatsResponse {
            usage: vec![
                csi::VolumeUsage {
                    available: u.bytes_available,
                    total: u.bytes_total,
                    used: u.bytes_used,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: u.inodes_free,
                    total: u.inodes_total,
                    used: u.inodes_used,
                    unit: Unit::Inodes as i32,
                },
            ],
            volume_condition: Some(condition),
        })
    }

    pub fn expand(
        &self,
        r: &csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse> {
        let id = need(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(need(&r.volume_path, "volume_path")?);
        let meta = std::fs::metadata(&path).map_err(|e| {
            Error::NotFound(format!("volume {id}: volume_path {}: {e}", path.display()))
        })?;
        if meta.file_type().is_block_device() || !meta.is_dir() {
            // Raw block: the device already has the new size.
            let dev = self.find_device(id)?;
            return Ok(csi::NodeExpandVolumeResponse {
                capacity_bytes: self.host.device_size(&dev)? as i64,
            });
        }
        let m = self.mount_at(&path)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("{} is not mounted", path.display()))
        })?;
        let dev = self.find_device(id)?;
        let size = self.host.device_size(&dev)?;
        if let Some(range) = &r.capacity_range
            && range.required_bytes > 0
            && (size as i64) < range.required_bytes
        {
            return Err(Error::FailedPrecondition(format!(
                "the device of volume {id} has {size} bytes, fewer than the {} requested; \
                 ControllerExpandVolume has not reached this node yet",
                range.required_bytes
            )));
        }
        self.host.resize_fs(&dev, &path, &m.fs_type)?;
        tracing::info!(volume = id, size, "filesystem grown");
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }
}

/// The gRPC Node service.
pub struct NodeService {
    ops: Arc<NodeOps>,
    inflight: Inflight,
    info: tokio::sync::OnceCell<InstanceMetadata>,
}

impl NodeService {
    pub fn new(ops: NodeOps, inflight: Inflight) -> Self {
        NodeService {
            ops: Arc::new(ops),
            inflight,
            info: tokio::sync::OnceCell::new(),
        }
    }

    /// Runs a blocking node operation for `volume_id` under its in-flight guard.
    async fn run<T: Send + 'static>(
        &self,
        volume_id: &str,
        f: impl FnOnce(&NodeOps) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()).into());
        }
        let guard = self.inflight.acquire(volume_id)?;
        let ops = self.ops.clone();
        let res = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&ops)
        })
        .await
        .map_err(|e| Status::internal(format!("node task: {e}")))?;
        Ok(res?)
    }
}

fn node_rpc(t: csi::node_service_capability::rpc::Type) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(
            csi::node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        self.run(&id, move |o| o.stage(&r)).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        self.run(&id, move |o| o.unstage(&r)).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        self.run(&id, move |o| o.publish(&r)).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        self.run(&id, move |o| o.unpublish(&r)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()).into());
        }
        let ops = self.ops.clone();
        let res = tokio::task::spawn_blocking(move || ops.stats(&r))
            .await
            .map_err(|e| Status::internal(format!("node task: {e}")))?;
        Ok(Response::new(res?))
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        Ok(Response::new(self.run(&id, move |o| o.expand(&r)).await?))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::rpc::Type as T;
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: [
                T::StageUnstageVolume,
                T::GetVolumeStats,
                T::ExpandVolume,
                T::VolumeCondition,
            ]
            .into_iter()
            .map(node_rpc)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let src = self.ops.cfg.metadata.clone();
        let m = self
            .info
            .get_or_try_init(|| async move { src.fetch().await })
            .await?;
        let mut segments = std::collections::HashMap::new();
        if !m.availability_zone.is_empty() {
            segments.insert(TOPOLOGY_KEY.to_string(), m.availability_zone.clone());
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: m.uuid.clone(),
            max_volumes_per_node: self.ops.cfg.max_volumes_per_node,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FsUsage;
    use std::sync::Mutex;

    /// A fake host recording calls; devices come from a temp dir of by-id links.
    #[derive(Default)]
    struct Fake {
        fs: Mutex<Option<String>>,
        calls: Mutex<Vec<String>>,
        mounts: Mutex<Vec<MountEntry>>,
    }

    impl Host for Fake {
        fn fs_type(&self, _d: &Path) -> Result<Option<String>> {
            Ok(self.fs.lock().unwrap().clone())
        }
        fn format(&self, d: &Path, t: &str) -> Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mkfs {t} {}", d.display()));
            *self.fs.lock().unwrap() = Some(t.into());
            Ok(())
        }
        fn mount(&self, s: &Path, t: &Path, f: Option<&str>, o: &[String]) -> Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mount {f:?} {}", o.join(",")));
            self.mounts.lock().unwrap().push(MountEntry {
                target: t.into(),
                source: s.display().to_string(),
                fs_type: f.unwrap_or("").into(),
                read_only: false,
                root: "/".into(),
                major_minor: "7:0".into(),
            });
            Ok(())
        }
        fn unmount(&self, t: &Path) -> Result<()> {
            self.mounts.lock().unwrap().retain(|m| m.target != t);
            Ok(())
        }
        fn mounts(&self) -> Result<Vec<MountEntry>> {
            Ok(self.mounts.lock().unwrap().clone())
        }
        fn device_size(&self, _d: &Path) -> Result<u64> {
            Ok(1 << 30)
        }
        fn resize_fs(&self, _d: &Path, _m: &Path, f: &str) -> Result<()> {
            self.calls.lock().unwrap().push(format!("resize {f}"));
            Ok(())
        }
        fn usage(&self, _p: &Path) -> Result<FsUsage> {
            Ok(FsUsage::default())
        }
        fn fs_size(&self, _d: &Path, f: &str) -> Result<Option<u64>> {
            Ok((f == "ext4").then_some(1 << 29))
        }
        fn grow_offline(&self, _d: &Path, f: &str) -> Result<()> {
            self.calls.lock().unwrap().push(format!("grow-offline {f}"));
            Ok(())
        }
    }

    fn ops(dir: &Path, host: Arc<Fake>) -> NodeOps {
        NodeOps {
            cfg: NodeConfig {
                device_dir: dir.into(),
                max_volumes_per_node: 100,
                metadata: MetadataSource {
                    search_order: vec![],
                    config_drive: dir.into(),
                    metadata_url: String::new(),
                },
                device_attempts: 2,
                device_first_delay: Duration::from_millis(1),
            },
            host,
        }
    }

    fn stage_req(id: &str, staging: &Path, fs: &str) -> csi::NodeStageVolumeRequest {
        use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(csi::VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn candidates_in_reference_order() {
        let c = device_candidates("0f2b1f9e-6a3c-4c52-9a8f-1b2c3d4e5f60");
        assert_eq!(c[0], "virtio-0f2b1f9e-6a3c-4c52-9");
        assert_eq!(c[1], "virtio-0f2b1f9e-6a3c-4c52-9a8f-1b2c3d4e5f60");
        assert_eq!(c[2], "scsi-0QEMU_QEMU_HARDDISK_0f2b1f9e-6a3c-4c52-9");
        assert_eq!(c[4], "wwn-0x0f2b1f9e6a3c4c529a8f1b2c3d4e5f60");
    }

    #[test]
    fn formats_blank_only_and_never_reformats() {
        let d = tempfile::tempdir().unwrap();
        // /dev/null is a char device, not a block device: use a real block device node if one
        // exists; loop0 is always present where loop is built in.
        let blk = ["/dev/loop0", "/dev/loop-control"]
            .iter()
            .map(Path::new)
            .find(|p| {
                std::fs::metadata(p)
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false)
            });
        let Some(blk) = blk else {
            panic!("this unit test needs a block device node such as /dev/loop0");
        };
        let id = "11111111-2222-3333-4444-555555555555";
        std::os::unix::fs::symlink(blk, d.path().join(&device_candidates(id)[1])).unwrap();
        let host = Arc::new(Fake::default());
        let o = ops(d.path(), host.clone());
        let staging = d.path().join("staging");

        o.stage(&stage_req(id, &staging, "xfs")).unwrap();
        let calls = host.calls.lock().unwrap().clone();
        assert!(calls[0].starts_with("mkfs xfs"), "{calls:?}");
        assert!(calls[1].contains("nouuid"), "{calls:?}");
        // Same request again: idempotent, no new calls.
        o.stage(&stage_req(id, &staging, "xfs")).unwrap();
        assert_eq!(host.calls.lock().unwrap().len(), 2);
        // Different fs at the same path: ALREADY_EXISTS.
        assert!(matches!(
            o.stage(&stage_req(id, &staging, "ext4")),
            Err(Error::AlreadyExists(_))
        ));
        o.unstage(&csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .unwrap();
        // The disk holds xfs now: asking for ext4 must not reformat it.
        let e = o.stage(&stage_req(id, &staging, "ext4")).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert_eq!(
            host.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with("mkfs"))
                .count(),
            1
        );
        // Re-staging an existing filesystem grows it (offline expansion), never formats.
        o.stage(&stage_req(id, &staging, "xfs")).unwrap();
        assert!(
            host.calls
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .starts_with("resize xfs")
        );
    }

    #[test]
    fn missing_device_is_not_found_after_bounded_tries() {
        let d = tempfile::tempdir().unwrap();
        let o = ops(d.path(), Arc::new(Fake::default()));
        assert!(matches!(o.find_device("nope"), Err(Error::NotFound(_))));
        assert!(matches!(
            o.find_device("../etc"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
