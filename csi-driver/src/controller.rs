//! CSI Controller service: Cinder volumes and snapshots, Nova attachments, the per-node volume
//! cap (decided before Nova is called), RWO only.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use berth_proto::csi::{self, controller_server::Controller};
use tonic::{Request, Response, Status};

use crate::{
    Error, Result, TOPOLOGY_KEY,
    caps::{self, GIB},
    inflight::Inflight,
    openstack::{Client, NewVolume, Snapshot, Volume},
};

/// StorageClass parameters (same as cinder-csi-plugin).
pub const PARAM_TYPE: &str = "type";
pub const PARAM_AVAILABILITY: &str = "availability";
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// Publish-context key of the device Nova reports (a hint only; the node finds the disk by id).
pub const PUBLISH_DEVICE_PATH: &str = "DevicePath";

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Volumes one node may hold (Berth: 100).
    pub max_volumes_per_node: usize,
    /// Largest volume created, GiB.
    pub max_volume_gib: i64,
    /// Bound on waiting for Cinder/Nova transitions.
    pub op_timeout: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            max_volumes_per_node: 100,
            max_volume_gib: 16 * 1024,
            op_timeout: Duration::from_secs(120),
        }
    }
}

pub struct ControllerService {
    os: Arc<Client>,
    cfg: ControllerConfig,
    inflight: Inflight,
    /// Serialises cap check + attach per node so concurrent publishes cannot overshoot the cap.
    node_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn need<'a>(v: &'a str, what: &str) -> Result<&'a str> {
    if v.is_empty() {
        Err(Error::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

/// Polls with bounded exponential backoff until `done` returns `Some`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(v) = step().await? {
            return Ok(v);
        }
        if Instant::now() + delay > deadline {
            return Err(Error::Timeout(format!("{what} (waited {timeout:?})")));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

fn topology(az: &str) -> Vec<csi::Topology> {
    vec![csi::Topology {
        segments: [(TOPOLOGY_KEY.to_string(), az.to_string())].into(),
    }]
}

fn to_csi_volume(v: &Volume) -> csi::Volume {
    let content_source = if let Some(s) = &v.snapshot_id {
        Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: s.clone(),
                },
            )),
        })
    } else {
        v.source_volid.as_ref().map(|s| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: s.clone(),
                },
            )),
        })
    };
    csi::Volume {
        capacity_bytes: v.size as i64 * GIB,
        volume_id: v.id.clone(),
        volume_context: HashMap::new(),
        content_source,
        accessible_topology: v
            .availability_zone
            .as_deref()
            .map(topology)
            .unwrap_or_default(),
    }
}

