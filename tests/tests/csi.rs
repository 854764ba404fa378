//! berth-csi end to end: the real driver binary against the OpenStack simulator, real loop
//! devices, real mkfs and mounts. Conformance cases are modelled on kubernetes-csi's csi-sanity.
//! Every test owns its environment ([`CsiEnv`]) and leaves no mount or loop device behind.
use std::{
    io::{Read, Seek, SeekFrom, Write},
    time::Duration,
};

use berth_controlplane::openstack::Faults;
use berth_proto::csi::{self, volume_capability::access_mode::Mode};
use berth_tests::csi::*;
use tonic::Code;

const DRIVER: &str = "cinder.csi.openstack.org";
const ZONE_KEY: &str = "topology.cinder.csi.openstack.org/zone";

fn env() -> CsiEnv {
    CsiEnv::start(|_| {}, EnvOptions::default())
}

// ------------------------------------------------------------------ identity + node info

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    let mut e = env();
    let mut c = e.clients().await;
    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER);
    assert!(!info.vendor_version.is_empty());
    let caps = c
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::plugin_capability::{Type, service};
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(Type::Service(s)) if s.r#type == service::Type::ControllerService as i32)));
    assert!(
        caps.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(Type::VolumeExpansion(_))))
    );
    let probe = c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ni.node_id, e.node_id,
        "node id is the Nova instance UUID from the metadata service"
    );
    assert_eq!(ni.max_volumes_per_node, 100);
    assert_eq!(
        ni.accessible_topology
            .unwrap()
            .segments
            .get(ZONE_KEY)
            .map(String::as_str),
        Some("nova")
    );

    let nc = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::node_service_capability::{Type as NT, rpc::Type as R};
    let has = |t: R| {
        nc.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(NT::Rpc(r)) if r.r#type == t as i32))
    };
    assert!(has(R::StageUnstageVolume) && has(R::GetVolumeStats) && has(R::ExpandVolume));

    let cc = c
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::controller_service_capability::{Type as CT, rpc::Type as CR};
    let has = |t: CR| {
        cc.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(CT::Rpc(r)) if r.r#type == t as i32))
    };
    for t in [
        CR::CreateDeleteVolume,
        CR::PublishUnpublishVolume,
        CR::ListVolumes,
        CR::CreateDeleteSnapshot,
        CR::ListSnapshots,
        CR::CloneVolume,
        CR::ExpandVolume,
    ] {
        assert!(has(t), "missing controller capability {t:?}");
    }
    assert!(e.mounts_under_dir().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_from_config_drive_and_attach_limit_flag() {
    let mut e = CsiEnv::start(
        |_| {},
        EnvOptions {
            creds: Creds::CloudsYaml,
            driver_args: vec![],
            driver_bin: None,
        },
    );
    // A config drive directory with another identity takes precedence when listed first.
    let cd = e.dir.path().join("config-drive");
    std::fs::create_dir_all(cd.join("openstack/latest")).unwrap();
    std::fs::write(
        cd.join("openstack/latest/meta_data.json"),
        r#"{"uuid": "cd-uuid-1", "name": "n", "availability_zone": "GRA9", "devices": []}"#,
    )
    .unwrap();
    e.kill_driver();
    e.start_driver_with(&[
        "--config-drive",
        cd.to_str().unwrap(),
        "--metadata-search-order",
        "configDrive,metadataService",
        "--max-volumes-per-node",
        "42",
    ]);
    let mut c = e.clients().await;
    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "cd-uuid-1");
    assert_eq!(ni.max_volumes_per_node, 42);
    assert_eq!(ni.accessible_topology.unwrap().segments[ZONE_KEY], "GRA9");
    // Above the platform limit is refused at start.
    e.kill_driver();
    let out = std::process::Command::new(berth_tests::netns::workspace_bin("berth-csi"))
        .args([
            "--role",
            "node",
            "--max-volumes-per-node",
            "101",
            "--endpoint",
        ])
        .arg(format!("unix://{}/x.sock", e.dir.path().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("platform"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------ controller conformance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_delete_validate_conformance() {
    let mut e = CsiEnv::start(|cfg| cfg.quota_gigabytes = 50, EnvOptions::default());
    let mut c = e.clients().await;
    let ctl = &mut c.controller;

    // Missing fields.
    assert_code(
        ctl.create_volume(create_req("", GIB, mount_cap("ext4")))
            .await,
        Code::InvalidArgument,
    );
    let mut r = create_req(&unique("v"), GIB, mount_cap("ext4"));
    r.volume_capabilities.clear();
    assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
    // Multi-node writer: refused, pointing at File Storage.
    let s = assert_code(
        ctl.create_volume(create_req(
            &unique("v"),
            GIB,
            cap(Mode::MultiNodeMultiWriter, Some("ext4")),
        ))
        .await,
        Code::InvalidArgument,
    );
    assert!(
        s.message().contains("File Storage (NFS)"),
        "{}",
        s.message()
    );
    // Unknown fsType, in the capability and in the StorageClass.
    assert_code(
        ctl.create_volume(create_req(&unique("v"), GIB, mount_cap("btrfs")))
            .await,
        Code::InvalidArgument,
    );
    let mut r = create_req(&unique("v"), GIB, mount_cap(""));
    r.parameters
        .insert("csi.storage.k8s.io/fstype".into(), "ntfs".into());
    assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
    let mut r = create_req(&unique("v"), GIB, mount_cap(""));
    r.parameters.insert("flavour".into(), "x".into());
    assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
    // Negative and absurd sizes.
    assert_code(
        ctl.create_volume(create_req(&unique("v"), -5, mount_cap("ext4")))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.create_volume(create_req(&unique("v"), i64::MAX, mount_cap("ext4")))
            .await,
        Code::OutOfRange,
    );
    let mut r = create_req(&unique("v"), GIB + 1, mount_cap("ext4"));
    r.capacity_range.as_mut().unwrap().limit_bytes = GIB + 2;
    assert_code(ctl.create_volume(r).await, Code::OutOfRange);
    // Quota (Cinder 413) → RESOURCE_EXHAUSTED.
    let s = assert_code(
        ctl.create_volume(create_req(&unique("v"), 60 * GIB, mount_cap("ext4")))
            .await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("quota"), "{}", s.message());
    // Unknown volume type → Cinder 404 → NOT_FOUND is what Cinder says; our parameters pass it through.
    let mut r = create_req(&unique("v"), GIB, mount_cap("ext4"));
    r.parameters.insert("type".into(), "no-such-type".into());
    assert_code(ctl.create_volume(r).await, Code::NotFound);
    // Missing content source.
    let mut r = create_req(&unique("v"), GIB, mount_cap("ext4"));
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "nope".into(),
            },
        )),
    });
    assert_code(ctl.create_volume(r).await, Code::NotFound);

    // Create with rounding, type, zone from topology; idempotent by name.
    let name = unique("v");
    let mut r = create_req(&name, GIB + 1, mount_cap("xfs"));
    r.parameters.insert("type".into(), "high-speed".into());
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [(ZONE_KEY.to_string(), "nova".to_string())].into(),
        }],
        preferred: vec![],
    });
    let v1 = ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v1.capacity_bytes, 2 * GIB);
    assert_eq!(v1.accessible_topology[0].segments[ZONE_KEY], "nova");
    let v2 = ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v1.volume_id, v2.volume_id, "same name, same answer");
    // Same name, other size → ALREADY_EXISTS.
    r.capacity_range.as_mut().unwrap().required_bytes = 5 * GIB;
    assert_code(ctl.create_volume(r).await, Code::AlreadyExists);

    // Validate.
    let vreq =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    assert_code(
        ctl.validate_volume_capabilities(vreq("", vec![mount_cap("ext4")]))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.validate_volume_capabilities(vreq(&v1.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.validate_volume_capabilities(vreq("missing-volume", vec![mount_cap("ext4")]))
            .await,
        Code::NotFound,
    );
    let ok = ctl
        .validate_volume_capabilities(vreq(&v1.volume_id, vec![mount_cap("xfs")]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = ctl
        .validate_volume_capabilities(vreq(
            &v1.volume_id,
            vec![cap(Mode::MultiNodeReaderOnly, Some("ext4"))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("NFS"),
        "{no:?}"
    );

    // ControllerGetVolume.
    let g = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v1.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.volume.unwrap().volume_id, v1.volume_id);
    assert_code(
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "missing".into(),
        })
        .await,
        Code::NotFound,
    );

    // Delete: missing id → INVALID_ARGUMENT; unknown → OK; twice → OK.
    assert_code(
        ctl.delete_volume(csi::DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
    );
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "no-such-volume".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete(&v1.volume_id).await;
    c.delete(&v1.volume_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_unpublish_conformance() {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let v = c.create(&unique("p"), GIB, mount_cap("ext4")).await;
    let id = v.volume_id.clone();
    let req = |vol: &str, n: &str, cap: Option<csi::VolumeCapability>| {
        csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: n.into(),
            volume_capability: cap,
            ..Default::default()
        }
    };
    let ctl = &mut c.controller;
    assert_code(
        ctl.controller_publish_volume(req("", &node, Some(mount_cap("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(req(&id, "", Some(mount_cap("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(req(&id, &node, None)).await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(req(
            &id,
            &node,
            Some(cap(Mode::MultiNodeMultiWriter, Some("ext4"))),
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(req("missing-volume", &node, Some(mount_cap("ext4"))))
            .await,
        Code::NotFound,
    );
    assert_code(
        ctl.controller_publish_volume(req(&id, "missing-node", Some(mount_cap("ext4"))))
            .await,
        Code::NotFound,
    );

    let ctx = c.attach(&id, &node, mount_cap("ext4")).await;
    assert!(
        ctx.get("DevicePath")
            .is_some_and(|d| d.starts_with("/dev/vd")),
        "{ctx:?}"
    );
    // Idempotent.
    assert_eq!(c.attach(&id, &node, mount_cap("ext4")).await, ctx);
    // The by-id link exists and points at a loop device.
    let link = e.by_id.join(format!("virtio-{}", &id[..20]));
    let dev = std::fs::canonicalize(&link).expect("by-id link");
    assert!(dev.to_str().unwrap().starts_with("/dev/loop"), "{dev:?}");
    // Attached elsewhere → FAILED_PRECONDITION naming the node.
    let s = assert_code(
        c.controller
            .controller_publish_volume(req(&id, OTHER_NODE, Some(mount_cap("ext4"))))
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains(&node), "{}", s.message());
    // Delete while attached → FAILED_PRECONDITION.
    assert_code(
        c.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );

    // Unpublish: missing id → INVALID_ARGUMENT; not attached to that node / unknown → OK.
    assert_code(
        c.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
    );
    c.detach(&id, OTHER_NODE).await;
    assert!(link.exists(), "unpublish from another node must not detach");
    c.detach("missing-volume", &node).await;
    c.detach(&id, &node).await;
    assert!(!link.exists(), "detach removes the by-id link");
    c.detach(&id, &node).await;
    assert!(
        berth_tests::csi::loops_left_under(e.dir.path()).is_empty(),
        "detach frees the loop device"
    );
    c.delete(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_and_snapshots_paging() {
    let mut e = env();
    let mut c = e.clients().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            c.create(&unique("l"), GIB, mount_cap("ext4"))
                .await
                .volume_id,
        );
    }
    let ctl = &mut c.controller;
    assert_code(
        ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
    let p1 = ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    let p2 = ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: p1.next_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let mut seen: Vec<String> = p1
        .entries
        .iter()
        .chain(p2.entries.iter())
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    assert_code(
        ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: "bogus-token".into(),
        })
        .await,
        Code::Aborted,
    );

    // Snapshots.
    assert_code(
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: ids[0].clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            name: unique("s"),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            name: unique("s"),
            source_volume_id: "missing".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    let sname = unique("s");
    let sreq = csi::CreateSnapshotRequest {
        name: sname.clone(),
        source_volume_id: ids[0].clone(),
        ..Default::default()
    };
    let s1 = ctl
        .create_snapshot(sreq.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, GIB);
    assert!(s1.creation_time.is_some());
    let s2 = ctl
        .create_snapshot(sreq)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s1.snapshot_id, s2.snapshot_id);
    assert_code(
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            name: sname,
            source_volume_id: ids[1].clone(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    let by_id = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let none = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let by_src = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_src.entries.len(), 1);
    assert_code(
        ctl.list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 1,
            starting_token: "bogus".into(),
            ..Default::default()
        })
        .await,
        Code::Aborted,
    );
    // A volume with snapshots cannot be deleted.
    assert_code(
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: ids[0].clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    assert_code(
        ctl.delete_snapshot(csi::DeleteSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
    );
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: "missing".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Expand: missing range → INVALID_ARGUMENT; unknown → NOT_FOUND; smaller → OK at current size.
    assert_code(
        ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: ids[1].clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "missing".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    let ex = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: ids[1].clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.capacity_bytes, GIB);
    for id in &ids {
        // The snapshot deletion is asynchronous in Cinder: retry the one that had it.
        let mut tries = 0;
        loop {
            match c
                .controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => break,
                Err(s) if s.code() == Code::FailedPrecondition && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => panic!("DeleteVolume {id}: {s}"),
            }
        }
    }
}

// ------------------------------------------------------------------ node conformance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_bad_requests() {
    let mut e = CsiEnv::start(
        |_| {},
        EnvOptions {
            creds: Creds::CloudConf,
            driver_args: vec!["--device-attempts".into(), "2".into()],
            driver_bin: None,
        },
    );
    let mut c = e.clients().await;
    let v = c.create(&unique("n"), GIB, mount_cap("ext4")).await;
    let id = v.volume_id;
    let staging = e.staging_path(&id);
    let target = e.target_path("pod-bad", &id);
    let stage =
        |vol: &str, st: &str, cap: Option<csi::VolumeCapability>| csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: st.into(),
            volume_capability: cap,
            ..Default::default()
        };
    let n = &mut c.node;
    let st = staging.to_str().unwrap();
    assert_code(
        n.node_stage_volume(stage("", st, Some(mount_cap("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage(&id, "", Some(mount_cap("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage(&id, st, None)).await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage(&id, st, Some(mount_cap("vfat"))))
            .await,
        Code::InvalidArgument,
    );
    // Not attached: the disk is not found (bounded tries).
    let s = assert_code(
        n.node_stage_volume(stage(&id, st, Some(mount_cap("ext4"))))
            .await,
        Code::NotFound,
    );
    assert!(s.message().contains("virtio-"), "{}", s.message());
    // Publish before stage → FAILED_PRECONDITION; missing target → INVALID_ARGUMENT.
    assert_code(
        n.node_publish_volume(Clients::publish_req(
            &id,
            &staging,
            &target,
            mount_cap("ext4"),
            false,
        ))
        .await,
        Code::FailedPrecondition,
    );
    let mut r = Clients::publish_req(&id, &staging, &target, mount_cap("ext4"), false);
    r.target_path.clear();
    assert_code(n.node_publish_volume(r).await, Code::InvalidArgument);
    // Unpublish / unstage of nothing → OK.
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: st.into(),
    })
    .await
    .unwrap();
    assert_code(
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
    // Stats: missing path → INVALID_ARGUMENT; absent path → NOT_FOUND.
    assert_code(
        n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    assert_code(
        n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    c.delete(&id).await;
}

// ------------------------------------------------------------------ end to end

async fn lifecycle(fs: &str) {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let capm = mount_cap(fs);
    let v = c.create(&unique("e"), GIB, capm.clone()).await;
    let id = v.volume_id.clone();
    c.attach(&id, &node, capm.clone()).await;
    let staging = e.staging_path(&id);
    c.stage(&id, &staging, capm.clone()).await;
    c.stage(&id, &staging, capm.clone()).await; // idempotent
    // Another filesystem at the same staging path → ALREADY_EXISTS.
    let other = if fs == "ext4" { "xfs" } else { "ext4" };
    assert_code(
        c.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap(other)),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
    );
    let target = e.target_path("pod-a", &id);
    c.publish(&id, &staging, &target, capm.clone(), false).await;
    c.publish(&id, &staging, &target, capm.clone(), false).await; // idempotent
    // Same target, read-only now → ALREADY_EXISTS.
    assert_code(
        c.node
            .node_publish_volume(Clients::publish_req(
                &id,
                &staging,
                &target,
                capm.clone(),
                true,
            ))
            .await,
        Code::AlreadyExists,
    );
    std::fs::write(target.join("data.txt"), b"hello from berth").unwrap();
    let blkid = std::process::Command::new("blkid")
        .args(["-o", "value", "-s", "TYPE"])
        .arg(std::fs::canonicalize(e.by_id.join(format!("virtio-{}", &id[..20]))).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&blkid.stdout).trim(), fs);

    // Stats.
    let st = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage.len(), 2);
    assert!(st.usage[0].total > GIB / 2 && st.usage[0].used > 0);
    assert!(!st.volume_condition.unwrap().abnormal);

    // A read-only publish into a second pod.
    let ro = e.target_path("pod-ro", &id);
    c.publish(&id, &staging, &ro, capm.clone(), true).await;
    assert_eq!(
        std::fs::read(ro.join("data.txt")).unwrap(),
        b"hello from berth"
    );
    let err = std::fs::write(ro.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    c.unpublish(&id, &ro).await;
    assert!(!ro.exists(), "NodeUnpublish removes the target");

    // Unpublish, unstage, stage again: the data is still there (never reformatted).
    c.unpublish(&id, &target).await;
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.unstage(&id, &staging).await;
    assert!(!is_mounted(&staging));
    // The disk holds a filesystem now: staging it as the other type must not reformat it.
    let s = assert_code(
        c.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap(other)),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(
        s.message().contains("refusing to reformat"),
        "{}",
        s.message()
    );
    assert!(!is_mounted(&staging));
    c.stage(&id, &staging, capm.clone()).await;
    c.publish(&id, &staging, &target, capm.clone(), false).await;
    assert_eq!(
        std::fs::read(target.join("data.txt")).unwrap(),
        b"hello from berth"
    );

    // Expand online (Cinder 3.42 on an in-use volume), then the filesystem.
    let before = fs_total_bytes(&target);
    let ex = c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 3 * GIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(capm.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.capacity_bytes, 3 * GIB);
    assert!(ex.node_expansion_required);
    let nx = c
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 3 * GIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(capm.clone()),
            ..Default::default()
        })
        .await;
    if fs == "ext4" && !has_cap_sys_resource() {
        // The kernel grows a mounted ext4 only for CAP_SYS_RESOURCE, which this machine does not
        // grant: the driver says so, and the filesystem grows offline at the next stage.
        let s = assert_code(nx, Code::FailedPrecondition);
        assert!(s.message().contains("CAP_SYS_RESOURCE"), "{}", s.message());
        assert_eq!(fs_total_bytes(&target), before, "nothing changed");
        c.unpublish(&id, &target).await;
        c.unstage(&id, &staging).await;
        c.stage(&id, &staging, capm.clone()).await;
        c.publish(&id, &staging, &target, capm.clone(), false).await;
    } else {
        assert_eq!(nx.unwrap().into_inner().capacity_bytes, 3 * GIB);
    }
    let after = fs_total_bytes(&target);
    assert!(
        after > before + GIB as u64,
        "filesystem did not grow: {before} → {after}"
    );
    assert_eq!(
        std::fs::read(target.join("data.txt")).unwrap(),
        b"hello from berth"
    );

    // Snapshot → clone from the snapshot, and clone from the volume: both hold the data.
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await; // flush the filesystem before the snapshot
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            name: unique("snap"),
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.source_volume_id, id);
    let mut from_snap = create_req(&unique("c"), 3 * GIB, capm.clone());
    from_snap.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let clone1 = c
        .controller
        .create_volume(from_snap)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(clone1.content_source.is_some());
    let mut from_vol = create_req(&unique("c"), 4 * GIB, capm.clone());
    from_vol.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.clone(),
            },
        )),
    });
    let clone2 = c
        .controller
        .create_volume(from_vol)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // All three staged on the same node at once (xfs needs nouuid for that).
    c.stage(&id, &staging, capm.clone()).await;
    for cl in [&clone1, &clone2] {
        let cid = cl.volume_id.clone();
        c.attach(&cid, &node, capm.clone()).await;
        let cst = e.staging_path(&cid);
        c.stage(&cid, &cst, capm.clone()).await;
        let ct = e.target_path("pod-clone", &cid);
        c.publish(&cid, &cst, &ct, capm.clone(), false).await;
        assert_eq!(
            std::fs::read(ct.join("data.txt")).unwrap(),
            b"hello from berth"
        );
        if cl.capacity_bytes == 4 * GIB {
            // Staging a clone bigger than its source grows the filesystem.
            assert!(
                fs_total_bytes(&ct) > 3 * GIB as u64,
                "clone filesystem not grown"
            );
        }
        c.unpublish(&cid, &ct).await;
        c.unstage(&cid, &cst).await;
        c.detach(&cid, &node).await;
        c.delete(&cid).await;
    }
    c.unstage(&id, &staging).await;
    c.detach(&id, &node).await;
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        e.mounts_under_dir().is_empty(),
        "mounts left: {:?}",
        e.mounts_under_dir()
    );
    let left = berth_tests::csi::loops_left_under(e.dir.path());
    assert!(left.is_empty(), "loop devices left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_ext4() {
    lifecycle("ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_xfs() {
    lifecycle("xfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_volume() {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let capb = block_cap();
    let v = c.create(&unique("b"), GIB, capb.clone()).await;
    let id = v.volume_id;
    c.attach(&id, &node, capb.clone()).await;
    let staging = e.staging_path(&id);
    c.stage(&id, &staging, capb.clone()).await;
    let target = e.target_path("pod-blk", &id);
    c.publish(&id, &staging, &target, capb.clone(), false).await;
    c.publish(&id, &staging, &target, capb.clone(), false).await;
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    // No filesystem was made on a raw block volume.
    let blkid = std::process::Command::new("blkid")
        .arg("-p")
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(
        blkid.status.code(),
        Some(2),
        "raw block must stay unformatted"
    );
    let st = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage[0].total, GIB);
    c.unpublish(&id, &target).await;
    assert!(!target.exists());
    c.publish(&id, &staging, &target, capb.clone(), false).await;
    let mut buf = vec![0u8; 4096];
    {
        let mut f = std::fs::File::open(&target).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.read_exact(&mut buf).unwrap();
    }
    assert_eq!(buf, pattern);
    // Expand a block volume: the controller says no node expansion is needed, the device grows.
    let ex = c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(capb.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ex.node_expansion_required);
    let size = std::process::Command::new("blockdev")
        .arg("--getsize64")
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (2 * GIB).to_string()
    );
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.detach(&id, &node).await;
    c.delete(&id).await;
    assert!(e.mounts_under_dir().is_empty());
}

