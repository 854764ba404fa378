//! The eBPF datapath: loads Berth's tc programs, pins programs and maps under the pin root, adopts
//! existing pins on restart, attaches programs to pods' host-side veths, and reads counters.
//!
//! Pins: `<pin root>/maps/<MAP>` (maps declared `pinned` in the object, reused by name) and
//! `<pin root>/progs/<program>`. tc filters are attached through netlink (clsact, fixed priority
//! and handle), so they belong to the interface, not to this process: a killed agent leaves the
//! datapath running, and the restarted agent adopts the pinned programs and maps.
use crate::error::{Error, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuHashMap},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use berth_ebpf_common::{
    ALL_MAPS, ALL_PROGRAMS, DatapathConfig, EndpointInfo, MAP_CONFIG, MAP_ENDPOINTS, MAP_METRICS,
    MetricKey, MetricValue, PROG_FROM_POD, PROG_TO_POD, drop_reason, metric,
};
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The compiled kernel object (built by agent/build.rs from ebpf/berth-ebpf).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth.bpf.o"));

/// tc priority and handle of Berth's filters.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: u32 = 1;

/// Counters of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
}

/// What `berthctl status` shows about the datapath.
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub loaded: bool,
    pub pin_root: String,
    pub programs: Vec<String>,
    pub maps: Vec<String>,
    pub adopted: bool,
}

/// The operations the agent needs from a datapath (a fake implements it in unit tests).
pub trait Datapath: Send {
    /// Writes (or rewrites) the endpoint entry for `ip`.
    fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()>;
    /// Removes the endpoint entry and its counters (absent entries are fine).
    fn remove_endpoint(&mut self, ip: Ipv4Addr, endpoint_id: u32) -> Result<()>;
    /// Attaches the pod programs to host-side interface `ifname` (replacing older ones).
    fn attach(&mut self, ifname: &str) -> Result<()>;
    /// Counters of an endpoint.
    fn stats(&self, endpoint_id: u32) -> Stats;
    /// Status.
    fn info(&self) -> Info;
    /// True when programs were freshly loaded (not adopted), so existing endpoints need their
    /// filters re-pointed at the new programs.
    fn needs_reattach(&self) -> bool;
    /// True while the host-side interface `ifname` with index `ifindex` exists. A pod's veth pair
    /// disappears when its network namespace is destroyed, so a missing interface means the pod
    /// is gone.
    fn link_present(&self, ifname: &str, ifindex: u32) -> bool {
        nix::net::if_::if_nametoindex(ifname).ok() == Some(ifindex)
    }
}

/// A 64-bit FNV-1a digest (identifies the kernel object whose programs are pinned).
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11; // statfs f_type of bpffs

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure the pin root can live on a bpf filesystem: mounts bpffs at /sys/fs/bpf when the
/// pin root is below it and nothing is mounted there yet (as Cilium does), then creates the
/// directories.
fn prepare_pin_root(pin_root: &Path) -> Result<()> {
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(sysfs_bpf) && sysfs_bpf.is_dir() && !is_bpffs(sysfs_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sysfs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::io("mount bpffs at /sys/fs/bpf", e.into()))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    for d in [pin_root.join("maps"), pin_root.join("progs")] {
        std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
    }
    if !is_bpffs(pin_root) {
        return Err(Error::Config(format!(
            "pin root {} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
            pin_root.display()
        )));
    }
    Ok(())
}

/// The real datapath.
pub struct EbpfDatapath {
    _ebpf: Ebpf,
    progs: BTreeMap<&'static str, SchedClassifier>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    metrics: PerCpuHashMap<MapData, MetricKey, MetricValue>,
    pin_root: PathBuf,
    adopted: bool,
}

impl EbpfDatapath {
    /// Loads or adopts the datapath under `pin_root`. `state_dir` remembers which object the pinned
    /// programs came from: pins of the same object are adopted; otherwise the programs are loaded
    /// again and the pins replaced (maps, and so all endpoint entries, are always kept).
    pub fn load(pin_root: &Path, state_dir: &Path, config: DatapathConfig) -> Result<Self> {
        let maps_dir = pin_root.join("maps");
        let progs_dir = pin_root.join("progs");
        prepare_pin_root(pin_root)?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("create {}", state_dir.display()), e))?;
        let mut ebpf = EbpfLoader::new().map_pin_path(&maps_dir).load(BPF_OBJECT)?;

        let digest = format!("{:016x}", fnv64(BPF_OBJECT));
        let digest_file = state_dir.join("datapath-object");
        let same_object = std::fs::read_to_string(&digest_file).is_ok_and(|d| d.trim() == digest);
        let all_pinned = ALL_PROGRAMS.iter().all(|p| progs_dir.join(p).exists());
        let adopted = same_object && all_pinned;
        if !adopted {
            for name in ALL_PROGRAMS {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or_else(|| Error::Datapath(format!("program {name} missing from object")))?
                    .try_into()?;
                prog.load()?;
                let pin = progs_dir.join(name);
                if pin.exists() {
                    std::fs::remove_file(&pin)
                        .map_err(|e| Error::io(format!("remove old pin {}", pin.display()), e))?;
                }
                prog.pin(&pin)?;
            }
            std::fs::write(&digest_file, &digest)
                .map_err(|e| Error::io(format!("write {}", digest_file.display()), e))?;
        }
        let mut progs = BTreeMap::new();
        for name in ALL_PROGRAMS {
            progs.insert(name, SchedClassifier::from_pin(progs_dir.join(name))?);
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Datapath(format!("map {name} missing from object")))
        };
        let endpoints = HashMap::try_from(take(&mut ebpf, MAP_ENDPOINTS)?)?;
        let metrics = PerCpuHashMap::try_from(take(&mut ebpf, MAP_METRICS)?)?;
        let mut cfg: Array<MapData, DatapathConfig> =
            Array::try_from(take(&mut ebpf, MAP_CONFIG)?)?;
        cfg.set(0, config, 0)?;
        tracing::info!(
            pin_root = %pin_root.display(),
            adopted,
            "datapath {}",
            if adopted { "adopted from pins" } else { "loaded and pinned" }
        );
        Ok(EbpfDatapath {
            _ebpf: ebpf,
            progs,
            endpoints,
            metrics,
            pin_root: pin_root.into(),
            adopted,
        })
    }

    fn sum(&self, endpoint_id: u32, kind: u32) -> MetricValue {
        match self.metrics.get(&MetricKey { endpoint_id, kind }, 0) {
            Ok(per_cpu) => per_cpu
                .iter()
                .fold(MetricValue::default(), |acc, v| MetricValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                }),
            Err(_) => MetricValue::default(),
        }
    }
}