fn to_csi_snapshot(s: &Snapshot) -> csi::Snapshot {
    let creation_time = s
        .created_at
        .as_deref()
        .and_then(crate::openstack::parse_iso8601)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        });
    csi::Snapshot {
        size_bytes: s.size as i64 * GIB,
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume_id.clone(),
        creation_time,
        ready_to_use: s.status == "available",
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    pub fn new(os: Arc<Client>, cfg: ControllerConfig, inflight: Inflight) -> Self {
        ControllerService {
            os,
            cfg,
            inflight,
            node_locks: Default::default(),
        }
    }

    fn node_lock(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.node_locks
            .lock()
            .expect("node locks")
            .entry(node.to_string())
            .or_default()
            .clone()
    }

    async fn wait_volume<F: Fn(&Volume) -> Option<Result<()>>>(
        &self,
        id: &str,
        what: &str,
        done: F,
    ) -> Result<Volume> {
        let os = &self.os;
        poll(what, self.cfg.op_timeout, || async {
            let v = os
                .get_volume(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("volume {id} disappeared while {what}")))?;
            match done(&v) {
                Some(Ok(())) => Ok(Some(v)),
                Some(Err(e)) => Err(e),
                None => Ok(None),
            }
        })
        .await
    }

    async fn wait_available(&self, id: &str) -> Result<Volume> {
        self.wait_volume(
            id,
            "waiting for the volume to become available",
            |v| match v.status.as_str() {
                "available" | "in-use" => Some(Ok(())),
                "error" => Some(Err(Error::Internal(format!(
                    "Cinder put volume {} in status error",
                    v.id
                )))),
                _ => None,
            },
        )
        .await
    }

    async fn create_volume_inner(
        &self,
        r: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
        let name = need(&r.name, "name")?;
        caps::check_all(&r.volume_capabilities)?;
        let size_gib = caps::size_gib(r.capacity_range.as_ref(), self.cfg.max_volume_gib)? as u64;
        let mut volume_type = None;
        let mut az = None;
        for (k, v) in &r.parameters {
            match k.as_str() {
                PARAM_TYPE => volume_type = Some(v.clone()).filter(|s| !s.is_empty()),
                PARAM_AVAILABILITY => az = Some(v.clone()).filter(|s| !s.is_empty()),
                PARAM_FSTYPE => {
                    if !v.is_empty() && !caps::FS_TYPES.contains(&v.as_str()) {
                        return Err(Error::InvalidArgument(format!(
                            "unsupported {PARAM_FSTYPE} {v:?}: berth-csi formats ext4 or xfs"
                        )));
                    }
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown StorageClass parameter {other:?} (known: {PARAM_TYPE}, \
                         {PARAM_AVAILABILITY}, {PARAM_FSTYPE})"
                    )));
                }
            }
        }
        if az.is_none()
            && let Some(req) = &r.accessibility_requirements
        {
            az = req
                .preferred
                .iter()
                .chain(req.requisite.iter())
                .find_map(|t| t.segments.get(TOPOLOGY_KEY).cloned());
        }
        let (snapshot_id, source_volid) = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                let id = need(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?;
                if self.os.get_snapshot(id).await?.is_none() {
                    return Err(Error::NotFound(format!(
                        "source snapshot {id} does not exist"
                    )));
                }
                (Some(id.to_string()), None)
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                let id = need(&v.volume_id, "volume_content_source.volume.volume_id")?;
                if self.os.get_volume(id).await?.is_none() {
                    return Err(Error::NotFound(format!(
                        "source volume {id} does not exist"
                    )));
                }
                (None, Some(id.to_string()))
            }
            None => (None, None),
        };

        let _guard = self.inflight.acquire(&format!("create/{name}"))?;
        let existing = self.os.volumes_by_name(name).await?;
        let vol = if let Some(v) = existing.into_iter().next() {
            let mismatch = if v.size != size_gib {
                Some(format!("size {} GiB, requested {size_gib} GiB", v.size))
            } else if volume_type.is_some() && v.volume_type != volume_type {
                Some(format!(
                    "type {:?}, requested {volume_type:?}",
                    v.volume_type
                ))
            } else if az.is_some() && v.availability_zone != az {
                Some(format!("zone {:?}, requested {az:?}", v.availability_zone))
            } else if v.snapshot_id != snapshot_id || v.source_volid != source_volid {
                Some("a different content source".to_string())
            } else {
                None
            };
            if let Some(m) = mismatch {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} already exists ({}) with {m}",
                    v.id
                )));
            }
            tracing::info!(name, id = %v.id, "CreateVolume: volume exists, reusing it");
            self.wait_available(&v.id).await?
        } else {
            let v = self
                .os
                .create_volume(&NewVolume {
                    name: name.to_string(),
                    size_gib,
                    volume_type,
                    availability_zone: az,
                    snapshot_id,
                    source_volid,
                })
                .await
                .map_err(|e| match e {
                    Error::Api {
                        status: 413,
                        message,
                        ..
                    } => Error::ResourceExhausted(format!(
                        "Cinder quota exceeded creating {name:?}: {message}"
                    )),
                    e => e,
                })?;
            tracing::info!(name, id = %v.id, size_gib, "CreateVolume: created");
            self.wait_available(&v.id).await?
        };
        Ok(csi::CreateVolumeResponse {
            volume: Some(to_csi_volume(&vol)),
        })
    }

    async fn delete_volume_inner(&self, r: csi::DeleteVolumeRequest) -> Result<()> {
        let id = need(&r.volume_id, "volume_id")?;
        let _guard = self.inflight.acquire(id)?;
        let Some(v) = self.os.get_volume(id).await? else {
            return Ok(());
        };
        match v.status.as_str() {
            "deleting" => return Ok(()),
            "in-use" | "attaching" | "detaching" => {
                let on: Vec<&str> = v.attachments.iter().map(|a| a.server_id.as_str()).collect();
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is {} (attached to {on:?}); unpublish it first",
                    v.status
                )));
            }
            _ => {}
        }
        match self.os.delete_volume(id).await {
            Ok(()) | Err(Error::Api { status: 404, .. }) => Ok(()),
            Err(Error::Api {
                status: 400,
                message,
                ..
            }) => Err(Error::FailedPrecondition(format!(
                "Cinder refused to delete volume {id}: {message}"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn publish_inner(
        &self,
        r: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        let id = need(&r.volume_id, "volume_id")?;
        let node = need(&r.node_id, "node_id")?;
        caps::check(r.volume_capability.as_ref())?;
        let _guard = self.inflight.acquire(id)?;
        let vol = self
            .os
            .get_volume(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        if !self.os.server_exists(node).await? {
            return Err(Error::NotFound(format!(
                "node (Nova instance) {node} does not exist"
            )));
        }
        if let Some(other) = vol.attachments.iter().find(|a| a.server_id != node) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached to node {}; ReadWriteOnce volumes attach to one node \
                 at a time (ReadWriteMany belongs on File Storage (NFS))",
                other.server_id
            )));
        }
        let here = |v: &Volume| v.attachments.iter().find(|a| a.server_id == node).cloned();
        if vol.status == "in-use"
            && let Some(a) = here(&vol)
        {
            return Ok(publish_context(a.device));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let v = self
                .wait_volume(id, "waiting for a pending transition", |v| {
                    (!matches!(
                        v.status.as_str(),
                        "creating" | "attaching" | "detaching" | "extending"
                    ))
                    .then_some(Ok(()))
                })
                .await?;
            if v.status == "in-use" {
                if let Some(a) = here(&v) {
                    return Ok(publish_context(a.device));
                }
                let on: Vec<&str> = v.attachments.iter().map(|a| a.server_id.as_str()).collect();
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is attached to node(s) {on:?}"
                )));
            }
            if v.status != "available" {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is in status {} and cannot be attached",
                    v.status
                )));
            }
            if attempts > 3 {
                return Err(Error::Internal(format!(
                    "volume {id} fell back to available after {} attach attempts on {node}",
                    attempts - 1
                )));
            }
            {
                // The cap, decided before Nova is asked.
                let lock = self.node_lock(node);
                let _n = lock.lock().await;
                let held = self.os.list_attachments(node).await?;
                if held.len() >= self.cfg.max_volumes_per_node {
                    return Err(Error::ResourceExhausted(format!(
                        "node {node} already holds {} volumes, the maximum of {} per node; \
                         the pod must be placed on another node",
                        held.len(),
                        self.cfg.max_volumes_per_node
                    )));
                }
                self.os.attach(node, id).await?;
            }
            tracing::info!(volume = id, node, "ControllerPublish: attach requested");
            let v = self
                .wait_volume(id, "waiting for Nova to attach the volume", |v| {
                    (v.status != "attaching").then_some(Ok(()))
                })
                .await?;
            if v.status == "in-use"
                && let Some(a) = here(&v)
            {
                return Ok(publish_context(a.device));
            }
            tracing::warn!(volume = id, node, status = %v.status, "attachment lost, retrying");
        }
    }

    async fn unpublish_inner(&self, r: csi::ControllerUnpublishVolumeRequest) -> Result<()> {
        let id = need(&r.volume_id, "volume_id")?;
        let _guard = self.inflight.acquire(id)?;
        let Some(v) = self.os.get_volume(id).await? else {
            return Ok(());
        };
        let node = if r.node_id.is_empty() {
            match v.attachments.first() {
                Some(a) => a.server_id.clone(),
                None => return Ok(()),
            }
        } else {
            r.node_id.clone()
        };
        let attached_here = |v: &Volume| v.attachments.iter().any(|a| a.server_id == node);
        if !attached_here(&v) {
            return Ok(());
        }
        let v = self
            .wait_volume(id, "waiting for a pending transition", |v| {
                (!matches!(v.status.as_str(), "attaching" | "extending")).then_some(Ok(()))
            })
            .await?;
        if v.status == "in-use" && attached_here(&v) {
            match self.os.detach(&node, id).await {
                Ok(()) | Err(Error::Api { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.wait_volume(id, "waiting for Nova to detach the volume", |v| {
            (v.status != "detaching" && !attached_here(v)).then_some(Ok(()))
        })
        .await?;
        tracing::info!(volume = id, node = %node, "ControllerUnpublish: detached");
        Ok(())
    }

    async fn list_volumes_inner(
        &self,
        r: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse> {
        if r.max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let limit = (r.max_entries > 0).then_some(r.max_entries as usize);
        let marker = (!r.starting_token.is_empty()).then_some(r.starting_token.as_str());
        let mut vols = match self.os.list_volumes(limit.map(|l| l + 1), marker).await {
            Ok(v) => v,
            Err(Error::Api {
                status: 400 | 404, ..
            }) if marker.is_some() => {
                return Err(Error::Aborted(format!(
                    "starting_token {:?} is not valid (the volume it names is gone?)",
                    r.starting_token
                )));
            }
            Err(e) => return Err(e),
        };
        let mut next_token = String::new();
        if let Some(l) = limit
            && vols.len() > l
        {
            vols.truncate(l);
            next_token = vols.last().map(|v| v.id.clone()).unwrap_or_default();
        }
        Ok(csi::ListVolumesResponse {
            entries: vols
                .iter()
                .map(|v| csi::list_volumes_response::Entry {
                    volume: Some(to_csi_volume(v)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: v
                            .attachments
                            .iter()
                            .map(|a| a.server_id.clone())
                            .collect(),
                        volume_condition: None,
                    }),
                })
                .collect(),
            next_token,
        })
    }

    async fn create_snapshot_inner(
        &self,
        r: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        let name = need(&r.name, "name")?;
        let src = need(&r.source_volume_id, "source_volume_id")?;
        let _guard = self.inflight.acquire(&format!("snapshot/{name}"))?;
        let existing = self.os.list_snapshots(&[("name", name)]).await?;
        let snap = if let Some(s) = existing.into_iter().next() {
            if s.volume_id != src {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists ({}) for volume {}, not {src}",
                    s.id, s.volume_id
                )));
            }
            s
        } else {
            if self.os.get_volume(src).await?.is_none() {
                return Err(Error::NotFound(format!(
                    "source volume {src} does not exist"
                )));
            }
            self.os
                .create_snapshot(src, name)
                .await
                .map_err(|e| match e {
                    Error::Api {
                        status: 413,
                        message,
                        ..
                    } => Error::ResourceExhausted(format!("Cinder quota exceeded: {message}")),
                    e => e,
                })?
        };
        let os = &self.os;
        let id = snap.id.clone();
        let snap = poll("waiting for the snapshot", self.cfg.op_timeout, || async {
            let s = os
                .get_snapshot(&id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("snapshot {id} disappeared")))?;
            match s.status.as_str() {
                "available" => Ok(Some(s)),
                "error" => Err(Error::Internal(format!(
                    "Cinder put snapshot {id} in error"
                ))),
                _ => Ok(None),
            }
        })
        .await?;
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(to_csi_snapshot(&snap)),
        })
    }

    async fn list_snapshots_inner(
        &self,
        r: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        if r.max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let snaps: Vec<Snapshot> = if !r.snapshot_id.is_empty() {
            self.os
                .get_snapshot(&r.snapshot_id)
                .await?
                .into_iter()
                .collect()
        } else {
            let mut f: Vec<(&str, &str)> = Vec::new();
            if !r.source_volume_id.is_empty() {
                f.push(("volume_id", &r.source_volume_id));
            }
            let limit = (r.max_entries + 1).to_string();
            if r.max_entries > 0 {
                f.push(("limit", &limit));
            }
            if !r.starting_token.is_empty() {
                f.push(("marker", &r.starting_token));
            }
            match self.os.list_snapshots(&f).await {
                Ok(s) => s,
                Err(Error::Api {
                    status: 400 | 404, ..
                }) if !r.starting_token.is_empty() => {
                    return Err(Error::Aborted(format!(
                        "starting_token {:?} is not valid",
                        r.starting_token
                    )));
                }
                Err(e) => return Err(e),
            }
        };
        let mut snaps = snaps;
        let mut next_token = String::new();
        if r.max_entries > 0 && snaps.len() > r.max_entries as usize {
            snaps.truncate(r.max_entries as usize);
            next_token = snaps.last().map(|s| s.id.clone()).unwrap_or_default();
        }
        Ok(csi::ListSnapshotsResponse {
            entries: snaps
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(to_csi_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    async fn expand_inner(
        &self,
        r: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let id = need(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let gib = caps::size_gib(Some(range), self.cfg.max_volume_gib)? as u64;
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        );
        let _guard = self.inflight.acquire(id)?;
        let v = self
            .os
            .get_volume(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        if v.size < gib {
            self.os.extend_volume(id, gib).await.map_err(|e| match e {
                Error::Api {
                    status: 413,
                    message,
                    ..
                } => Error::ResourceExhausted(format!("Cinder quota exceeded: {message}")),
                e => e,
            })?;
            self.wait_volume(id, "waiting for Cinder to extend the volume", |v| {
                match v.status.as_str() {
                    "error_extending" => Some(Err(Error::Internal(format!(
                        "Cinder failed to extend volume {id}"
                    )))),
                    "extending" => None,
                    _ => (v.size >= gib).then_some(Ok(())),
                }
            })
            .await?;
            tracing::info!(volume = id, gib, "ControllerExpand: extended");
        }
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.size.max(gib) as i64 * GIB,
            node_expansion_required: !block,
        })
    }
}

fn publish_context(device: Option<String>) -> csi::ControllerPublishVolumeResponse {
    let mut ctx = HashMap::new();
    if let Some(d) = device {
        ctx.insert(PUBLISH_DEVICE_PATH.to_string(), d);
    }
    csi::ControllerPublishVolumeResponse {
        publish_context: ctx,
    }
}

fn rpc(t: csi::controller_service_capability::rpc::Type) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        Ok(Response::new(
            self.create_volume_inner(r.into_inner()).await?,
        ))
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        self.delete_volume_inner(r.into_inner()).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Ok(Response::new(self.publish_inner(r.into_inner()).await?))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish_inner(r.into_inner()).await?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        let id = need(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities is required".into()).into());
        }
        if self
            .os
            .get_volume(id)
            .await
            .map_err(Status::from)?
            .is_none()
        {
            return Err(Error::NotFound(format!("volume {id} does not exist")).into());
        }
        let reasons: Vec<String> = r
            .volume_capabilities
            .iter()
            .filter_map(caps::unsupported_reason)
            .collect();
        Ok(Response::new(if reasons.is_empty() {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            }
        } else {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: reasons.join("; "),
            }
        }))
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Ok(Response::new(
            self.list_volumes_inner(r.into_inner()).await?,
        ))
    }

    async fn get_capacity(
        &self,
        _r: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Err(Error::Unimplemented(
            "GetCapacity: Cinder capacity is bounded by quota, not reported".into(),
        )
        .into())
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type as T;
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [
                T::CreateDeleteVolume,
                T::PublishUnpublishVolume,
                T::ListVolumes,
                T::ListVolumesPublishedNodes,
                T::CreateDeleteSnapshot,
                T::ListSnapshots,
                T::CloneVolume,
                T::ExpandVolume,
                T::GetVolume,
                T::PublishReadonly,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Ok(Response::new(
            self.create_snapshot_inner(r.into_inner()).await?,
        ))
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        let id = need(&r.snapshot_id, "snapshot_id")?;
        let _guard = self.inflight.acquire(&format!("snapshot-id/{id}"))?;
        match self.os.delete_snapshot(id).await {
            Ok(()) | Err(Error::Api { status: 404, .. }) => {
                Ok(Response::new(csi::DeleteSnapshotResponse {}))
            }
            Err(Error::Api {
                status: 400,
                message,
                ..
            }) => Err(Error::FailedPrecondition(format!(
                "Cinder refused to delete snapshot {id}: {message}"
            ))
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            self.list_snapshots_inner(r.into_inner()).await?,
        ))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand_inner(r.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = need(&r.volume_id, "volume_id")?;
        let v = self
            .os
            .get_volume(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let abnormal = v.status.starts_with("error");
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(to_csi_volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.attachments.iter().map(|a| a.server_id.clone()).collect(),
                volume_condition: Some(csi::VolumeCondition {
                    abnormal,
                    message: format!("Cinder status {}", v.status),
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerModifyVolume is not supported".into()).into())
    }
}
