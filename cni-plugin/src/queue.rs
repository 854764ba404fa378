//! The on-disk delete queue: a DEL that cannot reach the agent is recorded here, and the agent
//! drains the queue when it starts (as Cilium's plugin does).
//!
//! Layout: `<state_dir>/delete-queue/<containerID>_<ifname>.json`, each `{"containerID":..,
//! "ifname":..,"queuedAt":<unix seconds>}`, written atomically (temporary file + rename).
use std::{io::Write, path::Path};

/// Records a pending release for `(container_id, ifname)`.
pub fn enqueue(state_dir: &str, container_id: &str, ifname: &str) -> std::io::Result<()> {
    let dir = Path::new(state_dir).join("delete-queue");
    std::fs::create_dir_all(&dir)?;
    let name = format!("{container_id}_{ifname}.json");
    let tmp = dir.join(format!(".{name}.tmp"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = serde_json::json!({"containerID": container_id, "ifname": ifname, "queuedAt": now});
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}