impl Datapath for EbpfDatapath {
    fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()> {
        self.endpoints
            .insert(u32::from_ne_bytes(ip.octets()), info, 0)?;
        Ok(())
    }

    fn remove_endpoint(&mut self, ip: Ipv4Addr, endpoint_id: u32) -> Result<()> {
        // Endpoints that never became ready have no entry; aya reports ENOENT as a syscall error.
        match self.endpoints.remove(&u32::from_ne_bytes(ip.octets())) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let kinds = [metric::TX, metric::RX]
            .into_iter()
            .chain((1..drop_reason::COUNT).map(|r| metric::DROP_BASE + r));
        for kind in kinds {
            let _ = self.metrics.remove(&MetricKey { endpoint_id, kind });
        }
        Ok(())
    }

    fn attach(&mut self, ifname: &str) -> Result<()> {
        // EEXIST when the interface already has the qdisc.
        let _ = tc::qdisc_add_clsact(ifname);
        for (name, attach_type) in [
            (PROG_FROM_POD, TcAttachType::Ingress),
            (PROG_TO_POD, TcAttachType::Egress),
        ] {
            let prog = self.progs.get_mut(name).expect("program loaded");
            let opts = TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
            });
            let id = match prog.attach_with_options(ifname, attach_type, opts) {
                Ok(id) => id,
                Err(create_err) => {
                    // Already attached (agent restart, retry): atomically replace the program.
                    let link =
                        SchedClassifierLink::attached(ifname, attach_type, TC_PRIORITY, TC_HANDLE)
                            .map_err(|e| Error::io(format!("find interface {ifname}"), e))?;
                    prog.attach_to_link(link).map_err(|e| {
                        Error::Datapath(format!(
                            "attach {name} to {ifname}: {create_err}; replace: {e}"
                        ))
                    })?
                }
            };
            // The filter belongs to the interface: it must outlive this process (and goes away
            // with the interface), so the link handle is deliberately not dropped (drop detaches).
            std::mem::forget(prog.take_link(id)?);
        }
        Ok(())
    }

    fn stats(&self, endpoint_id: u32) -> Stats {
        let tx = self.sum(endpoint_id, metric::TX);
        let rx = self.sum(endpoint_id, metric::RX);
        let mut drops = BTreeMap::new();
        for r in 1..drop_reason::COUNT {
            let d = self.sum(endpoint_id, metric::DROP_BASE + r);
            if d.packets > 0 {
                drops.insert(drop_reason::name(r).to_string(), d.packets);
            }
        }
        Stats {
            tx_packets: tx.packets,
            tx_bytes: tx.bytes,
            rx_packets: rx.packets,
            rx_bytes: rx.bytes,
            drops,
        }
    }

    fn info(&self) -> Info {
        Info {
            loaded: true,
            pin_root: self.pin_root.display().to_string(),
            programs: ALL_PROGRAMS.iter().map(|s| s.to_string()).collect(),
            maps: ALL_MAPS.iter().map(|s| s.to_string()).collect(),
            adopted: self.adopted,
        }
    }

    fn needs_reattach(&self) -> bool {
        !self.adopted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names userspace relies on exist in the built object (DESIGN §7).
    #[test]
    fn object_contains_the_names_userspace_uses() {
        let obj = aya_obj_names(BPF_OBJECT);
        for m in ALL_MAPS {
            assert!(
                obj.contains(&m.to_string()),
                "map {m} missing from object ({obj:?})"
            );
        }
        for p in ALL_PROGRAMS {
            assert!(
                obj.contains(&p.to_string()),
                "program {p} missing from object ({obj:?})"
            );
        }
    }

    /// Parses the object with aya's loader-side parser and lists its map and program names.
    fn aya_obj_names(data: &[u8]) -> Vec<String> {
        let obj = aya_obj::Object::parse(data).expect("parse object");
        obj.maps
            .keys()
            .cloned()
            .chain(obj.programs.keys().cloned())
            .collect()
    }
}
