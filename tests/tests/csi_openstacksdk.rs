//! A real OpenStack client against the simulator: Python openstacksdk (installed by
//! scripts/bootstrap.sh into ~/.cache/berth/venv) discovers versions, gets a password token,
//! then creates, lists, extends and deletes a volume with `OpenStack-API-Version: volume 3.x`.
use std::path::PathBuf;

use berth_tests::csi::{CsiEnv, EnvOptions};

const SCRIPT: &str = r#"
import sys, time, openstack
conn = openstack.connect(cloud="berth-sim")
bs = conn.block_storage
v = bs.create_volume(name="sdk-vol", size=1)
for _ in range(300):
    v = bs.get_volume(v.id)
    if v.status == "available":
        break
    time.sleep(0.05)
assert v.status == "available", v.status
assert "sdk-vol" in [x.name for x in bs.volumes()]
bs.extend_volume(v, 2)
for _ in range(300):
    v = bs.get_volume(v.id)
    if v.status == "available" and v.size == 2:
        break
    time.sleep(0.05)
assert v.size == 2, v.size
bs.delete_volume(v)
for _ in range(300):
    if bs.find_volume("sdk-vol") is None:
        break
    time.sleep(0.05)
assert bs.find_volume("sdk-vol") is None
print("openstacksdk OK")
"#;

fn venv_python() -> PathBuf {
    let home = std::env::var("HOME").expect("HOME");
    let p = PathBuf::from(home).join(".cache/berth/venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/bootstrap.sh (it installs openstacksdk into that venv)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstacksdk_creates_lists_extends_deletes() {
    let python = venv_python();
    let e = CsiEnv::start(|_| {}, EnvOptions::default());
    let clouds = e.dir.path().join("clouds.yaml");
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .env_remove("OS_CLOUD")
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "openstacksdk script failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openstacksdk OK"));
    let stats = e.sim().sim.stats();
    assert!(
        stats.tokens_issued >= 1 && stats.cinder_create_requests >= 1,
        "{stats:?}"
    );
    assert_eq!(stats.volumes, 0);
    assert_eq!(
        stats.max_volume_microversion, "3.70",
        "openstacksdk negotiates the simulator's maximum Cinder microversion"
    );
}
