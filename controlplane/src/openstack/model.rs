//! The simulator's in-memory model of Keystone tokens, Cinder volumes and snapshots and Nova
//! attachments, with the status transitions Cinder goes through.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::clock::iso8601;

/// A Nova instance the simulator knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub availability_zone: String,
}

/// Faults injected on demand (tests, demo). Counters count down as they fire.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Extra delay before an attachment completes (volume stays `attaching`).
    pub slow_attach_ms: u64,
    /// Answer HTTP 500 to the next N calls of an operation: `create_volume`, `delete_volume`,
    /// `extend`, `create_snapshot`, `attach`, `detach`, `get_volume`.
    pub error_500: BTreeMap<String, u32>,
    /// Accept the next N attach requests, then lose them: the volume falls back to `available`
    /// without an attachment (what a compute host crash mid-attach looks like).
    pub lose_attach: u32,
    /// Keep attachments in `attaching` until this is cleared (makes in-flight windows
    /// deterministic for tests).
    pub hold_attach: bool,
}

/// Counters a test can read to check what the driver did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub tokens_issued: u64,
    pub nova_attach_requests: u64,
    pub nova_detach_requests: u64,
    pub cinder_create_requests: u64,
    /// Highest Cinder microversion a client asked for (`3.70` ...), empty if none.
    pub max_volume_microversion: String,
    pub attached_loop_devices: usize,
    pub volumes: usize,
    pub snapshots: usize,
}

#[derive(Clone, Debug)]
pub struct Attachment {
    pub id: String,
    pub server_id: String,
    pub device: String,
    pub attached_at: SystemTime,
}

#[derive(Clone, Debug)]
pub struct Volume {
    pub seq: u64,
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub status: String,
    pub volume_type: String,
    pub availability_zone: String,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub snapshot_id: Option<String>,
    pub source_volid: Option<String>,
    pub metadata: serde_json::Map<String, Value>,
    /// Set while `attaching` and once `in-use`.
    pub attachment: Option<Attachment>,
    pub loop_dev: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub seq: u64,
    pub id: String,
    pub name: String,
    pub volume_id: String,
    pub size: u64,
    pub status: String,
    pub created_at: SystemTime,
}

/// Everything under the simulator's lock.
#[derive(Default)]
pub struct State {
    pub tokens: HashMap<String, Instant>,
    pub volumes: HashMap<String, Volume>,
    pub snapshots: HashMap<String, Snapshot>,
    pub seq: u64,
    pub faults: Faults,
    pub stats: Stats,
    /// Background operations (attach, create ...) still running.
    pub inflight: usize,
    pub closed: bool,
}

impl State {
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Consumes one injected HTTP 500 for `op`, if any.
    pub fn take_500(&mut self, op: &str) -> bool {
        match self.faults.error_500.get_mut(op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Volumes attached or attaching to a server.
    pub fn attachments_of(&self, server_id: &str) -> Vec<&Volume> {
        let mut v: Vec<&Volume> = self
            .volumes
            .values()
            .filter(|v| {
                v.attachment
                    .as_ref()
                    .is_some_and(|a| a.server_id == server_id)
            })
            .collect();
        v.sort_by_key(|v| v.seq);
        v
    }

    /// The next free `/dev/vdX` name on a server (vda is the root disk).
    pub fn next_device(&self, server_id: &str) -> String {
        let used: Vec<String> = self
            .attachments_of(server_id)
            .iter()
            .filter_map(|v| v.attachment.as_ref().map(|a| a.device.clone()))
            .collect();
        (1..)
            .map(device_name)
            .find(|d| !used.contains(d))
            .expect("infinite iterator")
    }

    pub fn snapshot_count_of(&self, volume_id: &str) -> usize {
        self.snapshots
            .values()
            .filter(|s| s.volume_id == volume_id)
            .count()
    }

    pub fn gigabytes_used(&self) -> u64 {
        self.volumes.values().map(|v| v.size).sum::<u64>()
            + self.snapshots.values().map(|s| s.size).sum::<u64>()
    }
}

/// `/dev/vd` + a, b, ..., z, aa, ab, ... (index 0 is `vda`).
pub fn device_name(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    format!("/dev/vd{}", String::from_utf8(s).expect("ascii"))
}

impl Volume {
    pub fn to_json(&self, project_id: &str) -> Value {
        let attachments: Vec<Value> = match (&self.attachment, self.status.as_str()) {
            (Some(a), "in-use" | "detaching" | "extending") => vec![json!({
                "id": self.id,
                "attachment_id": a.id,
                "volume_id": self.id,
                "server_id": a.server_id,
                "host_name": null,
                "device": a.device,
                "attached_at": iso8601(a.attached_at),
            })],
            _ => vec![],
        };
        json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "size": self.size,
            "status": self.status,
            "volume_type": self.volume_type,
            "availability_zone": self.availability_zone,
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.updated_at),
            "attachments": attachments,
            "snapshot_id": self.snapshot_id,
            "source_volid": self.source_volid,
            "metadata": self.metadata,
            "multiattach": false,
            "bootable": "false",
            "encrypted": false,
            "replication_status": null,
            "consistencygroup_id": null,
            "group_id": null,
            "user_id": "berth-sim-user",
            "os-vol-tenant-attr:tenant_id": project_id,
            "links": [],
        })
    }
}

impl Snapshot {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "description": null,
            "volume_id": self.volume_id,
            "size": self.size,
            "status": self.status,
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.created_at),
            "metadata": {},
            "progress": if self.status == "available" { "100%" } else { "0%" },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_name(0), "/dev/vda");
        assert_eq!(device_name(1), "/dev/vdb");
        assert_eq!(device_name(25), "/dev/vdz");
        assert_eq!(device_name(26), "/dev/vdaa");
        assert_eq!(device_name(27), "/dev/vdab");
    }
}
