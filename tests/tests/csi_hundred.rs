//! The 100-volume cap on real loop devices: one node holds 100 attached volumes; the 101st is
//! refused with RESOURCE_EXHAUSTED before Nova is asked. Volumes are 1 GiB sparse files and are
//! not formatted, so the test stays lean.
use std::sync::Arc;

use berth_proto::csi;
use berth_tests::csi::*;
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::Code;

const PARALLEL: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_volumes_attached_and_the_101st_refused() {
    let mut e = CsiEnv::start(
        |cfg| cfg.transition_delay = std::time::Duration::from_millis(1),
        EnvOptions::default(),
    );
    let node = e.node_id.clone();
    let c = e.clients().await;
    let sem = Arc::new(Semaphore::new(PARALLEL));

    let mut set = JoinSet::new();
    for i in 0..101 {
        let mut c = c.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.create(&format!("hundred-{i}"), GIB, block_cap())
                .await
                .volume_id
        });
    }
    let mut ids: Vec<String> = set.join_all().await;
    ids.sort();
    let (first100, last) = ids.split_at(100);

    let mut set = JoinSet::new();
    for id in first100 {
        let (mut c, sem, id, node) = (c.clone(), sem.clone(), id.clone(), node.clone());
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.attach(&id, &node, block_cap()).await;
        });
    }
    set.join_all().await;

    let info = c
        .clone()
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 100);
    let links = std::fs::read_dir(&e.by_id)
        .unwrap()
        .filter(|d| {
            d.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("virtio-")
        })
        .count();
    assert_eq!(links, 100, "one by-id link per attached volume");
    assert_eq!(
        loops_under(e.dir.path()).len(),
        100,
        "one loop device per attached volume"
    );

    let before = e.sim().sim.stats().nova_attach_requests;
    let s = assert_code(
        c.clone()
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: last[0].clone(),
                node_id: node.clone(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("100"), "{}", s.message());
    assert_eq!(
        e.sim().sim.stats().nova_attach_requests,
        before,
        "decided before Nova is called"
    );
    // Re-publishing one that is already attached is still fine at the cap (idempotent).
    c.clone().attach(&first100[0], &node, block_cap()).await;
    // The last one can attach elsewhere.
    c.clone().attach(&last[0], OTHER_NODE, block_cap()).await;
    c.clone().detach(&last[0], OTHER_NODE).await;

    // One detach frees a slot for the 101st.
    c.clone().detach(&first100[0], &node).await;
    c.clone().attach(&last[0], &node, block_cap()).await;

    let mut set = JoinSet::new();
    for id in first100[1..].iter().chain(last.iter()) {
        let (mut c, sem, id, node) = (c.clone(), sem.clone(), id.clone(), node.clone());
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.detach(&id, &node).await;
        });
    }
    set.join_all().await;
    assert!(
        berth_tests::csi::loops_left_under(e.dir.path()).is_empty(),
        "every loop device detached"
    );
    let mut set = JoinSet::new();
    for id in ids {
        let (mut c, sem) = (c.clone(), sem.clone());
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.delete(&id).await;
        });
    }
    set.join_all().await;
}
