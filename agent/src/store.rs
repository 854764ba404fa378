//! The agent's persistent state: endpoints (which carry the IPAM allocations) in one JSON file,
//! rewritten atomically (temporary file, fsync, rename) after every change, so a `kill -9` at any
//! point leaves either the old or the new state, never a torn one.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Lifecycle of an endpoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Address held; the plugin has not yet reported the interface.
    Allocated,
    /// Interface plumbed, datapath entries written and programs attached.
    Ready,
}

/// One pod attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub address: Ipv4Addr,
    pub netns: String,
    pub state: EndpointState,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub created_unix: i64,
}

/// Key of an attachment in the store.
pub fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// Everything the agent persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub pod_cidr: String,
    pub next_endpoint_id: u32,
    pub last_allocated: Option<Ipv4Addr>,
    pub endpoints: BTreeMap<String, EndpointRecord>,
}

/// The state file.
pub struct Store {
    path: PathBuf,
    fsync: bool,
}

impl Store {
    pub fn new(dir: &Path, fsync: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(Store {
            path: dir.join("state.json"),
            fsync,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the state (empty when the file does not exist yet).
    pub fn load(&self) -> Result<State> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::State {
                path: self.path.display().to_string(),
                reason: format!("corrupt ({e}); move it away to start with empty state"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                format: 1,
                next_endpoint_id: 1,
                ..State::default()
            }),
            Err(e) => Err(Error::io(format!("read {}", self.path.display()), e)),
        }
    }

    /// Atomically replaces the state file.
    pub fn save(&self, state: &State) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(state).expect("state serializes");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            if self.fsync {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| Error::io(format!("write {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_leftover_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), true).unwrap();
        let mut s = store.load().unwrap();
        assert_eq!(s.next_endpoint_id, 1);
        s.endpoints.insert(
            key("c", "eth0"),
            EndpointRecord {
                id: 1,
                container_id: "c".into(),
                ifname: "eth0".into(),
                pod_namespace: "ns".into(),
                pod_name: "p".into(),
                pod_uid: "u".into(),
                address: Ipv4Addr::new(10, 2, 0, 2),
                netns: "/run/netns/x".into(),
                state: EndpointState::Ready,
                host_ifname: "bth0".into(),
                host_ifindex: 7,
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
                created_unix: 1,
            },
        );
        store.save(&s).unwrap();
        // A crash mid-write leaves a temporary file; the real one is intact.
        std::fs::write(store.path().with_extension("json.tmp"), b"{torn").unwrap();
        assert_eq!(store.load().unwrap(), s);
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), false).unwrap();
        std::fs::write(store.path(), b"not json").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