// ------------------------------------------------------------------ cap, concurrency, faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_and_nova_refusal_are_resource_exhausted() {
    // Driver cap 2 (Nova would allow 5): the third is refused before Nova is called.
    let mut e = CsiEnv::start(
        |cfg| cfg.max_attachments_per_instance = 5,
        EnvOptions {
            creds: Creds::EnvAppCredential,
            driver_args: vec!["--max-volumes-per-node".into(), "2".into()],
            driver_bin: None,
        },
    );
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            c.create(&unique("cap"), GIB, mount_cap("ext4"))
                .await
                .volume_id,
        );
    }
    c.attach(&ids[0], &node, mount_cap("ext4")).await;
    c.attach(&ids[1], &node, mount_cap("ext4")).await;
    let before = e.sim().sim.stats().nova_attach_requests;
    let s = assert_code(
        c.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: ids[2].clone(),
                node_id: node.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("maximum of 2"), "{}", s.message());
    assert_eq!(
        e.sim().sim.stats().nova_attach_requests,
        before,
        "Nova must not be called past the cap"
    );
    for id in &ids[..2] {
        c.detach(id, &node).await;
    }

    // Nova's own disk limit (2) below the driver's cap (100): Nova's refusal → RESOURCE_EXHAUSTED.
    drop(c);
    let mut e2 = CsiEnv::start(
        |cfg| cfg.max_attachments_per_instance = 2,
        EnvOptions::default(),
    );
    let node = e2.node_id.clone();
    let mut c = e2.clients().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            c.create(&unique("nova"), GIB, mount_cap("ext4"))
                .await
                .volume_id,
        );
    }
    c.attach(&ids[0], &node, mount_cap("ext4")).await;
    c.attach(&ids[1], &node, mount_cap("ext4")).await;
    let s = assert_code(
        c.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: ids[2].clone(),
                node_id: node.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("disk limit"), "{}", s.message());
    for id in &ids[..2] {
        c.detach(id, &node).await;
    }
    drop(e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_volume_are_aborted() {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let id = c
        .create(&unique("cc"), GIB, mount_cap("ext4"))
        .await
        .volume_id;
    // Hold attachments in `attaching`: the first publish stays in flight until released.
    e.sim().sim.set_faults(Faults {
        hold_attach: true,
        ..Default::default()
    });
    let mut c1 = c.clone();
    let (id1, node1) = (id.clone(), node.clone());
    let first = tokio::spawn(async move { c1.attach(&id1, &node1, mount_cap("ext4")).await });
    while e.sim().sim.volume_status(&id).as_deref() != Some("attaching") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = assert_code(
        c.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        Code::Aborted,
    );
    assert!(s.message().contains("in progress"), "{}", s.message());
    assert_code(
        c.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::Aborted,
    );
    e.sim().sim.set_faults(Faults::default());
    first.await.unwrap();
    // Released: the same call now succeeds (idempotent).
    c.attach(&id, &node, mount_cap("ext4")).await;
    c.detach(&id, &node).await;
    c.delete(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lost_attachment_http_500_and_reauth() {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let id = c
        .create(&unique("f"), GIB, mount_cap("ext4"))
        .await
        .volume_id;
    // A lost attachment (volume falls back to available) is repaired by re-attaching.
    e.sim().sim.set_faults(Faults {
        lose_attach: 1,
        ..Default::default()
    });
    c.attach(&id, &node, mount_cap("ext4")).await;
    assert_eq!(e.sim().sim.volume_status(&id).as_deref(), Some("in-use"));
    assert_eq!(e.sim().sim.faults().lose_attach, 0, "the fault fired");
    c.detach(&id, &node).await;
    // Nova HTTP 500 → UNAVAILABLE (retryable), not INTERNAL; the retry works.
    e.sim().sim.set_faults(Faults {
        error_500: [("attach".to_string(), 1)].into(),
        ..Default::default()
    });
    assert_code(
        c.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
    );
    c.attach(&id, &node, mount_cap("ext4")).await;
    // Revoked tokens: the driver re-authenticates transparently.
    let tokens = e.sim().sim.stats().tokens_issued;
    e.sim().sim.revoke_tokens();
    c.detach(&id, &node).await;
    assert!(
        e.sim().sim.stats().tokens_issued > tokens,
        "driver did not re-authenticate"
    );
    c.delete(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_triggers_reauthentication() {
    let mut e = CsiEnv::start(
        |cfg| cfg.token_ttl = Duration::from_secs(1),
        EnvOptions {
            creds: Creds::CloudsYaml,
            driver_args: vec![],
            driver_bin: None,
        },
    );
    let mut c = e.clients().await;
    let id = c
        .create(&unique("t"), GIB, mount_cap("ext4"))
        .await
        .volume_id;
    let t0 = e.sim().sim.stats().tokens_issued;
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the token's lifetime
    c.delete(&id).await;
    assert!(e.sim().sim.stats().tokens_issued > t0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_restart_mid_sequence_loses_nothing() {
    let mut e = env();
    let node = e.node_id.clone();
    let mut c = e.clients().await;
    let capm = mount_cap("ext4");
    let id = c.create(&unique("r"), GIB, capm.clone()).await.volume_id;
    // Crash while the attach is in flight.
    e.sim().sim.set_faults(Faults {
        hold_attach: true,
        ..Default::default()
    });
    let mut c1 = c.clone();
    let (id1, node1, cap1) = (id.clone(), node.clone(), capm.clone());
    let pending = tokio::spawn(async move {
        c1.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id1,
                node_id: node1,
                volume_capability: Some(cap1),
                ..Default::default()
            })
            .await
    });
    while e.sim().sim.volume_status(&id).as_deref() != Some("attaching") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.kill_driver();
    assert!(
        pending.await.unwrap().is_err(),
        "the call died with the driver"
    );
    e.sim().sim.set_faults(Faults::default());
    e.start_driver();
    let mut c = e.clients().await;
    // The retried publish finds the attachment and returns it; stage and write.
    c.attach(&id, &node, capm.clone()).await;
    let staging = e.staging_path(&id);
    c.stage(&id, &staging, capm.clone()).await;
    let target = e.target_path("pod-r", &id);
    c.publish(&id, &staging, &target, capm.clone(), false).await;
    std::fs::write(target.join("keep.txt"), b"survives restarts").unwrap();
    // Crash again with the volume staged and published: every call is idempotent afterwards.
    e.kill_driver();
    e.start_driver();
    let mut c = e.clients().await;
    c.attach(&id, &node, capm.clone()).await;
    c.stage(&id, &staging, capm.clone()).await;
    c.publish(&id, &staging, &target, capm.clone(), false).await;
    assert_eq!(
        std::fs::read(target.join("keep.txt")).unwrap(),
        b"survives restarts"
    );
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.detach(&id, &node).await;
    c.delete(&id).await;
    assert!(e.mounts_under_dir().is_empty());
}
